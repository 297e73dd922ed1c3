"""Where the main job's time goes on a CPU: the Ensemble step of the paper's models, phase by phase and op by op.

The main job (``mtrank run``) trains, per model, one ensemble of 9 members (3 correlations x 3 seeds) for 4,000
steps of batch 128. This script times that step in CPU-seconds of this process (``time.process_time``: robust to
other processes sharing the machine), split into gather / forward / backward / Adam, beside one plain model's
step (what 9 sequential runs cost), then prints the top ops of the 9-member step (torch.profiler, by input shape).

    PYTHONPATH=src .venv/bin/python benchmarks/ensemble_cpu_profile.py [--members 9] [--steps 300] [--profile]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import vmap

from mtrank.config import TrainConfig
from mtrank.data.synthetic import SyntheticConfig, make_synthetic
from mtrank.experiments.common import paper_model
from mtrank.model import MultiTaskModel
from mtrank.train.ensemble import Ensemble, EnsembleData
from mtrank.train.losses import multitask_loss
from mtrank.train.trainer import make_optimizer

PHASES = ("gather", "forward", "backward", "adam")


def ensemble_step(block: str, members: int, batch: int, rows: int = 10_000):
    """One eager Ensemble step as ``Ensemble.fit`` runs it, with a clock per phase."""
    parts = [make_synthetic(SyntheticConfig(n=rows, correlation=0.5, seed=s)) for s in range(members)]
    train = EnsembleData.stack(parts)
    ensemble = Ensemble(paper_model(block), list(range(members)))
    optimizer = make_optimizer(ensemble.params.values(), TrainConfig(lr=1e-3), torch.device("cpu"))
    member_loss = vmap(multitask_loss, in_dims=(0, 0, None, None))
    clock = dict.fromkeys(PHASES, 0.0)

    def step() -> None:
        t0 = time.process_time()
        dense, sparse, labels = train.take(torch.randint(0, rows, (members, batch)))  # (R, B, F) ...
        t1 = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        logits, aux = ensemble._forward(ensemble.params, ensemble.buffers, dense, sparse)  # noqa: SLF001
        losses, _ = member_loss(logits, labels, ensemble.binary_mask, ensemble.task_weights)
        loss = (losses + aux).sum()
        t2 = time.process_time()
        loss.backward()
        t3 = time.process_time()
        optimizer.step()
        t4 = time.process_time()
        for name, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            clock[name] += seconds

    return step, clock


def single_step(block: str, batch: int, rows: int = 10_000):
    """One plain model's step (Trainer's arithmetic: forward, multitask loss, backward, fused Adam)."""
    data = make_synthetic(SyntheticConfig(n=rows, correlation=0.5, seed=0))
    model = MultiTaskModel(paper_model(block), seed=0)
    optimizer = make_optimizer(model.parameters(), TrainConfig(lr=1e-3), torch.device("cpu"))
    task_weights = torch.tensor([t.weight for t in model.tasks])
    clock = dict.fromkeys(PHASES, 0.0)

    def step() -> None:
        t0 = time.process_time()
        index = torch.randint(0, rows, (batch,))
        dense, sparse, labels = data.dense[index], data.sparse[index], data.labels[index]
        t1 = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        out = model(dense, sparse)
        loss = multitask_loss(out.task_logits, labels, model.binary_mask, task_weights)[0] + out.aux_loss
        t2 = time.process_time()
        loss.backward()
        t3 = time.process_time()
        optimizer.step()
        t4 = time.process_time()
        for name, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            clock[name] += seconds

    return step, clock


def timed(step, clock: dict, steps: int) -> dict:
    for _ in range(30):  # warm-up
        step()
    for name in clock:
        clock[name] = 0.0
    for _ in range(steps):
        step()
    return {name: 1000 * seconds / steps for name, seconds in clock.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=9)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--blocks", nargs="+", default=["shared_bottom", "omoe", "mmoe"])
    parser.add_argument("--profile", action="store_true", help="also print the top ops of the MMoE ensemble step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"ms of CPU per step, 1 thread, batch {args.batch}; {args.members} members vs one plain model")
    print(f"{'model':<14} {'what':<12} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'total':>9}")
    for block in args.blocks:
        for what, (step, clock) in (
            (f"ensemble x{args.members}", ensemble_step(block, args.members, args.batch)),
            ("one model", single_step(block, args.batch)),
        ):
            ms = timed(step, clock, args.steps)
            cells = " ".join(f"{ms[p]:9.3f}" for p in PHASES)
            print(f"{block:<14} {what:<12} {cells} {sum(ms.values()):9.3f}", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        step, _ = ensemble_step("mmoe", args.members, args.batch)
        for _ in range(30):
            step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(100):
                step()
        table = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=32, max_shapes_column_width=60
        )
        print(f"\nMMoE ensemble x{args.members}, 100 steps (self CPU time; divide by 100 for per step):\n{table}")


if __name__ == "__main__":
    main()
