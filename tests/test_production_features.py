"""YouTube / Pinterest additions: DCNv2 experts, feature mixer, position-bias tower, distillation."""

import math

import pytest
import torch

from mtrank.config import ConfigError, ModelConfig, TaskConfig, TrainConfig
from mtrank.data.tensors import TensorData
from mtrank.model import MultiTaskModel
from mtrank.nn.experts import StackedCross
from mtrank.train import Trainer
from mtrank.train.losses import distillation_loss

TASKS = [TaskConfig("click", "binary"), TaskConfig("watch", "regression")]


@pytest.mark.parametrize("rank", [0, 3])
def test_stacked_cross_matches_per_expert_loop(rank):
    cross = StackedCross(groups=4, dim=6, layers=2, rank=rank)
    x0 = torch.randn(5, 6)
    out = cross(x0)
    for g in range(4):
        x = x0
        for i in range(2):
            w = cross.u[i, g] @ cross.v[i, g] if rank else cross.w[i, g]
            x = x0 * (x @ w + cross.b[i, g, 0]) + x
        torch.testing.assert_close(out[g], x, rtol=1e-5, atol=1e-5)


def test_dcn_experts_model_trains_and_outputs_per_task():
    config = ModelConfig(
        inputs={"num_dense": 5, "vocab_sizes": [7, 3], "embedding_dim": 4},
        tasks=TASKS,
        block={"num_experts": 3},
        experts={"type": "dcn", "cross_layers": 2, "hidden": [8]},
    )
    model = MultiTaskModel(config)
    out = model(torch.randn(4, 5), torch.tensor([[1, 2], [0, 0], [6, 1], [3, 2]]))
    assert out.task_logits.shape == (4, 2) and out.gate_weights.shape == (4, 2, 3)


def test_feature_mixer_adds_attention_over_feature_tokens():
    config = ModelConfig(
        inputs={"num_dense": 3, "vocab_sizes": [5, 5, 5], "embedding_dim": 8},
        tasks=TASKS,
        mixer={"layers": 1, "heads": 2},
    )
    model = MultiTaskModel(config).eval()
    dense, sparse = torch.randn(6, 3), torch.randint(0, 5, (6, 3))
    base = model(dense, sparse).task_logits
    # attention mixes tokens: changing one categorical id changes the mixer output of the whole row
    sparse2 = sparse.clone()
    sparse2[:, 0] = (sparse2[:, 0] + 1) % 5
    assert not torch.allclose(model(dense, sparse2).task_logits, base)
    with pytest.raises(ConfigError, match="model.mixer.heads: must divide inputs.embedding_dim=6"):
        ModelConfig.from_dict(
            {"inputs": {"vocab_sizes": [3], "embedding_dim": 6}, "mixer": {"layers": 1, "heads": 4}}, "model"
        )


def test_bias_tower_only_in_training_and_main_model_ignores_bias_features():
    config = ModelConfig(
        inputs={"num_dense": 2, "vocab_sizes": [4, 10], "embedding_dim": 4},
        tasks=TASKS,
        bias={"features": [1], "dropout": 0.0},
    )
    model = MultiTaskModel(config)
    with torch.no_grad():
        model.bias_tower.out.bias.fill_(1.0)
    dense, sparse = torch.randn(3, 2), torch.tensor([[0, 1], [1, 5], [3, 9]])
    other_position = sparse.clone()
    other_position[:, 1] = 0
    model.eval()
    # evaluation / serving: debiased, position has no effect
    torch.testing.assert_close(model(dense, sparse).task_logits, model(dense, other_position).task_logits)
    model.train()
    train_logits = model(dense, sparse).task_logits
    model.eval()
    diff = train_logits - model(dense, sparse).task_logits
    torch.testing.assert_close(diff[:, 0], torch.ones(3))  # binary task gets the bias logit
    torch.testing.assert_close(diff[:, 1], torch.zeros(3))  # regression task does not (default bias_tasks)


def test_bias_tower_dropout_drops_whole_rows():
    config = ModelConfig(
        inputs={"num_dense": 1, "vocab_sizes": [5], "embedding_dim": 2},
        tasks=TASKS,
        bias={"features": [0], "dropout": 0.5},
    )
    model = MultiTaskModel(config).train()
    with torch.no_grad():
        model.bias_tower.out.bias.fill_(1.0)
    bias = model.bias_tower(torch.zeros(2000, 1, dtype=torch.long))
    assert set(bias[:, 0].tolist()) == {0.0, 1.0}
    assert bias[:, 0].mean().item() == pytest.approx(0.5, abs=0.05)


def test_bias_tower_learns_position_effect_so_scores_are_debiased():
    """Clicks = relevance x examination(position): the shallow tower learns the examination effect."""
    gen = torch.Generator().manual_seed(0)
    n = 8_000
    relevance_feature = torch.randn(n, 1, generator=gen)
    position = torch.randint(0, 5, (n,), generator=gen)
    p_relevant = torch.sigmoid(2 * relevance_feature[:, 0])
    examine = torch.tensor([1.0, 0.6, 0.35, 0.2, 0.1])[position]
    click = (torch.rand(n, generator=gen) < p_relevant * examine).float()
    data = TensorData(relevance_feature, position[:, None], torch.stack([click, click], 1))
    tasks = [TaskConfig("click", "binary"), TaskConfig("click2", "binary", weight=0.0)]
    config = ModelConfig(
        inputs={"num_dense": 1, "vocab_sizes": [5], "embedding_dim": 4},
        tasks=tasks,
        block={"num_experts": 2},
        experts={"hidden": [8]},
        towers={"hidden": [4]},
        bias={"features": [0]},
    )
    model = MultiTaskModel(config)
    Trainer(model, TrainConfig(epochs=3, batch_size=256, lr=2e-2, progress=False)).fit(data)
    model.eval()
    logits = model.bias_tower(torch.arange(5)[:, None]).detach()[:, 0]  # learned per-position effect
    assert all(a > b for a, b in zip(logits[:-1], logits[1:])), logits  # top positions get more clicks


def test_distillation_modes():
    student = torch.randn(8, 2, requires_grad=True)
    binary = torch.tensor([True, False])
    for mode in ("pointwise", "pairwise", "score_l2"):
        loss = distillation_loss(student, student.detach(), binary, mode)
        loss.backward()
        # at the teacher, the gradient of every mode vanishes
        assert torch.allclose(student.grad, torch.zeros_like(student.grad), atol=1e-6), mode
        student.grad = None
    # pairwise ignores a constant shift of the teacher; pointwise does not
    shifted = student.detach() + 3.0
    student = student.detach()
    assert distillation_loss(student, shifted, binary, "pairwise").item() == pytest.approx(
        distillation_loss(student, student, binary, "pairwise").item()
    )
    assert distillation_loss(student, shifted, binary, "score_l2").item() > 0.01


def test_training_with_distillation_pulls_student_to_teacher():
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(2000, 4, generator=gen)
    teacher_logits = torch.stack([dense[:, 0] * 2, dense[:, 1]], 1)
    labels = torch.full((2000, 2), math.nan)  # no labels at all: only the teacher teaches
    data = TensorData(dense, torch.zeros(2000, 0, dtype=torch.long), labels).with_teacher(teacher_logits)
    model = MultiTaskModel(
        ModelConfig(inputs={"num_dense": 4}, tasks=TASKS, block={"num_experts": 2}, experts={"hidden": [16]})
    )
    cfg = TrainConfig(epochs=10, batch_size=128, lr=1e-2, distill="pointwise", progress=False)
    Trainer(model, cfg).fit(data)
    pred = model(dense, torch.zeros(2000, 0, dtype=torch.long)).task_logits.detach()
    assert torch.corrcoef(torch.stack([pred[:, 0], teacher_logits[:, 0]]))[0, 1] > 0.95
    with pytest.raises(ValueError, match="teacher"):
        Trainer(model, cfg).fit(TensorData(dense, torch.zeros(2000, 0, dtype=torch.long), labels))
