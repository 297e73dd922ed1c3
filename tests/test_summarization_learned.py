"""Learned grouping for the summarization layer (``model.mixer.groups: auto``): the token similarity and the
clustering, a planted grouping recovered from trained embeddings, the groups fixed in the model directory, exports
that score as eager, one-line errors."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import mtrank
from mtrank.artifacts import load_model
from mtrank.config import ConfigError, ModelConfig, TaskConfig
from mtrank.export.common import max_difference
from mtrank.export.onnx import OnnxScorer, export_onnx
from mtrank.export.torchscript import export_torchscript, load_torchscript
from mtrank.model import MultiTaskModel
from mtrank.nn.summarize import cluster_tokens, token_similarity

PLANTED = [[0, 1, 2], [3, 4], [5, 6]]  # user, item, context features (their token indices)


def planted_frame(rows: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Three latent entities (user, item, context), each seen through several categorical features (an id and
    coarser re-codings of it); the labels depend on each entity."""
    rng = np.random.default_rng(seed)
    user, item, context = rng.integers(0, 60, rows), rng.integers(0, 40, rows), rng.integers(0, 6, rows)
    user_effect, item_effect, context_effect = rng.normal(0, 1.5, 60), rng.normal(0, 1.5, 40), rng.normal(0, 1.5, 6)
    logit = user_effect[user] + item_effect[item] + context_effect[context] - 0.5
    return pd.DataFrame(
        {
            "user_id": user,
            "user_bucket": rng.permutation(60)[user] // 3,
            "user_region": rng.permutation(60)[user] // 10,
            "item_id": item,
            "item_category": rng.permutation(40)[item] // 4,
            "hour": context,
            "daypart": (context * 5 + 2) % 6,
            "click": (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(float),
            "like": (rng.random(rows) < 1 / (1 + np.exp(-(user_effect[user] - item_effect[item])))).astype(float),
        }
    )


def experiment(groups, **mixer):
    columns = ["user_id", "user_bucket", "user_region", "item_id", "item_category", "hour", "daypart"]
    return {
        "features": {"categorical": columns},
        "tasks": [{"name": "click"}, {"name": "like"}],
        "model": {
            "inputs": {"embedding_dim": 8},
            "block": {"num_experts": 2},
            "mixer": {"layers": 1, "heads": 2, "groups": groups, **mixer},
        },
        "train": {"epochs": 1, "batch_size": 128, "lr": 0.01, "progress": False},
        "baseline": {"enabled": False},
    }


def test_token_similarity_is_one_for_a_rotated_copy_and_near_zero_for_an_independent_token():
    torch.manual_seed(0)
    x = torch.randn(2000, 4)
    rotation = torch.linalg.qr(torch.randn(4, 4))[0]
    tokens = torch.stack([x, 3 * x @ rotation, torch.randn(2000, 4), torch.zeros(2000, 4)], 1)  # (B, 4, D)
    sim = token_similarity(tokens)
    assert sim[0, 1].item() == pytest.approx(1.0, abs=1e-5)
    assert sim[0, 2].item() < 0.01 and sim[1, 2].item() < 0.01
    assert sim[3].abs().max().item() == 0.0  # a constant token carries nothing
    torch.testing.assert_close(sim, sim.T)


def test_cluster_tokens_gives_exactly_k_deterministic_groups():
    sim = torch.tensor(
        [[1.0, 0.8, 0.1, 0.0], [0.8, 1.0, 0.2, 0.1], [0.1, 0.2, 1.0, 0.7], [0.0, 0.1, 0.7, 1.0]],
    )
    assert cluster_tokens(sim, 2) == [[0, 1], [2, 3]]
    assert cluster_tokens(sim, 3) == [[0, 1], [2], [3]]
    assert cluster_tokens(torch.ones(3, 3), 2) in ([[0], [1, 2]], [[0, 1], [2]], [[0, 2], [1]])
    with pytest.raises(ValueError, match=r"model.mixer.num_groups: must be in \[2, 4\] .* got 5"):
        cluster_tokens(sim, 5)


def test_learned_groups_recover_the_planted_grouping_and_are_fixed_in_the_model_dir(tmp_path):
    result = mtrank.fit(experiment("auto", num_groups=3), planted_frame(), output=tmp_path / "model")
    assert result.model.config.mixer.groups == PLANTED
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["model"]["mixer"]["groups"] == PLANTED  # serving and export read the lists, never "auto"
    loaded = load_model(tmp_path / "model")
    assert loaded.config.mixer.groups == PLANTED and loaded.mixer.summary.num_groups == 3


def test_a_model_with_learned_groups_exports_with_identical_scores(tmp_path):
    result = mtrank.fit(experiment("auto", num_groups=3, summary="mlp"), planted_frame(800), output=None)
    model = result.model.eval()
    scripted = load_torchscript(export_torchscript(model, tmp_path / "model.pt"))
    assert max_difference(model, lambda d, s: scripted(d, s)) <= 1e-5
    assert max_difference(model, OnnxScorer(export_onnx(model, tmp_path / "model.onnx"))) <= 1e-5


def mixer_config(**mixer):
    return ModelConfig(
        inputs={"num_dense": 0, "vocab_sizes": [5, 5, 5], "embedding_dim": 4},
        tasks=[TaskConfig("click")],
        mixer={"layers": 1, "heads": 2, **mixer},
    )


def test_bad_learned_grouping_values_are_refused_in_one_line_naming_the_field():
    with pytest.raises(ConfigError, match="model.mixer.groups: write lists of token indices or auto, got 'autp'"):
        ModelConfig.from_dict({**mixer_config().to_dict(), "mixer": {"layers": 1, "groups": "autp"}}, "model")
    with pytest.raises(ConfigError, match="mixer.num_groups: groups: auto needs num_groups >= 2, got 0"):
        mixer_config(groups="auto")
    with pytest.raises(ConfigError, match="mixer.num_groups: only with groups: auto"):
        mixer_config(groups=[[0], [1, 2]], num_groups=2)
    with pytest.raises(ConfigError, match="model.mixer.groups: 'auto' is learned by a warm-up"):
        MultiTaskModel(mixer_config(groups="auto", num_groups=2))
    with pytest.raises(ValueError, match=r"num_groups: must be in \[2, 3\] \(the mixer has 3 tokens\), got 4"):
        frame = planted_frame(300)
        spec = experiment("auto", num_groups=4)
        spec["features"]["categorical"] = ["user_id", "item_id", "hour"]
        mtrank.fit(spec, frame, output=None)


def test_the_grouping_benchmark_quick_mode_compares_the_four_arms(tmp_path, shared_data, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import learned_groups
    from mtrank.experiments.studies.runner import run_study

    monkeypatch.setenv("MTRANK_SHARED_DATA", str(shared_data))
    results = run_study(learned_groups.STUDY, tmp_path, quick=True, seeds=2, progress=False)
    assert results["arms"] == list(learned_groups.ARMS)
    learned = results["runs"]["mixer, learned groups"][0]["groups"]
    assert len(learned) == len(learned_groups.CONFIGURED) and sorted(sum(learned, [])) == list(range(32))
    assert all(0.5 < run["metrics"]["auc_never_married"] <= 1 for runs in results["runs"].values() for run in runs)
    assert (tmp_path / "learned-groups.png").exists()
