"""What sealing costs: a checkpoint write and a resume, sealed (files fsynced, SHA-256 manifest, verified at
load) vs as mtrank 0.2 wrote them (each file renamed into place, no fsync, no checksum), side by side.

    python benchmarks/checkpoint_write.py [--params 100000 5300000 86000000] [--repeats 3] [--out FILE.json]

For each size: a checkpoint of P weights, P best weights and 2P Adam moments (what the loop writes at every
evaluation), written into a temporary folder ``--repeats`` times each way, alternating; the median seconds of a
write, of a resume (read back; sealed: verified first), and the window in which a kill leaves a mix of two
checkpoints (0.2: from the first file's rename to the last's; sealed: none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtrank.train.checkpoint import Checkpoints


def checkpoint_state(params: int) -> tuple[dict, torch.optim.Optimizer, dict]:
    """Weights of ``params`` floats in tensors of 1M, an Adam optimizer with its moments, best weights."""
    sizes = [min(1_000_000, params - i) for i in range(0, params, 1_000_000)]
    weights = {f"layer{i}.weight": torch.randn(n) for i, n in enumerate(sizes)}
    parameters = [torch.nn.Parameter(w.clone()) for w in weights.values()]
    optimizer = torch.optim.Adam(parameters)
    for p in parameters:
        p.grad = torch.randn_like(p)
    optimizer.step()
    return weights, optimizer, {k: v.clone() for k, v in weights.items()}


def write_v02(directory: Path, weights: dict, optimizer: torch.optim.Optimizer, best: dict) -> float:
    """mtrank 0.2's write: each file to a temporary name and renamed; returns the mixed-state window (s)."""
    from mtrank.train.checkpoint import optimizer_to_tensors

    directory.mkdir(parents=True, exist_ok=True)
    tensors, meta = optimizer_to_tensors(optimizer)
    first_rename = None
    for name, content in (("weights", weights), ("best", best), ("optimizer", tensors)):
        save_file(content, str(directory / f"{name}.safetensors.tmp"))
        os.replace(directory / f"{name}.safetensors.tmp", directory / f"{name}.safetensors")
        first_rename = first_rename or time.perf_counter()
    (directory / "trainer_state.json.tmp").write_text(json.dumps({"optimizer": meta}))
    os.replace(directory / "trainer_state.json.tmp", directory / "trainer_state.json")
    return time.perf_counter() - first_rename


def read_v02(directory: Path) -> None:
    for name in ("weights", "best", "optimizer"):
        load_file(str(directory / f"{name}.safetensors"))
    json.loads((directory / "trainer_state.json").read_text())


def measure(params: int, repeats: int) -> dict:
    weights, optimizer, best = checkpoint_state(params)
    times: dict[str, list[float]] = {k: [] for k in ("v02_write", "v02_window", "v02_resume", "sealed_write")}
    times["sealed_resume"] = []
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            times["v02_window"].append(write_v02(Path(tmp) / "last", weights, optimizer, best))
            times["v02_write"].append(time.perf_counter() - start)
            start = time.perf_counter()
            read_v02(Path(tmp) / "last")
            times["v02_resume"].append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoints = Checkpoints(tmp, {"benchmark": params}, keep=2)
            start = time.perf_counter()
            checkpoints.save({"step": repeat + 1}, weights, best, optimizer)
            times["sealed_write"].append(time.perf_counter() - start)
            start = time.perf_counter()
            assert checkpoints.load() is not None
            times["sealed_resume"].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"params": params, "bytes": 16 * params, **median, "sealed_window": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 5_300_000, 86_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| parameters | checkpoint MB | write 0.2 / sealed (s) | resume 0.2 / sealed verified (s) | mix window 0.2 |")
    print("|---:|---:|---:|---:|---:|")
    for params in args.params:
        row = measure(params, args.repeats)
        rows.append(row)
        print(
            f"| {params:,} | {row['bytes'] / 1e6:,.0f} | {row['v02_write']:.3f} / {row['sealed_write']:.3f} "
            f"({row['sealed_write'] / row['v02_write']:.2f}x) | {row['v02_resume']:.3f} / "
            f"{row['sealed_resume']:.3f} ({row['sealed_resume'] / row['v02_resume']:.2f}x) | "
            f"{row['v02_window'] * 1000:,.1f} ms |",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
