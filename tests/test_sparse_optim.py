"""The sparse row-wise optimisers against hand-written references; bf16 storage; checkpoint/resume."""

import pytest
import torch

from mtrank.config import CompileConfig, ModelConfig, TaskConfig, TrainConfig
from mtrank.data.tensors import TensorData
from mtrank.model import MultiTaskModel
from mtrank.nn.embedding import EmbeddingTable
from mtrank.train import Trainer
from mtrank.train.optim import LazyAdam, RowwiseAdagrad, make_optimizer, make_scheduler, summed_rows


def _batches(rows: int, steps: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, rows, (batch,), generator=g), torch.randn(batch, 4, generator=g)) for _ in range(steps)]


def _grad_step(table: EmbeddingTable, optimizer, ids, target) -> None:
    optimizer.zero_grad()
    ((table(ids).float() - target) ** 2).sum().backward()
    optimizer.step()


def _reference_rowwise_adagrad(w, ids, target, accum, lr, eps):
    g = torch.zeros_like(w).index_add_(0, ids, 2 * (w[ids] - target))
    touched = torch.unique(ids)
    accum[touched] += g[touched].pow(2).mean(1)
    w[touched] -= lr * g[touched] / (accum[touched].sqrt() + eps).unsqueeze(1)


def _reference_lazy_adam(w, ids, target, m, v, t, lr, b1, b2, eps):
    g = torch.zeros_like(w).index_add_(0, ids, 2 * (w[ids] - target))
    r = torch.unique(ids)
    m[r] = b1 * m[r] + (1 - b1) * g[r]
    v[r] = b2 * v[r] + (1 - b2) * g[r] ** 2
    w[r] -= lr * (m[r] / (1 - b1**t)) / ((v[r] / (1 - b2**t)).sqrt() + eps)


@pytest.mark.parametrize("compile", [None, "aot_eager", "inductor"])
def test_rowwise_adagrad_equals_reference_and_leaves_other_rows(compile):
    """Eager, and compiled as ``train.compile`` compiles it (one function: sums, accumulator, update in place)."""
    torch.manual_seed(0)
    table = EmbeddingTable(50, 4)
    w = table.weight.detach().clone().double()
    accum = torch.zeros(50, dtype=torch.float64)
    options = None if compile is None else CompileConfig(backend=compile)
    opt = RowwiseAdagrad(table.parameters(), lr=0.1, compile=options)
    seen = torch.zeros(50, dtype=torch.bool)
    for ids, target in _batches(50, 5, 8):  # duplicates in a batch: their gradients are summed
        _grad_step(table, opt, ids, target)
        _reference_rowwise_adagrad(w, ids, target.double(), accum, 0.1, 1e-8)
        seen[ids] = True
    torch.testing.assert_close(table.weight.double(), w, rtol=1e-5, atol=1e-6)
    assert (~seen).any()
    assert torch.equal(opt.state[table.weight]["sum"][~seen], torch.zeros(int((~seen).sum())))


def test_lazy_adam_equals_reference_and_differs_from_dense_adam():
    torch.manual_seed(0)
    table = EmbeddingTable(40, 4)
    start = table.weight.detach().clone()
    w, m, v = start.double(), torch.zeros(40, 4, dtype=torch.float64), torch.zeros(40, 4, dtype=torch.float64)
    opt = LazyAdam(table.parameters(), lr=0.05)
    for t, (ids, target) in enumerate(_batches(40, 6, 6), start=1):
        _grad_step(table, opt, ids, target)
        _reference_lazy_adam(w, ids, target.double(), m, v, t, 0.05, 0.9, 0.999, 1e-8)
    torch.testing.assert_close(table.weight.double(), w, rtol=1e-5, atol=1e-6)
    dense = EmbeddingTable(40, 4, sparse=False)
    dense.weight.data.copy_(start)
    adam = torch.optim.Adam(dense.parameters(), lr=0.05)
    for ids, target in _batches(40, 6, 6):
        _grad_step(dense, adam, ids, target)
    assert not torch.allclose(dense.weight, table.weight)  # dense Adam moves absent rows by momentum


def test_dense_gradient_is_refused_in_one_line():
    table = EmbeddingTable(10, 4, sparse=False)
    opt = RowwiseAdagrad(table.parameters())
    table(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="dense gradient: build the table with sparse=True"):
        opt.step()


@pytest.mark.parametrize("stochastic", [False, True])
def test_bf16_table_tracks_the_float32_table(stochastic):
    torch.manual_seed(0)
    full = EmbeddingTable(30, 4)
    half = EmbeddingTable(30, 4, dtype=torch.bfloat16)
    half.weight.data.copy_(full.weight.detach())
    opts = [RowwiseAdagrad(t.parameters(), lr=0.5, stochastic_rounding=stochastic) for t in (full, half)]
    goal = torch.randn(30, 4, generator=torch.Generator().manual_seed(5))
    error = float((full.weight.detach() - goal).pow(2).mean())
    for ids, _ in _batches(30, 40, 16):
        for table, opt in zip((full, half), opts):
            _grad_step(table, opt, ids, goal[ids])
    assert half.weight.dtype == torch.bfloat16
    assert float((full.weight.detach() - goal).pow(2).mean()) < 0.1 * error  # it learned
    torch.testing.assert_close(half.weight.float(), full.weight.detach(), atol=0.05, rtol=0.0)


def test_stochastic_rounding_is_unbiased():
    from mtrank.train.optim import _stochastic_round_bf16

    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way between two bf16 values (ulp 2**-7 at 1.0)
    torch.manual_seed(0)
    rounded = _stochastic_round_bf16(x).float()
    assert rounded.unique().numel() == 2
    assert abs(float(rounded.mean()) - (1.0 + 2**-10)) < 2e-5
    assert float(x.to(torch.bfloat16).float().mean()) == 1.0  # round-to-nearest loses the update


@pytest.mark.parametrize("cls", [RowwiseAdagrad, LazyAdam])
def test_checkpoint_resume_is_exact(cls, tmp_path):
    batches = _batches(25, 8, 6, seed=3)
    torch.manual_seed(1)
    straight = EmbeddingTable(25, 4)
    first = EmbeddingTable(25, 4)
    first.load_state_dict(straight.state_dict())
    opt = cls(straight.parameters(), lr=0.05)
    for ids, target in batches:
        _grad_step(straight, opt, ids, target)
    opt1 = cls(first.parameters(), lr=0.05)
    for ids, target in batches[:4]:
        _grad_step(first, opt1, ids, target)
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed = EmbeddingTable(25, 4)
    resumed.load_state_dict(ckpt["model"])
    opt2 = cls(resumed.parameters(), lr=0.05)
    opt2.load_state_dict(ckpt["optim"])
    for ids, target in batches[4:]:
        _grad_step(resumed, opt2, ids, target)
    assert torch.equal(resumed.weight, straight.weight)


@pytest.mark.parametrize("ids", [[3, 3, 3, 3], [0, 1, 2, 3], [7, 0, 7, 2, 0, 9], [5]])
def test_summed_rows_equal_coalesce_in_fixed_length_arrays(ids):
    values = torch.randn(len(ids), 3)
    grad = torch.sparse_coo_tensor(torch.tensor([ids]), values, (10, 3), check_invariants=True)
    rows, sums, last = summed_rows(grad)
    ref = grad.coalesce()
    distinct = ref.indices().shape[1]
    assert rows.shape == (len(ids),) and sums.shape == (len(ids), 3) and last.shape == (len(ids),)
    assert torch.equal(rows[:distinct], ref.indices()[0])
    torch.testing.assert_close(sums[:distinct], ref.values())
    assert torch.equal(sums[distinct:], torch.zeros(len(ids) - distinct, 3))
    assert last.tolist() == [min(j, distinct - 1) for j in range(len(ids))]


def test_a_capturable_rowwise_adagrad_keeps_a_tensor_lr_that_the_schedule_moves_in_place(tmp_path):
    table = EmbeddingTable(20, 4)
    dense = torch.nn.Linear(2, 1)
    config = TrainConfig(sparse="rowwise_adagrad", lr=0.1, schedule="cosine").validate()
    opt = make_optimizer([*dense.parameters(), table.weight], config, torch.device("cpu"), True, [table.weight])
    lr = opt.sparse.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and float(lr) == pytest.approx(0.1)
    scheduler = make_scheduler(opt, config, total_steps=10)
    for ids, target in _batches(20, 3, 5):
        _grad_step(table, opt, ids, target)
        scheduler.step()
    assert opt.sparse.param_groups[0]["lr"] is lr  # the same tensor, moved in place (what a graph reads)
    assert float(lr) < 0.1
    state = opt.state_dict()
    again = make_optimizer([*dense.parameters(), table.weight], config, torch.device("cpu"), True, [table.weight])
    again.load_state_dict(state)
    restored = again.sparse.param_groups[0]["lr"]
    assert torch.is_tensor(restored) and float(restored) == float(lr)


def test_lazy_adam_refuses_to_be_captured():
    with pytest.raises(ValueError, match="LazyAdam cannot be captured"):
        LazyAdam([torch.nn.Parameter(torch.zeros(3, 2))], capturable=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a GPU (run on the GPU machine)")
@pytest.mark.parametrize("clip,compile", [(0.0, False), (0.05, False), (0.05, True)])
def test_graphed_rowwise_adagrad_steps_equal_eager_ones(clip, compile):
    """The graphed step (with ``compile``: forward, loss and the table's update compiled) == the eager one."""
    g = torch.Generator().manual_seed(0)
    sparse = torch.stack([torch.randint(0, 40, (512,), generator=g), torch.randint(0, 12, (512,), generator=g)], 1)
    labels = torch.stack([(sparse[:, 0] % 2 == 0).float(), (sparse[:, 1] % 3 == 0).float()], 1)
    data = TensorData(torch.randn(512, 3, generator=g), sparse, labels)
    weights = {}
    for graphs in (True, False):
        sparse = {"optimizer": "rowwise_adagrad", "lr": 0.05}
        cfg = TrainConfig(
            steps=12, batch_size=64, lr=0.01, device="cuda", progress=False, sparse=sparse, grad_clip=clip,
            schedule="cosine", warmup_steps=3, compile=compile and graphs,
        )  # fmt: skip
        model = MultiTaskModel(
            ModelConfig(
                inputs={"num_dense": 3, "vocab_sizes": [40, 12], "embedding_dim": 4},
                tasks=[TaskConfig("click", "binary"), TaskConfig("buy", "binary")],
                experts={"hidden": [8]},
            ),
            seed=0,
        )
        trainer = Trainer(model, cfg, cuda_graphs=graphs)
        trainer.fit(data)
        assert trainer.step_path == ("cuda_graph" + "+compiled" * compile if graphs else "eager")
        assert (trainer.graphed_step.replays > 0) if graphs else trainer.graphed_step is None
        weights[graphs] = {k: v.cpu() for k, v in trainer.model.state_dict().items()}
    for name, value in weights[True].items():
        torch.testing.assert_close(value, weights[False][name], rtol=1e-4, atol=1e-5, msg=name)
