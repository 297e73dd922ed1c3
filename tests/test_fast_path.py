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


def model(**overrides):
    return MultiTaskModel(ModelConfig(inputs={"num_dense": 100}, tasks=TASKS, block={"num_experts": 4}, **overrides))


@pytest.mark.parametrize("train_kwargs", [{}, {"schedule": "cosine", "warmup_steps": 10}, {"grad_clip": 1.0}])
def test_cuda_graphs_are_planned_for_a_plain_mmoe_on_cuda(train_kwargs):
    ok, reason = cuda_graph_plan(model(), TrainConfig(**train_kwargs), CUDA)
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
    ok, reason = cuda_graph_plan(model(**model_kwargs), TrainConfig(), CUDA)
    assert ok, reason
    ok, reason = cuda_graph_plan(model(**model_kwargs), TrainConfig(), CUDA, allow_randomness=False)
    assert not ok and "random numbers inside the step" in reason


def test_cuda_graphs_are_refused_for_other_optimizers_and_float64_schedules():
    ok, reason = cuda_graph_plan(model(), TrainConfig(optimizer="adamw"), CUDA)
    assert ok, reason
    double = model().double()
    ok, reason = cuda_graph_plan(double, TrainConfig(schedule="cosine"), CUDA)
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


def test_eager_and_forced_eager_trainers_train_identically_on_cpu():
    data = make_synthetic(n=600, seed=0)
    a, b = model(), model()
    cfg = TrainConfig(epochs=2, batch_size=128, progress=False)
    Trainer(a, cfg).fit(data)
    Trainer(b, cfg, cuda_graphs=False).fit(data)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


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


def test_a_graphed_step_serves_only_the_tensors_it_was_built_on():
    from mtrank.train.cuda_graph import GraphedTrainStep

    data = make_synthetic(n=256, seed=0)
    m = model()
    step = GraphedTrainStep(lambda batch: batch.labels.sum(), torch.optim.Adam(m.parameters()), data, 64)
    assert step.serves(data, 64)
    assert not step.serves(data, 128)
    assert not step.serves(make_synthetic(n=256, seed=0), 64)  # equal values, other tensors


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_the_step_a_graph_records_equals_the_trainers_eager_step(grad_clip):
    """GraphedTrainStep._step (what the CUDA graph captures) runs on CPU too: it must be the eager step."""
    from mtrank.train.cuda_graph import GraphedTrainStep

    data = make_synthetic(n=256, seed=2)
    index = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:64]
    a, b = model(), model()
    cfg = TrainConfig(batch_size=64, progress=False, lr=1e-2, grad_clip=grad_clip)
    eager, recorded = Trainer(a, cfg), Trainer(b, cfg)
    for _ in range(3):
        loss = eager._loss(data.take(index))
        eager.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            total = torch.nn.utils.clip_grad_norm_(a.parameters(), grad_clip)
            assert total > grad_clip  # the clip is active in this test
        eager.optimizer.step()
    step = GraphedTrainStep(recorded._loss, recorded.optimizer, data, 64, grad_clip=grad_clip)
    for _ in range(3):
        recorded_loss = step._step(index)
    torch.testing.assert_close(recorded_loss, loss.detach())
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
