"""Closeup's summarization layer: groups of feature tokens summarized into one token before the mixer; the
mixer's output wired to the block input or (published wiring) to the experts' output; exports agree."""

import math

import pytest
import torch

from mtrank.config import ConfigError, ModelConfig, TaskConfig
from mtrank.export.common import max_difference
from mtrank.export.onnx import OnnxScorer, export_onnx
from mtrank.export.torchscript import export_torchscript, load_torchscript
from mtrank.model import MultiTaskModel
from mtrank.nn.summarize import AttentionSummary, MLPSummary

TASKS = [TaskConfig("click", "binary"), TaskConfig("watch", "regression")]


def test_attention_summary_matches_the_formula_on_a_tiny_case():
    torch.manual_seed(0)
    groups = [[0, 2], [1]]
    summary = AttentionSummary(groups, dim=3)
    tokens = torch.randn(2, 3, 3)
    out = summary(tokens)
    for b in range(2):
        for g, members in enumerate(groups):
            keys = [summary.key.weight @ tokens[b, i] for i in members]
            logits = torch.stack([k @ summary.query[g] for k in keys]) / math.sqrt(3)
            weights = torch.softmax(logits, 0)
            expected = sum(w * (summary.value.weight @ tokens[b, i]) for w, i in zip(weights, members))
            torch.testing.assert_close(out[b, g], expected, rtol=1e-5, atol=1e-6)


def test_mlp_summary_matches_the_formula_on_a_tiny_case():
    torch.manual_seed(0)
    groups = [[0, 2], [1]]
    summary = MLPSummary(groups, dim=3)
    tokens = torch.randn(2, 3, 3)
    out = summary(tokens)
    for b in range(2):
        for g, members in enumerate(groups):
            flat = torch.cat([tokens[b, i] for i in members] + [torch.zeros(3)] * (2 - len(members)))
            hidden = torch.relu(flat @ summary.w1[g] + summary.b1[g])
            torch.testing.assert_close(out[b, g], hidden @ summary.w2[g] + summary.b2[g], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", [AttentionSummary, MLPSummary])
def test_a_padded_slot_does_not_change_a_summary(kind):
    # group 1 has one token, padded with index 0: changing token 0 must leave group 1's summary unchanged
    summary = kind([[0, 2], [1]], dim=4)
    tokens = torch.randn(5, 3, 4)
    changed = tokens.clone()
    changed[:, 0] += 10.0
    a, b = summary(tokens), summary(changed)
    torch.testing.assert_close(a[:, 1], b[:, 1])
    assert not torch.allclose(a[:, 0], b[:, 0])


def config(groups=(), wiring="input", summary="attention", **extra):
    return ModelConfig(
        inputs={"num_dense": 3, "vocab_sizes": [5, 5, 5, 5], "embedding_dim": 8},
        tasks=TASKS,
        mixer={"layers": 1, "heads": 2, "groups": [list(g) for g in groups], "summary": summary, "wiring": wiring},
        **extra,
    )


def test_mixer_width_grows_with_groups_not_tokens_and_wiring_moves_it_to_the_towers():
    every = MultiTaskModel(config(), seed=0)
    grouped = MultiTaskModel(config([[0, 1], [2, 3], [4]]), seed=0)
    assert every.mixer.output_dim == 5 * 8 and grouped.mixer.output_dim == 3 * 8
    towers = MultiTaskModel(config([[0, 1], [2, 3], [4]], wiring="experts"), seed=0)
    plain = ModelConfig(inputs={"num_dense": 3, "vocab_sizes": [5, 5, 5, 5], "embedding_dim": 8}, tasks=TASKS)
    # experts wiring: the experts read what they read without a mixer; the towers read 24 more columns
    expert_in = MultiTaskModel(plain, seed=0).block.towers.layers[0].in_features
    assert towers.block.towers.layers[0].in_features == expert_in + 24
    dense, sparse = torch.randn(6, 3), torch.randint(0, 5, (6, 4))
    out = towers(dense, sparse)
    assert out.task_logits.shape == (6, 2) and torch.isfinite(out.task_logits).all()
    out.task_logits.sum().backward()
    assert towers.mixer.summary.query.grad.abs().sum() > 0


@pytest.mark.parametrize("wiring", ["input", "experts"])
@pytest.mark.parametrize("summary", ["attention", "mlp"])
def test_summarized_mixer_exports_with_identical_scores(tmp_path, wiring, summary):
    model = MultiTaskModel(config([[0, 1], [2, 3], [4]], wiring=wiring, summary=summary), seed=1).eval()
    scripted = load_torchscript(export_torchscript(model, tmp_path / "model.pt"))
    assert max_difference(model, lambda d, s: scripted(d, s)) <= 1e-5
    assert max_difference(model, OnnxScorer(export_onnx(model, tmp_path / "model.onnx"))) <= 1e-5


def test_bad_groups_and_choices_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"model.mixer.groups: token indices \[7\] out of range; the mixer has 5"):
        MultiTaskModel(config([[0, 7]]))
    with pytest.raises(ConfigError, match="mixer.groups: a token index is in two groups"):
        config([[0, 1], [1]])
    with pytest.raises(ConfigError, match="mixer.wiring: must be input or experts"):
        config(wiring="towers")
    with pytest.raises(ConfigError, match="mixer.summary: must be attention or mlp"):
        config(summary="mean")
