"""mtrank's training speed alone, per CPU-second, and a torch.profiler table of its step (what to fix next).

    .venv/bin/python benchmarks/step_profile.py --workload W1 --precision fp32
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/step_profile.py ...   # an older mtrank, same script

Samples per CPU-second of this process (``time.process_time``) are robust to other processes sharing the
machine; with one thread they are the speed the model gets from the core it runs on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers.workloads import WORKLOADS, make_data  # noqa: E402
from mtrank.config import TrainConfig  # noqa: E402
from mtrank.model import MultiTaskModel  # noqa: E402
from mtrank.train import Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="W1", choices=sorted(WORKLOADS))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batches", type=int, default=0, help="batches per timed epoch (0: W1 100, W2 6)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also print the top ops of one epoch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    wl = WORKLOADS[args.workload]
    batches = args.batches or (100 if wl.name == "W1" else 6)
    data = make_data(wl, wl.batch_size * batches, seed=0)
    torch.manual_seed(0)
    model = MultiTaskModel(wl.model_config())
    config = TrainConfig(batch_size=wl.batch_size, epochs=1, precision=args.precision, progress=False)
    trainer = Trainer(model, config)
    trainer.fit(make_data(wl, wl.batch_size * 2, seed=1))  # warm-up
    rates = []
    for _ in range(args.repeats):
        start = time.process_time()
        trainer.fit(data)
        rates.append(len(data) / (time.process_time() - start))
    print(
        f"{wl.name} {args.precision} {args.threads} thread(s): median {statistics.median(rates):,.0f} "
        f"samples per CPU-second (runs: {', '.join(f'{r:,.0f}' for r in rates)})"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.fit(data)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
