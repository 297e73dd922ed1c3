"""TorchRec sharding (mtrank[torchrec]) on CPU with 2 Gloo processes: sharded forward and gradients equal the
plain model's (table-wise and column-wise), sharded checkpoints reload at another world size, the unsharded
model gives the plain model's scores."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mtrank.config import ModelConfig
from mtrank.model import MultiTaskModel
from mtrank.train import sharded

pytestmark = pytest.mark.skipif(sharded.torchrec_available() is not None, reason=str(sharded.torchrec_available()))

LR = 0.5
BATCH = 8  # rows per rank


def make_model() -> MultiTaskModel:
    config = ModelConfig(
        inputs={"num_dense": 3, "vocab_sizes": [7, 5, 11], "embedding_dim": 4},
        block={"type": "mmoe", "num_experts": 2},
    )
    return MultiTaskModel(config, seed=0)


def make_batch(rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, 3, generator=g)
    sparse = torch.stack([torch.randint(0, v, (rows,), generator=g) for v in (7, 5, 11)], 1)
    return dense, sparse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def spawn(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def _forward_backward(rank, world, port, sharding_type, out_dir):
    init(rank, world, port)
    model = make_model()
    dmp = sharded.shard(sharded.TorchRecModel.from_model(model), sharding_type, lr=LR)
    dense, sparse = make_batch(BATCH * world)
    local = slice(rank * BATCH, (rank + 1) * BATCH)
    logits = dmp(dense[local], sharded.to_features(sparse[local], dmp.module.keys))
    logits.sum().div(BATCH).backward()
    dense_grads = {n: p.grad.clone() for n, p in dmp.named_parameters() if p.grad is not None and "ebc" not in n}
    tables = sharded.gather_tables(dmp)  # after the fused SGD update of the backward
    if rank == 0:
        torch.save({"logits": logits.detach(), "dense_grads": dense_grads, "tables": tables}, out_dir / "r0.pt")
    sharded.end_worker()  # (destroys the process group)


@pytest.mark.parametrize("sharding_type", ["table_wise", "column_wise"])
def test_sharded_forward_and_gradients_equal_the_plain_model(tmp_path, sharding_type):
    spawn(_forward_backward, 2, sharding_type, tmp_path)
    got = torch.load(tmp_path / "r0.pt")
    model = make_model()
    dense, sparse = make_batch(BATCH * 2)
    logits = model(dense, sparse).task_logits
    torch.testing.assert_close(got["logits"], logits[:BATCH].detach(), rtol=1e-5, atol=1e-6)
    logits.sum().div(2 * BATCH).backward()  # the mean over both ranks' rows = DDP's average
    params = dict(model.named_parameters())
    assert got["dense_grads"], "no dense gradient came back"
    for name, grad in got["dense_grads"].items():
        torch.testing.assert_close(grad, params[name.split("module.", 1)[-1]].grad, rtol=1e-5, atol=1e-6)
    # the tables' fused SGD step equals one SGD step of the plain model on both ranks' rows (see the module doc)
    table = model.embedding.table.weight
    expected = (table - LR * table.grad).detach()
    for i, start in enumerate(model.embedding.offsets.tolist()):
        got_table = got["tables"][f"t_f{i}"]
        torch.testing.assert_close(got_table, expected[start : start + got_table.shape[0]], rtol=1e-5, atol=1e-6)
        assert not torch.equal(got_table, table[start : start + got_table.shape[0]].detach()), "the table never moved"


def _save(rank, world, port, sharding_type, path):
    init(rank, world, port)
    model = make_model()
    with torch.no_grad():  # weights that differ from a fresh model's, so a reload that does nothing fails
        model.embedding.table.weight.mul_(3.0).add_(0.1)
        for p in model.block.parameters():
            p.add_(0.05)
    dmp = sharded.shard(sharded.TorchRecModel.from_model(model), sharding_type, lr=LR)
    sharded.save_sharded(dmp, path)
    sharded.end_worker()  # (destroys the process group)


def _load_and_score(rank, world, port, sharding_type, path, out):
    init(rank, world, port)
    model = make_model()
    dmp = sharded.shard(sharded.TorchRecModel.from_model(model), sharding_type, lr=LR)
    sharded.load_sharded(dmp, path)
    tables = sharded.gather_tables(dmp)
    dense, sparse = make_batch(BATCH)
    scores = dmp(dense, sharded.to_features(sparse, dmp.module.keys)).detach()
    if rank == 0:
        plain = sharded.to_unsharded(model, tables).eval()  # dense part shared with dmp, now reloaded
        torch.save({"scores": scores, "plain": plain(dense, sparse).task_logits.detach()}, out)
    sharded.end_worker()  # (destroys the process group)


@pytest.mark.parametrize(("save_world", "load_world"), [(2, 1), (1, 2)])
def test_sharded_checkpoint_reloads_at_another_world_size_with_identical_scores(tmp_path, save_world, load_world):
    ckpt = tmp_path / "ckpt"
    spawn(_save, save_world, "table_wise", ckpt)
    spawn(_load_and_score, load_world, "column_wise" if load_world == 2 else "table_wise", ckpt, tmp_path / "s.pt")
    got = torch.load(tmp_path / "s.pt")
    reference = make_model()
    with torch.no_grad():
        reference.embedding.table.weight.mul_(3.0).add_(0.1)
        for p in reference.block.parameters():
            p.add_(0.05)
    dense, sparse = make_batch(BATCH)
    expected = reference.eval()(dense, sparse).task_logits.detach()
    torch.testing.assert_close(got["scores"], expected, rtol=1e-5, atol=1e-6)
    # the unsharded model (export path) scores exactly as the plain mtrank model
    torch.testing.assert_close(got["plain"], expected, rtol=0, atol=0)


def test_unsupported_model_is_refused_in_one_line():
    config = ModelConfig(
        inputs={"num_dense": 3, "vocab_sizes": [7, 5, 5], "embedding_dim": 4, "bags": [{"length": 2}]},
    )
    with pytest.raises(ValueError, match="bags"):
        sharded.TorchRecModel(MultiTaskModel(config))


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_sharded"):
        sharded.load_sharded(torch.nn.Module(), tmp_path / "none")
