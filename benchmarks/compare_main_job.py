"""Compare two main-job outputs (``results.json`` of ``mtrank run``): per (correlation, model, task), the mean test
MSE over seeds of each, and whether the difference is within seed noise (within 2 standard errors of the
difference of two means, sqrt(s_a^2 / n_a + s_b^2 / n_b)).

Reads both layouts: the list of runs of the former ``experiments/synthetic.py`` and the ``"block@p"`` settings of
``experiments/correlation.py``.

    python benchmarks/compare_main_job.py docs/main-job/results.json runs/main/results.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from mtrank.evaluate.report import markdown_table
from mtrank.experiments.common import MODEL_LABELS

TASKS = ("y1", "y2")


def test_mse(path: Path) -> dict[tuple[float, str, str], list[float]]:
    """``{(correlation, block, task): [test MSE of each seed]}`` from either results.json layout."""
    data = json.loads(Path(path).read_text())
    runs = data["runs"]
    if isinstance(runs, list):  # one entry per run
        rows = [(r["correlation"], r["block"], r["test"]) for r in runs]
    else:  # one entry per setting, one list entry per run
        rows = [(s["correlation"], s["block"], m) for s in runs.values() for m in s["test"]]
    values: dict = {}
    for correlation, block, metrics in rows:
        for task in TASKS:
            values.setdefault((float(correlation), block, task), []).append(metrics[f"mse/{task}"])
    return values


def compare(before: dict, after: dict, z: float = 2.0) -> list[dict]:
    """One row per key of ``before`` found in ``after``: means, difference, its standard error, within noise."""
    rows = []
    for key, a in before.items():
        if key not in after:
            continue
        b = after[key]
        se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
        diff = float(np.mean(b) - np.mean(a))
        rows.append(
            {
                "key": key,
                "before": (float(np.mean(a)), float(np.std(a, ddof=1)), len(a)),
                "after": (float(np.mean(b)), float(np.std(b, ddof=1)), len(b)),
                "diff": diff,
                "se": se,
                "within": abs(diff) <= z * se,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="results.json of the reference run (e.g. docs/main-job/results.json)")
    parser.add_argument("after", help="results.json of the new run")
    args = parser.parse_args()
    rows = compare(test_mse(args.before), test_mse(args.after))
    table = [
        [
            f"{p:g}",
            MODEL_LABELS[block],
            task,
            f"{r['before'][0]:.4f} ± {r['before'][1]:.4f}",
            f"{r['after'][0]:.4f} ± {r['after'][1]:.4f}",
            f"{r['diff']:+.4f}",
            f"{2 * r['se']:.4f}",
            "yes" if r["within"] else "NO",
        ]
        for r in rows
        for p, block, task in [r["key"]]
    ]
    header = ["correlation", "model", "task", "before", "after", "after - before", "2 SE", "within noise"]
    print(markdown_table(header, table))
    print(f"\n{sum(r['within'] for r in rows)} of {len(rows)} within 2 standard errors of the difference")


if __name__ == "__main__":
    main()
