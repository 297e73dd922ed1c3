"""The main job: Shared-Bottom, OMoE and MMoE on the paper's synthetic data at several task correlations."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mtrank.config import ModelConfig, TaskConfig, TrainConfig
from mtrank.data.synthetic import SyntheticConfig, make_synthetic
from mtrank.evaluate.gates import format_gate_report, gate_report
from mtrank.evaluate.metrics import predict_batches, task_metrics
from mtrank.evaluate.report import (
    fmt_mean_std,
    markdown_table,
    mean_std,
    plot_curves,
    plot_gate_heatmaps,
    write_json,
)
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.train.distributed import rank_and_world
from mtrank.train.trainer import Trainer

SYNTHETIC_TASKS = [TaskConfig("y1", "regression"), TaskConfig("y2", "regression")]


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


MODEL_LABELS = {
    "shared_bottom": "Shared-Bottom",
    "omoe": "OMoE",
    "mmoe": "MMoE",
    "single_task": "Single-task",
    "cgc": "CGC",
    "ple": "PLE",
}


@dataclass
class StudyConfig:
    """Settings of the correlation study (the main job)."""

    blocks: list[str] = field(default_factory=lambda: ["shared_bottom", "omoe", "mmoe"])
    correlations: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.5])
    seeds: int = 3
    n_train: int = 10_000
    n_valid: int = 2_000
    n_test: int = 2_000
    steps: int = 4_000
    batch_size: int = 128
    lr: float = 1e-3
    eval_every: int = 200
    device: str = "cpu"

    @classmethod
    def quick(cls) -> StudyConfig:
        return cls(seeds=2, n_train=1_000, n_valid=300, n_test=300, steps=60, batch_size=64, eval_every=20)


def make_splits(correlation: float, seed: int, study: StudyConfig):
    """Train / validation / test rows of one synthetic dataset (one generator draw, then split)."""
    n = study.n_train + study.n_valid + study.n_test
    data = make_synthetic(SyntheticConfig(n=n, correlation=correlation, seed=seed))
    a, b = study.n_train, study.n_train + study.n_valid
    return data[:a], data[a:b], data[b:]


def run_study(study: StudyConfig, out: Path, progress: bool = True) -> dict:
    """Train every (correlation, block, seed); write ``results.json``, ``results.md`` and figures to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = []
    curves: dict[str, dict[str, tuple[list[float], list[list[float]]]]] = {}
    heatmaps = {}
    gate_reports = {}
    jobs = [(p, b, s) for p in study.correlations for b in study.blocks for s in range(study.seeds)]
    for correlation, block, seed in tqdm(jobs, desc="correlation study", disable=not progress, unit="run"):
        train, valid, test = make_splits(correlation, seed, study)
        model = MultiTaskModel(paper_model(block, train.dense.shape[1]), seed=seed)
        train_cfg = TrainConfig(
            lr=study.lr,
            batch_size=study.batch_size,
            steps=study.steps,
            eval_every=study.eval_every,
            seed=seed,
            device=study.device,
            progress=False,
        )
        result = Trainer(model, train_cfg).fit(train, valid)
        logits, gates = predict_batches(model, test, with_gates=True)
        metrics = task_metrics(model.tasks, logits, test.labels)
        runs.append(
            {
                "correlation": correlation,
                "block": block,
                "seed": seed,
                "params": count_parameters(model),
                "best_step": result.best_step,
                "test": metrics,
                "curve": [(h["step"], h["valid/loss"]) for h in result.history],
            }
        )
        panel = curves.setdefault(f"correlation {correlation:g}", {})
        x = [h["step"] for h in result.history]
        panel.setdefault(MODEL_LABELS[block], (x, []))[1].append([h["valid/loss"] for h in result.history])
        if seed == 0 and block in ("omoe", "mmoe"):
            report = gate_report(gates, [t.name for t in model.tasks])
            key = f"{MODEL_LABELS[block]} p={correlation:g}"
            gate_reports[key] = report
            heatmaps[key] = (
                np.array([report["tasks"][t.name]["utilisation"] for t in model.tasks]),
                [t.name for t in model.tasks],
            )

    if rank_and_world()[0] != 0:  # data-parallel under torchrun: rank 0 writes the results
        return {}
    table = summary_table(runs, study)
    summary = {
        "study": dataclasses.asdict(study),
        "runs": runs,
        "gate_reports": gate_reports,
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "results.json", summary)
    plot_curves(out / "loss_curves.png", curves, ylabel="validation MSE (mean of tasks)")
    if heatmaps:
        plot_gate_heatmaps(out / "gate_heatmaps.png", heatmaps)
    gates_text = "\n\n".join(f"{key}\n{format_gate_report(r)}" for key, r in gate_reports.items())
    (out / "results.md").write_text(
        "# Correlation study (synthetic data of Ma et al. 2018)\n\n"
        f"Test MSE per task, mean ± std over {study.seeds} seeds; {study.steps} steps of batch "
        f"{study.batch_size}, Adam lr {study.lr}, best step on validation.\n\n"
        f"{table}\n\n![loss curves](loss_curves.png)\n\n## Gates (test split, seed 0)\n\n```\n{gates_text}\n```\n\n"
        "![gate heatmaps](gate_heatmaps.png)\n"
    )
    summary["table"] = table
    summary["gates_text"] = gates_text
    return summary


def summary_table(runs: list[dict], study: StudyConfig) -> str:
    rows = []
    for correlation in study.correlations:
        for block in study.blocks:
            sel = [r for r in runs if r["correlation"] == correlation and r["block"] == block]
            if not sel:
                continue
            y1 = [r["test"]["mse/y1"] for r in sel]
            y2 = [r["test"]["mse/y2"] for r in sel]
            mean_loss, _ = mean_std([(a + b) / 2 for a, b in zip(y1, y2)])
            rows.append(
                [
                    f"{correlation:g}",
                    MODEL_LABELS[block],
                    sel[0]["params"],
                    fmt_mean_std(y1, 3),
                    fmt_mean_std(y2, 3),
                    f"{mean_loss:.3f}",
                ]
            )
    return markdown_table(["correlation", "model", "params", "test MSE y1", "test MSE y2", "mean"], rows)
