"""``train.compile`` side by side with the same step uncompiled, in one run: first a check, then the speed.

1. Check: W2 at a small batch, ``--check-steps`` steps from one initialisation, fp32 and bf16, three ways: the
   plain eager step (no CUDA graph, no compile), the step the device picks (one CUDA graph on a GPU), and that
   step with ``train.compile`` (on a GPU: compiled inside our CUDA-graph capture). Reports every step's loss
   and the final weights' largest difference from the plain eager step, and the seconds of the first fit (the
   compilation is there).
2. Speed: ``--rounds`` rounds, each running ``benchmarks/w3.py`` without and then with ``--compile`` (a fresh
   trainer each time: eager warm-up steps, the compilation and the capture, then ``--steps`` timed steps);
   the median samples/s of each, and their ratio.

    python3 benchmarks/compile_step.py --device cpu --workload W2 --batch-sizes 4096 --steps 20 \\
        --warmup-steps 3 --threads 1 --matmul-size 1024 --rounds 3 --json docs/results/compile-cpu.json
    python3 benchmarks/compile_step.py --device cuda --workload W2 --batch-sizes 65536 --steps 200 \\
        --threads 16 --rounds 3 --json docs/results/compile-h200-w2.json

Options not listed below go to ``w3.py`` unchanged (``--workload``, ``--batch-sizes``, ``--steps``, ...).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import w3  # noqa: E402
from _peers.workloads import W2, make_data  # noqa: E402
from mtrank.model import MultiTaskModel  # noqa: E402
from mtrank.train import Trainer  # noqa: E402


def check(device: str, steps: int, batch_size: int, compile_option) -> dict:
    """Per precision: the largest loss and weight differences of the graphed and compiled paths from eager."""
    data = make_data(W2, batch_size * 3 + batch_size // 2, seed=0)  # 3 full batches and a short one per epoch
    out = {}
    for precision in ("fp32", "bf16"):
        runs = {}
        for name, graphs, compiled in (("eager", False, False), ("default", None, False), ("compiled", None, True)):
            config = w3.train_config(argparse.Namespace(**ARGS, device=device, precision=precision), batch_size, 1e-3)
            config.steps, config.eval_every, config.compile = steps, 1, compile_option if compiled else False
            trainer = Trainer(MultiTaskModel(W2.model_config(), seed=0), config, cuda_graphs=graphs)
            start = time.perf_counter()
            history = trainer.fit(data).history
            runs[name] = {
                "losses": torch.tensor([h["train_loss"] for h in history], dtype=torch.float64),
                "weights": [p.detach().double().cpu() for p in trainer.model.parameters()],
                "step_path": trainer.step_path,
                "seconds": time.perf_counter() - start,
            }
        eager = runs["eager"]
        out[precision] = {
            name: {
                "step_path": run["step_path"],
                "first_fit_seconds": run["seconds"],
                "max_loss_diff": float((run["losses"] - eager["losses"]).abs().max()),
                "max_weight_diff": max(float((a - b).abs().max()) for a, b in zip(run["weights"], eager["weights"])),
            }
            for name, run in runs.items()
            if name != "eager"
        }
        for name, row in out[precision].items():
            print(
                f"check {precision} {name:>8} ({row['step_path']}): max |loss - eager| {row['max_loss_diff']:.2e}, "
                f"max |weight - eager| {row['max_weight_diff']:.2e}, first fit {row['first_fit_seconds']:.1f} s"
            )
    return out


# what w3.train_config reads besides device and precision
ARGS = {"optimizer": "adam", "sparse": "dense", "sparse_lr": 0.0, "compile": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds: uncompiled, compiled (0: the check only)"
    )
    parser.add_argument("--check-steps", type=int, default=12, help="steps of the check (0: no check)")
    parser.add_argument("--check-batch-size", type=int, default=1024)
    parser.add_argument("--compile", type=yaml.safe_load, default=True, help="train.compile of the compiled runs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="write the results here")
    args, rest = parser.parse_known_args(argv)
    torch.manual_seed(0)
    result = {"device": args.device, "torch": torch.__version__, "compile": args.compile, "w3_args": rest}
    if args.device == "cuda":
        result["device"] = torch.cuda.get_device_name(0)
    if args.check_steps:
        result["check"] = check(args.device, args.check_steps, args.check_batch_size, args.compile)
    runs: dict[str, list[dict]] = {"uncompiled": [], "compiled": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, extra in (("uncompiled", []), ("compiled", ["--compile", json.dumps(args.compile)])):
                path = Path(tmp) / f"{name}-{r}.json"
                w3.main([*rest, "--device", args.device, *extra, "--profile-steps", "0", "--json", str(path)])
                runs[name].append(json.loads(path.read_text()))
    batches = list(runs["uncompiled"][0]["batches"]) if args.rounds else []  # --rounds 0: the check only
    result["speed"] = {}
    for batch in batches:
        row = {}
        for name, rounds in runs.items():
            rates = [run["batches"][batch]["samples_per_s"] for run in rounds]
            row[name] = {
                "samples_per_s_median": statistics.median(rates),
                "samples_per_s_rounds": rates,
                "step_path": rounds[0]["batches"][batch]["step_path"],
                "compile": rounds[0]["compile"],  # as w3.py recorded it
                "mfu_vs_measured_bf16_matmul": statistics.median(
                    run["batches"][batch]["mfu_vs_measured_bf16_matmul"] for run in rounds
                ),
                "peak_memory_gb": max(run["batches"][batch]["peak_memory_gb"] for run in rounds),
            }
        row["speedup"] = row["compiled"]["samples_per_s_median"] / row["uncompiled"]["samples_per_s_median"]
        result["speed"][batch] = row
        print(
            f"{runs['uncompiled'][0]['workload']} batch {batch}: uncompiled "
            f"{row['uncompiled']['samples_per_s_median']:,.0f} samples/s ({row['uncompiled']['step_path']}), "
            f"compiled {row['compiled']['samples_per_s_median']:,.0f} ({row['compiled']['step_path']}): "
            f"{row['speedup']:.2f}x (median of {args.rounds} alternating rounds)"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
