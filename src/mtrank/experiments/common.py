"""What the paper's experiments share: the synthetic models' sizes, display names, run statistics, result files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from mtrank.config import ModelConfig, TaskConfig
from mtrank.evaluate.report import write_json

SYNTHETIC_TASKS = [TaskConfig("y1", "regression"), TaskConfig("y2", "regression")]

MODEL_LABELS = {
    "shared_bottom": "Shared-Bottom",
    "omoe": "OMoE",
    "mmoe": "MMoE",
    "single_task": "Single-task",
    "cgc": "CGC",
    "ple": "PLE",
}


def paper_model(block: str, num_dense: int = 100) -> ModelConfig:
    """The paper's synthetic sizes: 8 experts of 16 ReLU units, towers of 8; Shared-Bottom of 113 units."""
    width = [113] if block == "shared_bottom" else [16]
    return ModelConfig(
        inputs={"num_dense": num_dense},
        tasks=[dataclasses.replace(t) for t in SYNTHETIC_TASKS],
        block={"type": block, "num_experts": 8},
        experts={"hidden": width},
        towers={"hidden": [8]},
    )


def run_stats(values: list[float]) -> dict:
    """Mean, sample std, min, median, 90th percentile, max and count of one value per run."""
    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "min": float(arr.min()),
        "median": float(np.median(arr)),
        "p90": float(np.percentile(arr, 90)),
        "max": float(arr.max()),
        "n": arr.size,
    }


def write_results(out: Path, summary: dict, markdown: str, stem: str = "results") -> dict:
    """``out/<stem>.json`` (the numbers) and ``out/<stem>.md`` (the report); ``summary`` with the report added."""
    write_json(out / f"{stem}.json", summary)
    (out / f"{stem}.md").write_text(markdown)
    return {**summary, "markdown": markdown}
