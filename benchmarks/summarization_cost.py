"""Study 6's variants timed side by side: no mixer, a mixer over every token, the summarization layer; input and
experts wirings; on the MovieLens-100K (with the history sequence) and census inputs of the study.

    MTRANK_SHARED_DATA=../shared/data MTRANK_MOVIELENS=/path/to/ml-100k \\
        python benchmarks/summarization_cost.py [--batch 512] [--rounds 60] [--threads 1]

Per dataset, the five variants' models (untrained: the time does not depend on the weights) run a training step's
forward and backward pass and a serving forward pass on the same batch of real rows; each round calls every
variant once, in a rotating order, so that other processes on the machine slow them alike. Reported: the median
milliseconds, and the ratio to no mixer.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mtrank.experiments.studies.summarization import VARIANTS, data_for, datasets, setting, variant_config
from mtrank.model import MultiTaskModel, count_parameters


def train_step(model: MultiTaskModel, dense: torch.Tensor, sparse: torch.Tensor) -> None:
    model.train()
    out = model(dense, sparse)
    (out.task_logits.float().square().mean() + out.aux_loss).backward()
    model.zero_grad(set_to_none=True)


def serve(model: MultiTaskModel, dense: torch.Tensor, sparse: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(dense, sparse)


def side_by_side(models: dict[str, MultiTaskModel], dense, sparse, rounds: int) -> dict[str, dict[str, float]]:
    names = list(models)
    times = {(name, kind): [] for name in names for kind in ("train", "serve")}
    for r in range(rounds + 3):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for kind, call in (("train", train_step), ("serve", serve)):
                started = time.perf_counter()
                call(models[name], dense, sparse)
                if r >= 3:  # 3 warm-up rounds
                    times[name, kind].append(time.perf_counter() - started)
    return {name: {kind: 1e3 * float(np.median(times[name, kind])) for kind in ("train", "serve")} for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = setting(False)
    print(f"batch {args.batch}, {args.rounds} rounds, {args.threads} torch thread(s); median ms per call")
    print("| data | variant | parameters | train step ms | x no mixer | serve ms | x no mixer |")
    print("|---|---|---|---|---|---|---|")
    for dataset in datasets(s):
        base, groups, train, _, _ = data_for(s, dataset)
        batch = train[: args.batch]
        models = {v: MultiTaskModel(variant_config(s, base, groups, v), seed=0) for v in VARIANTS}
        ms = side_by_side(models, batch.dense, batch.sparse, args.rounds)
        ref = ms["no mixer"]
        for v, m in ms.items():
            params = count_parameters(models[v])
            print(
                f"| {dataset} | {v} | {params:,} | {m['train']:.2f} | {m['train'] / ref['train']:.2f} | "
                f"{m['serve']:.2f} | {m['serve'] / ref['serve']:.2f} |"
            )


if __name__ == "__main__":
    main()
