"""Step-path selection: CUDA graphs only where they are exact, the eager step everywhere else."""

import pytest
import torch

from mtrank.config import GateConfig, ModelConfig, TaskConfig, TrainConfig
from mtrank.data import make_synthetic
from mtrank.model import MultiTaskModel
from mtrank.train import Trainer
from mtrank.train.cuda_graph import cuda_graph_plan

TASKS = [TaskConfig("y1", "regression"), TaskConfig("y2", "regression")]
CUDA = torch.device("cuda")


def plan(m, config, allow_randomness=True):
    return cuda_graph_plan(m.random_sources(), list(m.parameters()), config, CUDA, allow_randomness)


def model(**overrides):
    return MultiTaskModel(ModelConfig(inputs={"num_dense": 100}, tasks=TASKS, block={"num_experts": 4}, **overrides))


@pytest.mark.parametrize("train_kwargs", [{}, {"schedule": "cosine", "warmup_steps": 10}, {"grad_clip": 1.0}])
def test_cuda_graphs_are_planned_for_a_plain_mmoe_on_cuda(train_kwargs):
    ok, reason = plan(model(), TrainConfig(**train_kwargs))
    assert ok, reason


def test_a_tensor_learning_rate_survives_a_checkpoint_as_the_same_tensor():
    """On CUDA the lr is a tensor a captured graph reads; a schedule and a resume must update it in place."""
    from mtrank.train.checkpoint import optimizer_from_tensors, optimizer_to_tensors

    m = model()
    lr = torch.tensor(0.01)
    optimizer = torch.optim.Adam(m.parameters(), lr=lr, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    for _ in range(2):
        m(torch.randn(4, 100), torch.zeros(4, 0, dtype=torch.long)).task_logits.sum().backward()
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.0025)
    tensors, meta = optimizer_to_tensors(optimizer)
    assert meta["param_groups"][0]["lr"] == pytest.approx(0.0025)  # JSON-ready
    lr.fill_(1.0)
    optimizer_from_tensors(optimizer, tensors, meta)
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.0025)


@pytest.mark.parametrize(
    "model_kwargs",
    [
        {"experts": {"dropout": 0.1}},
        {"gate": GateConfig.from_dict({"dropout": 0.1})},
        {"gate": GateConfig.from_dict({"type": "topk", "k": 2, "noisy": True})},
    ],
)
def test_random_masks_are_graphed_unless_a_deterministic_step_is_asked_for(model_kwargs):
    ok, reason = plan(model(**model_kwargs), TrainConfig())
    assert ok, reason
    ok, reason = plan(model(**model_kwargs), TrainConfig(), allow_randomness=False)
    assert not ok and "random numbers inside the step" in reason


def test_cuda_graphs_are_planned_for_adamw_and_refused_for_float64_schedules():
    ok, reason = plan(model(), TrainConfig(optimizer="adamw"))
    assert ok, reason
    double = model().double()
    ok, reason = plan(double, TrainConfig(schedule="cosine"))
    assert not ok and "non-float32" in reason


def test_cpu_training_takes_the_eager_path_even_when_graphs_are_asked_for():
    data = make_synthetic(n=600, seed=0)
    trainer = Trainer(model(), TrainConfig(epochs=1, batch_size=128, progress=False), cuda_graphs=True)
    assert trainer.step_path == "eager"
    assert "cpu" in trainer.step_path_reason
    assert not trainer.optimizer.param_groups[0]["capturable"]
    result = trainer.fit(data)
    assert result.steps == 5  # 4 full batches and the short last one
    assert trainer.graphed_step is None


def test_fused_adam_matches_the_reference_adam_update():
    """The trainer's fused Adam (one kernel for all tensors) gives the for-loop implementation's weights."""
    data = make_synthetic(n=512, seed=1)
    fused, reference = model(), model()
    trainer = Trainer(fused, TrainConfig(epochs=2, batch_size=128, progress=False, lr=3e-3))
    assert trainer.optimizer.param_groups[0]["fused"]
    trainer.fit(data)
    slow = Trainer(reference, TrainConfig(epochs=2, batch_size=128, progress=False, lr=3e-3))
    slow.optimizer = torch.optim.Adam(reference.parameters(), lr=3e-3, foreach=False)
    slow.fit(data)
    for x, y in zip(fused.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_a_step_is_reused_for_the_same_tensors_and_rebuilt_for_others():
    """A graphed step reads the training tensors it was built on: the loop reuses it only for those."""
    from mtrank.train.sources import InMemorySource

    data = make_synthetic(n=256, seed=0)
    trainer = Trainer(model(), TrainConfig(batch_size=64, progress=False))
    cpu = torch.device("cpu")
    first = trainer.loop.train_step(InMemorySource(data, 64, 0, cpu))
    assert trainer.loop.train_step(InMemorySource(data, 64, 1, cpu)) is first  # same tensors, other order
    assert trainer.loop.train_step(InMemorySource(data, 128, 0, cpu)) is not first
    assert trainer.loop.train_step(InMemorySource(make_synthetic(n=256, seed=0), 64, 0, cpu)) is not first


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_the_training_step_is_loss_backward_clip_and_adam_written_out(grad_clip):
    """TrainStep (the step the CUDA graph records) against the step written out by hand: masked per-task mean
    squared error summed over tasks, backward, clip to the global norm, Adam."""
    from mtrank.train.sources import InMemorySource

    data = make_synthetic(n=256, seed=2)
    data.labels[::7, 1] = float("nan")  # missing labels are masked
    index = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:64]
    a, b = model(), model()
    reference_adam = torch.optim.Adam(a.parameters(), lr=1e-2, foreach=False)
    for _ in range(3):
        batch = data.take(index)
        out = a(batch.dense, batch.sparse)
        present = ~torch.isnan(batch.labels)
        loss = (
            sum(((out.task_logits[:, k] - batch.labels[:, k])[present[:, k]] ** 2).mean() for k in range(2))
            + out.aux_loss
        )
        reference_adam.zero_grad()
        loss.backward()
        if grad_clip:
            norm = torch.sqrt(sum((p.grad**2).sum() for p in a.parameters()))
            assert norm > grad_clip  # the clip is active in this test
            for p in a.parameters():
                p.grad.mul_(min(1.0, grad_clip / (float(norm) + 1e-6)))
        reference_adam.step()
    trainer = Trainer(b, TrainConfig(batch_size=64, progress=False, lr=1e-2, grad_clip=grad_clip))
    step = trainer.loop.train_step(InMemorySource(data, 64, 0, torch.device("cpu")))
    for _ in range(3):
        total, per_task = step(index)
    torch.testing.assert_close(total, loss.detach())
    assert per_task.shape == (2,)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
