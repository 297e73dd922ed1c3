"""Per-step cost of every task-balancing method beside the fixed-weight step, side by side in one run.

Each setting builds the real training step (:class:`mtrank.train.step.TrainStep` through the loop, with the
method's balancer) and times ``--steps`` steps after ``--warmup`` steps, methods interleaved, ``--repeats``
rounds; the table gives the median ms per step and the ratio to ``fixed``. ``pcgrad/batched`` is PCGrad with
the per-task gradients from one vmapped backward (``task_gradients: batched``) instead of K backward passes.

    OMP_NUM_THREADS=1 python benchmarks/balancing_cost.py                    # CPU, 1 thread -> docs/results/
    python benchmarks/balancing_cost.py --device cuda --threads 16 --tag h200  # the GPU run (CUDA graph for
                                                                               # the methods that allow one)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mtrank.config import TrainConfig
from mtrank.data import make_synthetic
from mtrank.experiments.common import paper_model
from mtrank.model import MultiTaskModel
from mtrank.train import Ensemble, EnsembleData, Trainer
from mtrank.train.sources import InMemorySource

METHODS = [
    ("fixed", {"type": "fixed"}),
    ("uncertainty", {"type": "uncertainty"}),
    ("dwa", {"type": "dwa"}),
    ("famo", {"type": "famo"}),
    ("gradnorm", {"type": "gradnorm"}),
    ("pcgrad", {"type": "pcgrad"}),
    ("pcgrad/batched", {"type": "pcgrad", "task_gradients": "batched"}),
    ("cagrad", {"type": "cagrad"}),
    ("fixed + conflict measurement", {"type": "fixed", "conflict_every": 1}),
]
SETTINGS = {
    "mmoe-paper-b128": ("mmoe", [16], 128, 1),  # the synthetic study's model and batch
    "shared_bottom-paper-b128": ("shared_bottom", [113], 128, 1),
    "mmoe-wide-b1024": ("mmoe", [256, 128], 1024, 1),  # 8 experts of 256-128: production-like width
    "mmoe-paper-b128-ensemble16": ("mmoe", [16], 128, 16),  # 16 seeds stacked, as the study trains them
}


def build_step(setting: str, balancing: dict, device: str):
    block, hidden, batch, members = SETTINGS[setting]
    config = paper_model(block)
    config.experts.hidden = hidden
    data = make_synthetic(n=batch * 8, correlation=0.5, seed=0)
    train = TrainConfig(batch_size=batch, lr=1e-3, progress=False, device=device, balancing=balancing)
    if members == 1:
        runs = Trainer(MultiTaskModel(config, seed=0), train).loop
        source = InMemorySource(data, batch, 0, runs.runs.device)
    else:
        ensemble = Ensemble(config, list(range(members)), device=device)
        from mtrank.train.loop import TrainingLoop

        runs = TrainingLoop(ensemble, train, callbacks=[])
        source = InMemorySource(EnsembleData.shared(data), batch, list(range(members)), ensemble.device)
    step = runs.train_step(source)
    runs.balancer.begin(source.steps_per_epoch)
    keys = list(source.keys(0, 0))
    if balancing.get("conflict_every"):  # the loop's measurement after the step (one forward, K backward passes)

        def measured(key):
            step(key)
            runs._measure_conflict(source, key, 0)
            runs.conflict_series.clear()

        return measured, keys, runs.step_path
    return step, keys, runs.step_path


def time_steps(step, keys, steps: int, device: str) -> float:
    start = time.perf_counter()
    for i in range(steps):
        step(keys[i % len(keys)])
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for setting in args.settings:
        built = {name: build_step(setting, balancing, args.device) for name, balancing in METHODS}
        for step, keys, _ in built.values():
            time_steps(step, keys, args.warmup, args.device)
        times: dict[str, list[float]] = {name: [] for name in built}
        for _ in range(args.repeats):  # interleaved: a slow moment of the machine hits every method
            for name, (step, keys, _) in built.items():
                times[name].append(time_steps(step, keys, args.steps, args.device))
        base = statistics.median(times["fixed"])
        results[setting] = {
            name: {
                "ms_per_step": statistics.median(t),
                "min_ms": min(t),
                "ratio_to_fixed": statistics.median(t) / base,
                "step_path": built[name][2],
            }
            for name, t in times.items()
        }
        print(
            setting, {k: f"{v['ms_per_step']:.2f} ms ({v['ratio_to_fixed']:.2f}x)" for k, v in results[setting].items()}
        )
    meta = {
        "command": "python benchmarks/balancing_cost.py "
        f"--device {args.device} --threads {args.threads} --tag {args.tag}",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
        "settings": {k: dict(zip(("block", "expert_hidden", "batch", "members"), SETTINGS[k])) for k in args.settings},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"balancing_cost-{args.tag}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        f"# Per-step cost of task balancing ({args.tag})",
        "",
        f"`{meta['command']}`; {meta['device']}, {args.threads} thread(s), torch {meta['torch']}; median of "
        f"{args.repeats} interleaved rounds of {args.steps} steps (ms per step, ratio to fixed weights).",
        "",
        "| method | " + " | ".join(args.settings) + " |",
        "|---|" + "---|" * len(args.settings),
    ]
    for name, _ in METHODS:
        cells = [
            f"{results[s][name]['ms_per_step']:.2f} ({results[s][name]['ratio_to_fixed']:.2f}x)" for s in args.settings
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    paths = {s: results[s]["fixed"]["step_path"] for s in args.settings}
    lines += ["", f"Step path of fixed weights: {paths}; gradient methods always run the eager step."]
    (args.out / f"balancing_cost-{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
