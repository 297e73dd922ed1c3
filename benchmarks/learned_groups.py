"""Learned vs configured vs no grouping for Closeup's summarization layer, on census-income, paired over seeds.

Arms (same seed = same training rows and the same initialisation):

* ``no mixer``: the MMoE of ``configs/census_income.yaml``;
* ``mixer, every token``: a 1-layer transformer mixer over all 32 tokens (the dense token + 31 categorical);
* ``mixer, configured groups``: 7 groups by meaning (numeric / job / demographics / household and tax /
  migration / origin / year), each summarized into one token by attention pooling;
* ``mixer, learned groups``: ``groups: auto, num_groups: 7``: a 1-epoch warm-up with the mixer over every token,
  linear CKA between its tokens, average-linkage clustering (``mtrank.train.grouping``).

Metrics: test AUC of both tasks and the training seconds (the learned arm's include its warm-up); one run, side by
side, torch threads 1. Output: ``results.json``, ``results.md`` (mean ± std, paired differences with 95% intervals,
through the studies' runner) and a figure, in ``--out``.

    PYTHONPATH=src python benchmarks/learned_groups.py --out docs/results/learned_groups
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtrank.config.experiment import load_experiment
from mtrank.data.splits import load_splits
from mtrank.experiments.studies.common import plot_arm_bars
from mtrank.experiments.studies.runner import Metric, Study, run_study
from mtrank.pipeline import fit_splits

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "census_income.yaml"
# token 0: the dense (numeric) token; then the 31 categorical columns in the config's order
CONFIGURED = [
    [0],  # numeric: age, wage, gains, losses, dividends, employer size, weeks worked
    [1, 2, 3, 5, 6, 10, 11, 12, 28],  # job: class, industry, occupation, union, unemployment, full/part time
    [4, 7, 8, 9, 27, 29, 30],  # demographics: college, race, hispanic origin, sex, citizenship, veteran
    [13, 16, 17, 23],  # household and tax: filer status, household status and summary, family under 18
    [14, 15, 18, 19, 20, 21, 22],  # migration: previous region and state, migration codes
    [24, 25, 26],  # origin: countries of father, mother, self
    [31],  # survey year
]
ARMS = {
    "no mixer": {"layers": 0},
    "mixer, every token": {"layers": 1, "groups": []},
    "mixer, configured groups": {"layers": 1, "groups": CONFIGURED},
    "mixer, learned groups": {"layers": 1, "groups": "auto", "num_groups": len(CONFIGURED)},
}


@dataclass(frozen=True)
class GroupingSetting:
    train_rows: int = 20_000
    eval_rows: int = 20_000
    epochs: int = 2
    batch_size: int = 512
    lr: float = 3e-3

    @classmethod
    def quick(cls) -> GroupingSetting:
        return cls(train_rows=1_000, eval_rows=1_000, epochs=1)


def census_config():
    """configs/census_income.yaml, its data read from ``$MTRANK_SHARED_DATA/census-income`` when that is set."""
    root = os.environ.get("MTRANK_SHARED_DATA")
    if not root:
        return load_experiment(CONFIG)
    folder = Path(root) / "census-income"
    files = {"data.train": "census-income.data.gz", "data.test": "census-income.test.gz"}
    return load_experiment(CONFIG, {key: str(folder / name) for key, name in files.items()})


@functools.lru_cache(maxsize=1)
def census_splits() -> dict:
    return load_splits(census_config())


def run(s: GroupingSetting, arm: str, seed: int) -> dict:
    torch.set_num_threads(1)
    splits = census_splits()
    rng = np.random.default_rng(seed)
    sample = {}
    for role, rows in (("train", s.train_rows), ("valid", s.eval_rows), ("test", s.eval_rows)):
        table, source = splits[role]
        sample[role] = (table.take(np.sort(rng.choice(table.num_rows, rows, replace=False))), source)
    base = census_config()
    mixer = dataclasses.replace(base.model.mixer, heads=2, **ARMS[arm])
    config = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, mixer=mixer),
        train=dataclasses.replace(
            base.train, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=seed, progress=False, monitor="loss"
        ),
    )
    started = time.perf_counter()
    result = fit_splits(config, sample, output=None, baseline=False)
    seconds = time.perf_counter() - started
    test = result.metrics["test"]
    return {
        "metrics": {
            "auc_income": test["auc/income"],
            "auc_never_married": test["auc/never_married"],
            "seconds": seconds,
        },
        "groups": result.model.config.mixer.groups if result.model.mixer is not None else None,
    }


def figure(results: dict, path: Path) -> None:
    plot_arm_bars(
        path,
        results,
        {"auc_income": "test AUC income", "auc_never_married": "test AUC never married", "seconds": "train s"},
    )


STUDY = Study(
    name="learned-groups",
    title="Learned vs configured vs no grouping for the summarization layer (census-income)",
    setting=lambda quick: GroupingSetting.quick() if quick else GroupingSetting(),
    arms=lambda s: list(ARMS),
    comparisons=lambda s: [
        ("mixer, learned groups", "mixer, configured groups"),
        ("mixer, learned groups", "mixer, every token"),
        ("mixer, configured groups", "mixer, every token"),
        ("mixer, learned groups", "no mixer"),
    ],
    metrics=[
        Metric("auc_income", "test AUC income"),
        Metric("auc_never_married", "test AUC never married"),
        Metric("seconds", "training s (1 thread)", higher_is_better=False),
    ],
    run=run,
    figure=figure,
    notes=lambda s: (
        f"census-income (`configs/census_income.yaml`, MMoE 8 experts, embedding dim 4): per seed {s.train_rows:,} "
        f"training rows and {s.eval_rows:,} validation and test rows drawn at random, {s.epochs} epochs, batch "
        f"{s.batch_size}, Adam lr {s.lr:g}; mixer: 1 layer, 2 heads, attention summary. Configured groups: "
        f"{CONFIGURED}. Learned: groups: auto, num_groups {len(CONFIGURED)}, a 1-epoch warm-up. CPU, torch threads 1."
    ),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/learned_groups"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1,000 rows, 1 epoch: seconds")
    args = parser.parse_args()
    results = run_study(STUDY, args.out, args.quick, args.seeds, progress=False)
    for run_ in results["runs"]["mixer, learned groups"]:
        print("learned groups:", run_["groups"])
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
