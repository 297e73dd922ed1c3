"""Big embedding tables on one device: the memory planner's verdicts, a training run of one big table with the
row-wise optimiser, and the optimiser step's speed, sparse vs dense, side by side in one run.

    PYTHONPATH=src python3 benchmarks/big_tables.py --device cuda --out docs/results/big_tables-h200.json
    PYTHONPATH=src python3 benchmarks/big_tables.py --device cpu --quick --out docs/results/big_tables-cpu-quick.json

1. Plan: the planner (:mod:`mtrank.train.memory_plan`) at ``--rows x --dim`` float32 for dense Adam, lazy Adam
   and row-wise Adagrad against the device's free memory (``--quick``: a simulated device of 3x the table). Dense
   Adam is refused before anything is allocated; its one-line refusal is printed.
2. Train: the table (sparse gradients) + a 2-layer MLP (dense Adam) on a fixed synthetic teacher (each id's
   click logit is a hash of the id), ``--steps`` steps of ``--batch-size`` ids drawn Zipf-like (exponent 1.05)
   from the whole table, with row-wise Adagrad; log loss at the start and the end, samples/s, peak memory.
3. Step speed: one table of ``--compare-rows`` (a size where dense Adam fits) and the same batches: the whole
   step (forward, backward, optimiser) with row-wise Adagrad, lazy Adam and dense fused Adam; steps/s and
   samples/s, median of the timed steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mtrank.nn.embedding import EmbeddingTable, hash_ids
from mtrank.train.memory_plan import (
    OPTIMIZERS,
    TableSpec,
    free_device_bytes,
    plan_memory,
    refusal,
)
from mtrank.train.optim import SPARSE_OPTIMIZERS


def zipf_ids(rows: int, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Ids with a Zipf-like law over the whole table (rank r has mass ~ r ** -1.05, by inverse-CDF sampling of
    the continuous law), scattered over the rows by a hash so that hot ids are not neighbours."""
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    a = 1.05
    rank = ((rows ** (1 - a) - 1) * u + 1) ** (1 / (1 - a))
    return hash_ids(rank.long().clamp(1, rows), rows)


class Model(nn.Module):
    def __init__(self, rows: int, dim: int, sparse: bool, device: torch.device) -> None:
        super().__init__()
        self.table = EmbeddingTable(rows, dim, sparse=sparse, device=device)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.table(ids)).squeeze(-1)


def teacher(ids: torch.Tensor) -> torch.Tensor:
    """Each id's click label, 0 or 1, fixed by a hash of the id: only a model that learns every row fits it."""
    return (hash_ids(ids, 10007).float() / 10007 * 6 - 3 > 0).float()


def optimizers(model: Model, name: str, lr: float):
    table = [model.table.weight]
    dense = torch.optim.Adam(model.mlp.parameters(), lr=1e-3)
    if name == "adam":
        return [torch.optim.Adam(table, lr=lr * 0.1, fused=True), dense]
    return [SPARSE_OPTIMIZERS[name](table, lr=lr if name == "rowwise_adagrad" else lr * 0.1), dense]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(model: Model, opts, batches, device: torch.device, warmup: int) -> tuple[list[float], list[float]]:
    """Train on ``batches``; per-step seconds (after ``warmup``) and the losses."""
    loss_fn = nn.BCEWithLogitsLoss()
    seconds, losses = [], []
    for i, ids in enumerate(batches):
        sync(device)
        start = time.perf_counter()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(ids), teacher(ids))
        loss.backward()
        for opt in opts:
            opt.step()
        sync(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return seconds, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--compare-rows", type=int, default=10_000_000)
    parser.add_argument("--compare-steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="CPU-sized: 200k rows, dim 16, batch 1024")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.dim, args.batch_size, args.steps = 200_000, 16, 1024, 40
        args.compare_rows, args.compare_steps = 100_000, 12
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(1)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "args": vars(args)}

    # 1. plan
    spec = [TableSpec("item_id", args.rows, args.dim)]
    free = 3 * args.rows * args.dim * 4 if args.quick else free_device_bytes(device)
    mlp_params = args.dim * 64 + 64 + 65
    print(f"== plan: table item_id {args.rows:,} x {args.dim} float32, batch {args.batch_size:,}")
    result["plan"] = {}
    for name in OPTIMIZERS:
        plan = plan_memory(spec, name, args.batch_size, free, dense_params=mlp_params)
        line = refusal(plan, spec, name)
        verdict = "fits" if line is None else "REFUSED: " + line
        print(f"{name:<16} {plan.total / 1e9:8.2f} GB  {verdict}")
        result["plan"][name] = {"bytes": plan.items, "total": plan.total, "free": free, "refusal": line}

    # 2. train the big table with row-wise Adagrad
    if result["plan"]["rowwise_adagrad"]["refusal"] is not None:
        raise SystemExit(result["plan"]["rowwise_adagrad"]["refusal"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator(device=device).manual_seed(0)
    model = Model(args.rows, args.dim, sparse=True, device=device)
    batches = [zipf_ids(args.rows, args.batch_size, generator, device) for _ in range(args.steps)]
    seconds, losses = run_steps(model, optimizers(model, "rowwise_adagrad", args.lr), batches, device, warmup=5)
    tail = max(1, len(losses) // 10)
    train = {
        "rows": args.rows,
        "dim": args.dim,
        "loss_first": statistics.mean(losses[:tail]),
        "loss_last": statistics.mean(losses[-tail:]),
        "samples_per_s": args.batch_size / statistics.median(seconds),
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }
    print(f"== train: {args.rows:,} x {args.dim} with rowwise_adagrad, {args.steps} steps of {args.batch_size:,}")
    print(
        f"log loss {train['loss_first']:.4f} -> {train['loss_last']:.4f}, "
        f"{train['samples_per_s'] / 1e6:.3f}M samples/s, peak GPU memory "
        + (f"{train['peak_gb']:.1f} GB" if train["peak_gb"] else "n/a (CPU)")
    )
    result["train"] = train
    del model, batches

    # 3. step speed, sparse vs dense
    print(f"== step: {args.compare_rows:,} x {args.dim}, batch {args.batch_size:,}, {args.compare_steps} steps")
    print(f"{'optimizer':<16} {'steps/s':>9} {'samples/s':>12}")
    generator = torch.Generator(device=device).manual_seed(1)
    batches = [zipf_ids(args.compare_rows, args.batch_size, generator, device) for _ in range(args.compare_steps)]
    result["step"] = {}
    for name in OPTIMIZERS:
        torch.manual_seed(0)
        model = Model(args.compare_rows, args.dim, sparse=name != "adam", device=device)
        seconds, _ = run_steps(model, optimizers(model, name, args.lr), batches, device, warmup=3)
        per_step = statistics.median(seconds)
        result["step"][name] = {"steps_per_s": 1 / per_step, "samples_per_s": args.batch_size / per_step}
        print(f"{name:<16} {1 / per_step:9.1f} {args.batch_size / per_step:12,.0f}")
        del model
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
