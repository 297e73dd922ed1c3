"""Hashed tables (collision rate: formula vs measured), the memory planner's verdicts and refusal line."""

import pytest
import torch

from mtrank.nn.embedding import EmbeddingTable, expected_collision_rate, hash_ids, measured_collision_rate
from mtrank.train.memory_plan import MemoryPlanError, TableSpec, check_fits, plan_memory, refusal


def test_hash_ids_in_range_and_deterministic():
    ids = torch.tensor([0, 1, -7, 2**62, 10**15])
    buckets = hash_ids(ids, 97)
    assert ((buckets >= 0) & (buckets < 97)).all()
    assert torch.equal(buckets, hash_ids(ids, 97))
    assert hash_ids(torch.arange(1000), 10**6).unique().numel() > 990  # consecutive ids spread


@pytest.mark.parametrize("distinct,buckets", [(20_000, 200_000), (50_000, 50_000)])
def test_measured_collision_rate_matches_formula(distinct, buckets):
    ids = torch.arange(distinct) * 7919 + 13  # structured raw ids: the hash must still look uniform
    expected = expected_collision_rate(distinct, buckets)
    assert abs(measured_collision_rate(ids, buckets) - expected) < 0.01 + 0.05 * expected


def test_hashed_table_accepts_unbounded_ids():
    table = EmbeddingTable(100, 8, hashed=True)
    out = table(torch.tensor([[5, 10**17]]))
    assert out.shape == (1, 2, 8)
    assert torch.equal(out[0, 0], table.weight[hash_ids(torch.tensor(5), 100)])


def test_planner_refuses_dense_adam_and_accepts_rowwise_at_50m_rows():
    tables = [TableSpec("item_id", 50_000_000, 64)]
    free = 30 * 10**9
    dense = plan_memory(tables, "adam", 65536, free, dense_params=10**6)
    line = refusal(dense, tables, "adam")
    assert line.startswith("table item_id: 50M x 64 x float32 + adam state")
    assert "use train.sparse: rowwise_adagrad or model.inputs.table_dtype: bf16" in line and "\n" not in line
    with pytest.raises(MemoryPlanError, match="item_id"):
        check_fits(dense, tables, "adam")
    rowwise = plan_memory(tables, "rowwise_adagrad", 65536, free, dense_params=10**6)
    assert rowwise.fits and refusal(rowwise, tables, "rowwise_adagrad") is None
    assert rowwise.items["table item_id: rowwise_adagrad state"] == 50_000_000 * 4
    assert dense.items["table item_id: adam state"] == 2 * 50_000_000 * 64 * 4


def test_planner_counts_bf16_storage_and_rejects_unknown_names():
    tables = [TableSpec("user_id", 1000, 16, dtype="bfloat16")]
    plan = plan_memory(tables, "lazy_adam", 10, 10**9)
    assert plan.items["table user_id: weights"] == 1000 * 16 * 2
    with pytest.raises(ValueError, match="optimizer: unknown 'sgd'"):
        plan_memory(tables, "sgd", 10, 10**9)
    with pytest.raises(ValueError, match="table user_id: dtype 'int8' unknown"):
        plan_memory([TableSpec("user_id", 10, 4, dtype="int8")], "adam", 10, 10**9)


def test_benchmark_quick_refuses_dense_adam_and_trains_rowwise(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "big_tables.json"
    command = [sys.executable, str(repo / "benchmarks" / "big_tables.py"), "--device", "cpu", "--quick"]
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, "--out", str(out)], check=True, env=env, capture_output=True, timeout=120)
    result = json.loads(out.read_text())
    assert result["plan"]["adam"]["refusal"].startswith("table item_id: 0.2M x 16 x float32 + adam state")
    assert result["plan"]["rowwise_adagrad"]["refusal"] is None
    assert result["train"]["loss_last"] < result["train"]["loss_first"] - 0.1
    assert set(result["step"]) == {"adam", "lazy_adam", "rowwise_adagrad"}


class _Scorer(torch.nn.Module):
    """A hashed bf16 table (trained with row-wise Adagrad) and a linear head: ids ``[B, 2]`` -> scores ``[B]``."""

    def __init__(self) -> None:
        super().__init__()
        self.table = EmbeddingTable(64, 8, dtype=torch.bfloat16, hashed=True)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.table(ids).float().flatten(1))).squeeze(-1)


def test_torchscript_and_torch_export_of_hashed_bf16_table_give_identical_scores(tmp_path):
    from mtrank.train.optim import RowwiseAdagrad

    torch.manual_seed(0)
    model = _Scorer()
    opts = [RowwiseAdagrad([model.table.weight], lr=0.1), torch.optim.Adam(model.head.parameters(), lr=0.01)]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(-(10**12), 10**12, (32, 2), generator=g)  # raw ids of an unbounded space
        for opt in opts:
            opt.zero_grad()
        model(ids).mean().backward()
        for opt in opts:
            opt.step()
    model.eval()
    ids = torch.randint(-(10**12), 10**12, (7, 2), generator=g)
    with torch.no_grad():
        eager = model(ids)
        torch.jit.save(torch.jit.script(model), tmp_path / "model.pt")
        assert torch.equal(torch.jit.load(tmp_path / "model.pt")(ids), eager)
        exported = torch.export.export(model, (ids,))
        assert torch.equal(exported.module()(ids), eager)


def test_a_sparse_plan_counts_one_gradient_row_and_one_update_row_per_lookup_even_for_a_small_table():
    from mtrank.train.memory_plan import table_bytes

    small = TableSpec("country", rows=50, dim=8, lookups=2)  # 50 rows, 2 x 1,000 lookups per batch
    bytes_ = table_bytes(small, "rowwise_adagrad", batch_size=1000)
    assert bytes_["gradient"] == 2000 * 8 * (4 + 8) + 2000 * (4 * 8 + 48)  # values + indices, then summed_rows
    assert bytes_["rowwise_adagrad state"] == 50 * 4
    assert table_bytes(small, "adam", batch_size=1000)["gradient"] == 50 * 8 * 4


def test_a_sparse_lookup_hands_its_gradient_on_contiguous_and_unchanged():
    """The lookup's output is a slice of a wider input (as the block input's tokens are): the gradient that
    reaches the sparse backward is contiguous and equals the dense table's gradient."""
    torch.manual_seed(0)
    sparse, dense = EmbeddingTable(50, 4, sparse=True), EmbeddingTable(50, 4, sparse=False)
    dense.weight.data.copy_(sparse.weight.data)
    ids = torch.randint(0, 50, (6, 3))
    seen = []

    def lookup(table):
        out = table(ids)
        if table.sparse:
            node = out.grad_fn
            while "Embedding" not in node.name():
                node = node.next_functions[0][0]
            node.register_prehook(lambda grad_outputs: seen.append(grad_outputs[0]))
        x = torch.cat([torch.ones(6, 1), out.flatten(1)], 1)  # the tokens start at an unaligned column
        (x * torch.arange(13.0)).sum().backward()

    lookup(sparse)
    lookup(dense)
    assert seen and seen[0].is_contiguous()
    assert torch.allclose(sparse.weight.grad.to_dense(), dense.weight.grad)
