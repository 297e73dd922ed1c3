"""Two studies on one machinery: does a task-balancing method beat fixed weights, and does multi-task learning
help at all. Every setting trains its seeds as one vectorised :class:`~mtrank.train.Ensemble`; seed s of every
setting shares its data draw, initialisation seed and batch order, so differences are paired by seed.

* :func:`run_balancing` (``mtrank compare balancing``): every method x block x dataset; per task the test
  metric's mean +- std over seeds and the paired difference to fixed weights with a 95% bootstrap interval
  (:func:`mtrank.stats.paired_bootstrap`).
* :func:`run_mtl_help` (``mtrank compare mtl-help``): each task alone (a single-task model of the same width
  on that task's label only) against every multi-task block x balancing method, same data, seeds, budget,
  learning rate and best-step rule; per task the paired difference with its interval, negative transfer
  flagged when the interval lies below 0.

Datasets: ``synthetic:P`` (Ma et al.'s generator at correlation P, the second label times ``scale``: a task-scale
mismatch), ``census:1`` / ``census:2`` (UCI census-income task groups, a random subset of training rows),
``clothing`` (women's clothing reviews: recommended, rating >= 4, positive feedback, from
configs/womens_clothing_reviews.yaml). Metrics: AUC for binary tasks, R^2 for regression (scale-free),
both higher = better.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mtrank.config import ModelConfig, TaskConfig, TrainConfig
from mtrank.data import make_synthetic
from mtrank.data.tensors import TensorData
from mtrank.evaluate.report import markdown_table
from mtrank.experiments.common import paper_model, write_results
from mtrank.stats import paired_bootstrap, verdict
from mtrank.train.ensemble import Ensemble, EnsembleData

METHODS = ("fixed", "uncertainty", "dwa", "famo", "gradnorm", "pcgrad", "cagrad")


@dataclass
class BalancingStudy:
    """What the studies train (the defaults: the CPU run of docs/balancing.md)."""

    datasets: list[str] = field(default_factory=lambda: ["synthetic:1.0", "synthetic:0.5", "synthetic:0.0", "census:1"])
    blocks: list[str] = field(default_factory=lambda: ["mmoe", "shared_bottom"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: int = 10
    scale: float = 100.0  # synthetic: the second label times this
    n_train: int = 5_000  # synthetic rows per seed: training,
    n_valid: int = 1_000  # validation (best step),
    n_test: int = 2_000  # test (the table)
    steps: int = 1_500  # synthetic: Adam steps of batch 128
    census_rows: int = 50_000  # census / clothing: training rows kept (0 = all), the same subset for every seed
    valid_rows: int = 5_000  # census / clothing: validation rows kept for the best-step rule (0 = all)
    epochs: int = 3  # census / clothing
    lr: float = 1e-3
    batch_size: int = 128
    evals: int = 10  # validation evaluations per run; each run keeps its best step on validation loss
    data_dir: str = ""  # the census-income folder's parent ($MTRANK_SHARED_DATA)
    device: str = "cpu"

    @classmethod
    def quick(cls, data_dir: str = "") -> BalancingStudy:
        """Seconds: one synthetic correlation, 3 seeds, 40 steps."""
        return cls(
            datasets=["synthetic:0.5"],
            seeds=3,
            n_train=400,
            n_valid=200,
            n_test=200,
            steps=40,
            evals=2,
            data_dir=data_dir,
        )


@dataclass
class Dataset:
    train: EnsembleData
    valid: EnsembleData
    test: EnsembleData
    tasks: list[TaskConfig]
    inputs: dict
    steps: int


def load_dataset(name: str, study: BalancingStudy) -> Dataset:
    """One of the study's datasets, as ensemble data for ``study.seeds`` runs."""
    kind, _, arg = name.partition(":")
    if kind == "synthetic":
        return _synthetic(float(arg), study)
    if kind == "census":
        from mtrank.data.census import load_census

        data = load_census(Path(study.data_dir) / "census-income", group=int(arg))
        train = _subset(data.train, study.census_rows)
        inputs = {"num_dense": data.num_dense, "vocab_sizes": list(data.vocab_sizes), "embedding_dim": 4}
        return _shared(train, data.valid, data.test, data.tasks, inputs, study)
    if kind == "clothing":
        return _clothing(study)
    raise ValueError(f"unknown dataset {name!r}; use synthetic:P, census:1, census:2 or clothing")


def _synthetic(correlation: float, study: BalancingStudy) -> Dataset:
    n = study.n_train + study.n_valid + study.n_test
    draws = [make_synthetic(n=n, correlation=correlation, seed=seed) for seed in range(study.seeds)]
    for draw in draws:
        draw.labels[:, 1] *= study.scale
    a, b = study.n_train, study.n_train + study.n_valid
    tasks = [TaskConfig("y1", "regression"), TaskConfig(f"y2_x{study.scale:g}", "regression")]
    splits = [EnsembleData.stack([d[s] for d in draws]) for s in (slice(0, a), slice(a, b), slice(b, n))]
    return Dataset(*splits, tasks, {"num_dense": 100}, study.steps)


def _subset(data: TensorData, rows: int) -> TensorData:
    if not rows or rows >= len(data):
        return data
    return data[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:rows]]


def _shared(train, valid, test, tasks, inputs, study: BalancingStudy) -> Dataset:
    steps = study.epochs * -(-len(train) // study.batch_size)
    valid = _subset(valid, study.valid_rows)  # evaluated `evals` times per run: the cost of a setting
    return Dataset(*(EnsembleData.shared(d) for d in (train, valid, test)), list(tasks), inputs, steps)


def _clothing(study: BalancingStudy) -> Dataset:
    from mtrank.config.experiment import load_experiment
    from mtrank.data.encoders import FeatureEncoder
    from mtrank.pipeline import encode_table, load_splits

    config = load_experiment(Path(__file__).resolve().parents[3] / "configs" / "womens_clothing_reviews.yaml")
    splits = load_splits(config)
    encoder = FeatureEncoder(config.features).fit(*splits["train"])
    data = {role: encode_table(encoder, table, config, source) for role, (table, source) in splits.items()}
    model = config.model_config(encoder.num_dense, encoder.vocab_sizes, encoder.bag_inputs)
    inputs = {"num_dense": encoder.num_dense, "vocab_sizes": list(encoder.vocab_sizes), "embedding_dim": 8}
    train = _subset(data["train"], study.census_rows)
    return _shared(train, data["valid"], data["test"], model.tasks, inputs, study)


def model_for(block: str, data: Dataset) -> ModelConfig:
    """The paper's synthetic sizes (8 experts of 16, towers of 8; Shared-Bottom 113 units; single-task 113 per
    task) on the dataset's inputs and tasks."""
    config = paper_model("shared_bottom" if block == "single_task" else block)
    return dataclasses.replace(
        config,
        inputs=dataclasses.replace(config.inputs, **data.inputs),
        tasks=[dataclasses.replace(t) for t in data.tasks],
        block=dataclasses.replace(config.block, type=block),
    ).validate("model")


def train_setting(
    block: str, balancing: dict | str, data: Dataset, study: BalancingStudy, conflict: bool = False
) -> list[dict]:
    """``study.seeds`` runs of one (block, balancing) on ``data``: per run the test metrics; with ``conflict``,
    also each task pair's gradient cosine on the shared parameters (``cosine/<a>~<b>``: the mean of
    run's evaluation records, each carrying the latest of measurements every ``steps / (2 evals)`` steps,
    :mod:`mtrank.evaluate.conflict`)."""
    seeds = list(range(study.seeds))
    train = TrainConfig(
        lr=study.lr,
        batch_size=study.batch_size,
        steps=data.steps,
        eval_every=max(1, data.steps // study.evals),
        device=study.device,
        progress=False,
        balancing={
            **({"type": balancing} if isinstance(balancing, str) else balancing),
            "conflict_every": max(1, data.steps // (2 * study.evals)) if conflict else 0,
        },
    )
    ensemble = Ensemble(model_for(block, data), seeds, study.device)
    result = ensemble.fit(data.train, data.valid, train)
    metrics = ensemble.evaluate(data.test)
    if conflict:
        for member, run in zip(metrics, result.runs):
            member.update(_mean_cosines(run.history))
    return metrics


def _mean_cosines(history: list[dict]) -> dict[str, float]:
    """``cosine/<a>~<b>``: the mean over a run's history records of the overall (all shared layers) cosine."""
    keys = {k for record in history for k in record if k.startswith("conflict/cosine/") and k.count("/") == 2}
    return {k.removeprefix("conflict/"): float(np.nanmean([r.get(k, np.nan) for r in history])) for k in sorted(keys)}


def single_task(data: Dataset, k: int) -> Dataset:
    """``data`` with task ``k`` alone (its label column only): what a single-task model of that task trains on."""

    def alone(part: EnsembleData) -> EnsembleData:
        return dataclasses.replace(part, labels=part.labels[..., k : k + 1])

    return dataclasses.replace(
        data, train=alone(data.train), valid=alone(data.valid), test=alone(data.test), tasks=[data.tasks[k]]
    )


def task_metric(task: TaskConfig) -> str:
    return f"{'auc' if task.type == 'binary' else 'r2'}/{task.name}"


def paired_rows(label: str, runs: list[dict], base: list[dict], tasks: list[TaskConfig], n_boot: int) -> list[list]:
    """Per task: mean +- std over seeds, and the paired difference to ``base`` with its 95% interval."""
    rows = []
    for task in tasks:
        metric = task_metric(task)
        a = np.array([r[metric] for r in runs])
        b = np.array([r[metric] for r in base])
        spread = f"{a.mean():.4f} ± {a.std(ddof=1):.4f}" if a.size > 1 else f"{a.mean():.4f}"
        if runs is base:
            rows.append([label, metric, spread, "(reference)", "", ""])
            continue
        diff = paired_bootstrap(a, b, n_boot=n_boot, seed=0)
        rows.append(
            [
                label,
                metric,
                spread,
                f"{diff['estimate']:+.4f}",
                f"[{diff['low']:+.4f}, {diff['high']:+.4f}]",
                {"A better": "better", "B better": "worse"}.get(verdict(diff), "not resolvable"),
            ]
        )
    return rows


def run_balancing(study: BalancingStudy, out: Path, progress: bool = True, n_boot: int = 10_000) -> dict:
    """Every method x block x dataset; ``out/results.{json,md}``."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    sections = []
    conflict_rows: list[list] = []
    started = time.perf_counter()
    for name in study.datasets:
        data = load_dataset(name, study)
        for block in study.blocks:
            runs = {}
            for method in study.methods:
                t0 = time.perf_counter()
                runs[method] = train_setting(block, method, data, study, conflict=method == "fixed")
                if progress:
                    print(f"{name} {block} {method}: {time.perf_counter() - t0:.0f} s", flush=True)
            results[f"{name}/{block}"] = runs
            rows = [row for m in study.methods for row in paired_rows(m, runs[m], runs["fixed"], data.tasks, n_boot)]
            header = ["method", "metric", "mean ± std", "minus fixed", "95% interval", "vs fixed"]
            sections.append(f"### {name}, {block}\n\n{markdown_table(header, rows)}")
            conflict_rows += _cosine_rows(f"{name}, {block}", runs["fixed"])
    seconds = time.perf_counter() - started
    summary = {"study": dataclasses.asdict(study), "results": results, "seconds": seconds}
    markdown = (
        f"# Task balancing: every method against fixed weights\n\n{_describe(study)} Wall time {seconds:.0f} s.\n\n"
        "'vs fixed': the paired 95% bootstrap interval of (method - fixed) over seeds lies above 0 (better), "
        "below 0 (worse), or contains 0 (not resolvable).\n\n" + "\n\n".join(sections) + "\n\n"
        "## Task conflict under fixed weights\n\nThe gradient cosine of each task pair on the shared parameters "
        "(all shared layers; the mean over each run's evaluation records, then mean ± std over seeds).\n\n"
        + markdown_table(["setting", "pair", "cosine"], conflict_rows)
        + "\n"
    )
    return write_results(out, summary, markdown)


def _cosine_rows(label: str, runs: list[dict]) -> list[list]:
    pairs = sorted(k for k in runs[0] if k.startswith("cosine/"))
    rows = []
    for pair in pairs:
        values = np.array([r[pair] for r in runs])
        rows.append([label, pair.removeprefix("cosine/"), f"{values.mean():+.3f} ± {values.std(ddof=1):.3f}"])
    return rows


def run_mtl_help(study: BalancingStudy, out: Path, progress: bool = True, n_boot: int = 10_000) -> dict:
    """Per dataset: each task alone (a single-task Shared-Bottom model of the same width on that task's label
    only, same seeds, steps, batch, lr and best-step rule: matched budget per task) against every multi-task
    block x balancing method of ``study``; per task the paired difference with its interval, negative transfer
    flagged when the interval lies below 0. ``out/results.{json,md}``."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    rows = []
    flags = []
    started = time.perf_counter()
    for name in study.datasets:
        data = load_dataset(name, study)
        alone = [train_setting("shared_bottom", "fixed", single_task(data, k), study) for k in range(len(data.tasks))]
        single = [{k: v for member in members for k, v in member.items()} for members in zip(*alone)]
        results[f"{name}/single_task"] = single
        rows += paired_rows(f"{name}: each task alone", single, single, data.tasks, n_boot)
        for block in study.blocks:
            for method in study.methods:
                runs = train_setting(block, method, data, study)
                results[f"{name}/{block}/{method}"] = runs
                for row in paired_rows(f"{name}: {block}, {method}", runs, single, data.tasks, n_boot):
                    rows.append(row)
                    if row[-1] == "worse":
                        flags.append(f"{name}, {block}, {method}, {row[1]}")
                if progress:
                    print(f"{name} {block} {method}: done", flush=True)
    seconds = time.perf_counter() - started
    header = ["dataset: model", "metric", "mean ± std", "minus alone", "95% interval", "vs alone"]
    negative = (
        "**Negative transfer** (interval below 0): " + "; ".join(flags) if flags else "No negative transfer resolved."
    )
    markdown = (
        f"# Does multi-task learning help?\n\n{_describe(study)} Each task alone: a single-task Shared-Bottom "
        "model of the same width trained on that task's label only (same seeds, data, steps, batch, learning rate "
        "and best-step rule on its own validation loss). 'vs alone': the paired 95% bootstrap interval of "
        f"(multi-task - alone) over seeds lies above 0 (better), below 0 (worse: negative transfer) or contains 0 "
        f"(not resolvable). Wall time {seconds:.0f} s.\n\n{negative}\n\n{markdown_table(header, rows)}\n"
    )
    summary = {"study": dataclasses.asdict(study), "results": results, "negative_transfer": flags, "seconds": seconds}
    return write_results(out, summary, markdown)


def _describe(study: BalancingStudy) -> str:
    synthetic = (
        f"synthetic: {study.n_train:,} / {study.n_valid:,} / {study.n_test:,} rows per seed (a fresh draw per "
        f"seed), second label x{study.scale:g}, {study.steps:,} steps of batch {study.batch_size}"
    )
    kept = f"{study.census_rows:,}" if study.census_rows else "all"
    valid = f"{study.valid_rows:,}" if study.valid_rows else "all"
    real = (
        f"census / clothing: {kept} training rows (one random subset shared by every seed), {valid} validation "
        f"rows, the whole test split, {study.epochs} epochs of batch {study.batch_size}"
    )
    has_synthetic = [d.startswith("synthetic:") for d in study.datasets]
    sizes = ([synthetic] if any(has_synthetic) else []) + ([real] if not all(has_synthetic) else [])
    return (
        f"{study.seeds} seeds per setting (paired: seed s shares data, initialisation and batch order); "
        f"{'; '.join(sizes)}; Adam lr {study.lr:g} for every method, best step on validation loss "
        f"({study.evals} evaluations); test AUC (binary) or R² (regression)."
    )


def compact_table(summary: dict, n_boot: int = 10_000) -> str:
    """One row per setting and task, one column per method: the paired difference to the reference and its 95%
    interval, from a ``results.json`` of :func:`run_balancing` (reference: fixed weights) or of
    :func:`run_mtl_help` (reference: each task alone). The tables of docs/balancing.md."""
    methods = list(summary["study"]["methods"])
    results = summary["results"]
    if "negative_transfer" in summary:  # mtl-help: "<data>/single_task" and "<data>/<block>/<method>"
        settings = {
            f"{data}/{block}": ({m: results[f"{data}/{block}/{m}"] for m in methods}, results[f"{data}/single_task"])
            for data in summary["study"]["datasets"]
            for block in summary["study"]["blocks"]
        }
        reference, shown = "alone", methods
    else:
        settings = {name: (runs, runs["fixed"]) for name, runs in results.items()}
        reference, shown = "fixed", [m for m in methods if m != "fixed"]
    rows = []
    for setting, (runs, base_runs) in settings.items():
        for metric in [k for k in base_runs[0] if k.startswith(("auc/", "r2/"))]:
            base = np.array([r[metric] for r in base_runs])
            cells = [setting, metric, f"{base.mean():.4f} ± {base.std(ddof=1):.4f}"]
            for method in shown:
                diff = paired_bootstrap(np.array([r[metric] for r in runs[method]]), base, n_boot=n_boot, seed=0)
                mark = {"A better": " **+**", "B better": " **−**"}.get(verdict(diff), "")
                cells.append(f"{diff['estimate']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]{mark}")
            rows.append(cells)
    return markdown_table(["setting", "metric", f"{reference}: mean ± std", *shown], rows)


if __name__ == "__main__":  # python -m mtrank.experiments.balancing RESULTS_JSON: the compact table
    import json
    import sys

    print(compact_table(json.loads(Path(sys.argv[1]).read_text())))
