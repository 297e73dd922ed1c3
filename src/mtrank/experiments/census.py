"""Ma et al. (KDD 2018), Tables 1 and 2: Single-task, Shared-Bottom, OMoE and MMoE on UCI Census-Income.

Protocol (the paper's, at a smaller budget; what it leaves open is ours and written here):

1. Tuning: every method gets the same grid, ``learning_rates x sizes`` (default 3 x 3 settings), each trained
   ``tune_seeds`` (default 3) times as one ensemble; the setting with the best mean validation AUC of the main
   task wins. The paper tuned learning rate, steps and experts x units; steps are chosen per run by evaluating
   on validation every half epoch and keeping the best main-task AUC.
2. Final: ``seeds`` runs of the chosen setting (different initialisation and batch order, same data), trained
   together as one :class:`~mtrank.train.ensemble.Ensemble`; test AUC mean ± std over runs, and the run with
   the best validation main-task AUC (the paper picks its best run by main-task AUC).

Sizes (small / large / xlarge): 8 experts (``omoe``/``mmoe``) of 16 / 32 / 64 units; Shared-Bottom one bottom
of 128 / 256 / 512 units (the same total width); Single-task one bottom per task of 64 / 128 / 256 units;
towers of 8 units; categorical columns embedded in 4 dimensions.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mtrank.config import ModelConfig, TrainConfig
from mtrank.data.census import PAPER_CORRELATION, CensusData, load_census
from mtrank.evaluate.report import markdown_table, plot_runs
from mtrank.experiments.common import MODEL_LABELS, write_results
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.train.ensemble import Ensemble, EnsembleData

METHODS = ("single_task", "shared_bottom", "omoe", "mmoe")
EXTRA_METHODS = ("cgc", "ple")  # beyond Ma et al. (Tang et al. 2020); only with --methods
SIZES = {"small": 0, "large": 1, "xlarge": 2}
# hidden units of the shared layer: per task (Single-task), the bottom (Shared-Bottom), per expert (8 experts)
WIDTHS = {
    "single_task": (64, 128, 256),
    "shared_bottom": (128, 256, 512),
    **{moe: (16, 32, 64) for moe in ("omoe", "mmoe", "cgc", "ple")},
}

# Ma et al. (2018) Tables 1, 2: (main AUC best run, main AUC mean, marital AUC mean, marital AUC of best run)
PAPER_TABLES = {
    1: {
        "single_task": (0.9398, 0.9337, 0.9933, 0.9922),
        "shared_bottom": (0.9361, 0.9295, 0.9915, 0.9921),
        "omoe": (0.9387, 0.9319, 0.9928, 0.9923),
        "mmoe": (0.9410, 0.9359, 0.9926, 0.9927),
    },
    2: {
        "single_task": (0.8843, 0.8792, 0.9933, 0.9922),
        "shared_bottom": (0.8836, 0.8813, 0.9927, 0.9917),
        "omoe": (0.8852, 0.8813, 0.9915, 0.9912),
        "mmoe": (0.8860, 0.8826, 0.9932, 0.9924),
    },
}


@dataclass
class CensusPaperConfig:
    """Budget of the census reproduction (same for every method)."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    learning_rates: list[float] = field(default_factory=lambda: [1e-3, 4e-3, 1e-2])
    sizes: list[str] = field(default_factory=lambda: ["small", "large", "xlarge"])
    tune_seeds: int = 3  # runs per tuning setting (one ensemble), averaged on validation
    seeds: int = 20  # final runs of the tuned setting
    epochs: int = 3
    batch_size: int = 1024
    evals_per_epoch: int = 2  # each run keeps its best validation main-task AUC
    embedding_dim: int = 4  # of every categorical column
    tower_hidden: list[int] = field(default_factory=lambda: [8])
    num_experts: int = 8
    subsample: int = 0  # rows of each split kept (0 = all); the quick mode's shortcut
    device: str = "cpu"

    @classmethod
    def quick(cls) -> CensusPaperConfig:
        return cls(learning_rates=[4e-3], sizes=["small"], seeds=2, epochs=1, batch_size=256, subsample=3000)


def model_config(method: str, size: str, data: CensusData, cfg: CensusPaperConfig) -> ModelConfig:
    """CGC / PLE get the same expert budget as (O/M)MoE: half shared, the rest split among the tasks (8 = 4
    shared + 2 per task; PLE stacks 2 such levels)."""
    width = WIDTHS[method][SIZES[size]]
    experts = {"num_experts": cfg.num_experts}
    if method in EXTRA_METHODS:
        shared = cfg.num_experts // 2
        experts = {"num_experts": shared, "task_experts": max(1, (cfg.num_experts - shared) // len(data.tasks))}
    return ModelConfig(
        inputs={"num_dense": data.num_dense, "vocab_sizes": list(data.vocab_sizes), "embedding_dim": cfg.embedding_dim},
        tasks=[dataclasses.replace(t) for t in data.tasks],
        block={"type": method, **experts},
        experts={"hidden": [width]},
        towers={"hidden": list(cfg.tower_hidden)},
    )


def train_ensemble(
    method: str,
    size: str,
    lr: float,
    seeds: list[int],
    data: CensusData,
    cfg: CensusPaperConfig,
    progress: bool = False,
) -> dict:
    """``len(seeds)`` runs of one setting as one ensemble; per-run validation and test metrics."""
    main = data.tasks[0].name
    steps_per_epoch = -(-len(data.train) // cfg.batch_size)
    train_cfg = TrainConfig(
        lr=lr,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        monitor=f"auc/{main}",
        eval_every=max(1, steps_per_epoch // cfg.evals_per_epoch),
        device=cfg.device,
        progress=progress,
    )
    config = model_config(method, size, data, cfg)
    ensemble = Ensemble(config, seeds, cfg.device)
    result = ensemble.fit(EnsembleData.shared(data.train), EnsembleData.shared(data.valid), train_cfg)
    test = ensemble.evaluate(EnsembleData.shared(data.test))
    return {
        "method": method,
        "size": size,
        "lr": lr,
        "params": count_parameters(MultiTaskModel(config)),
        "valid": result.best_metrics,
        "test": test,
        "best_step": result.best_step,
        "seconds": result.seconds,
    }


def _paper_cell(paper: tuple | None, i: int) -> str:
    return f"{paper[i]:.4f}" if paper else "-"


def plot_census(summary: dict, path: Path) -> None:
    """Every final run's test AUC per method (dots, mean as a bar) beside the paper's mean (red x), both tasks."""
    main, other = summary["tasks"]
    paper = PAPER_TABLES[summary["group"]]
    order = [*METHODS, *EXTRA_METHODS]
    finals = {m: summary["finals"][m] for m in order if m in summary["finals"]}  # the paper's order
    panels, reference = {}, {}
    for task, column in ((main, 1), (other, 2)):
        title = f"{task} AUC"
        panels[title] = {MODEL_LABELS[m]: [r[f"auc/{task}"] for r in run["test"]] for m, run in finals.items()}
        reference[title] = {MODEL_LABELS[m]: paper[m][column] for m in finals if m in paper}
    runs = len(next(iter(finals.values()))["test"])
    plot_runs(path, panels, reference, ylabel=f"test AUC ({runs} runs each)")


def replot_census(out: Path) -> None:
    """Redraw ``out/census_auc.png`` from ``out/results.json`` of an earlier census run."""
    plot_census(json.loads((Path(out) / "results.json").read_text()), Path(out) / "census_auc.png")


def _subsample(data: CensusData, rows: int) -> CensusData:
    if not rows:
        return data
    return dataclasses.replace(data, train=data.train[:rows], valid=data.valid[:rows], test=data.test[:rows])


def run_census(
    cfg: CensusPaperConfig,
    data_path: Path,
    group: int,
    out: Path,
    progress: bool = True,
    download: bool = False,
) -> dict:
    """Tune each method, train ``cfg.seeds`` runs of its best setting; write tables beside the paper's."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = _subsample(load_census(data_path, group, download=download), cfg.subsample)
    main, other = data.tasks[0].name, data.tasks[1].name
    tuning, finals = {}, {}
    grid = [(m, s, lr) for m in cfg.methods for s in cfg.sizes for lr in cfg.learning_rates]
    tune_seeds = [1000 + s for s in range(cfg.tune_seeds)]
    for method, size, lr in tqdm(grid, desc=f"census group {group}: tuning", disable=not progress, unit="setting"):
        run = train_ensemble(method, size, lr, tune_seeds, data, cfg)
        score = float(np.mean([m[f"auc/{main}"] for m in run["valid"]]))
        tuning.setdefault(method, []).append({"size": size, "lr": lr, "valid_auc": score, "params": run["params"]})
    for method in tqdm(
        cfg.methods, desc=f"census group {group}: {cfg.seeds} seeds", disable=not progress, unit="method"
    ):
        best = max(tuning[method], key=lambda t: t["valid_auc"])
        finals[method] = train_ensemble(
            method, best["size"], best["lr"], list(range(cfg.seeds)), data, cfg, progress=progress
        )

    rows, table = [], {}
    for method in cfg.methods:
        run = finals[method]
        main_auc = [m[f"auc/{main}"] for m in run["test"]]
        other_auc = [m[f"auc/{other}"] for m in run["test"]]
        best_run = int(np.argmax([m[f"auc/{main}"] for m in run["valid"]]))
        paper = PAPER_TABLES[group].get(method)  # None: not in the paper (CGC, PLE)
        entry = {
            "main_mean": float(np.mean(main_auc)),
            "main_std": float(np.std(main_auc, ddof=1)) if len(main_auc) > 1 else 0.0,
            "other_mean": float(np.mean(other_auc)),
            "other_std": float(np.std(other_auc, ddof=1)) if len(other_auc) > 1 else 0.0,
            "best_run": best_run,
            "best_main": main_auc[best_run],
            "best_other": other_auc[best_run],
            "paper": dict(zip(("main_best", "main_mean", "other_mean", "other_best"), paper)) if paper else None,
        }
        table[method] = entry
        rows.append(
            [
                MODEL_LABELS[method],
                f"{run['size']}, lr {run['lr']:g}",
                f"{run['params']:,}",
                f"{entry['main_mean']:.4f} ± {entry['main_std']:.4f}",
                _paper_cell(paper, 1),
                f"{entry['best_main']:.4f}",
                _paper_cell(paper, 0),
                f"{entry['other_mean']:.4f} ± {entry['other_std']:.4f}",
                _paper_cell(paper, 2),
                f"{entry['best_other']:.4f}",
                _paper_cell(paper, 3),
            ]
        )
    header = [
        "method",
        "setting",
        "params",
        f"{main} AUC mean ± std",
        "paper",
        f"{main} AUC best run",
        "paper",
        f"{other} AUC mean ± std",
        "paper",
        f"{other} AUC (best run)",
        "paper",
    ]
    md_table = markdown_table(header, rows)
    tune_rows = [
        [MODEL_LABELS[m], t["size"], f"{t['lr']:g}", f"{t['params']:,}", f"{t['valid_auc']:.4f}"]
        for m in cfg.methods
        for t in tuning[m]
    ]
    tune_table = markdown_table(["method", "size", "lr", "params", f"valid {main} AUC"], tune_rows)
    seconds = time.perf_counter() - started
    summary = {
        "config": dataclasses.asdict(cfg),
        "group": group,
        "tasks": [main, other],
        "label_correlation": data.label_correlation,
        "paper_correlation": PAPER_CORRELATION[group],
        "rows": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        "tuning": tuning,
        "finals": finals,
        "table": table,
        "seconds": seconds,
    }
    plot_census(summary, out / "census_auc.png")
    text = (
        f"# Census-income group {group}: {main} + {other} (Ma et al. 2018, Table {group})\n\n"
        f"Rows: train {len(data.train):,}, validation {len(data.valid):,}, test {len(data.test):,}. "
        f"Label correlation (Pearson, training file): {data.label_correlation:.4f} (paper: "
        f"|{PAPER_CORRELATION[group]}|).\n\nTest AUC over {cfg.seeds} runs of each method's tuned setting; "
        f"'best run' = the run with the best validation {main} AUC.\n\n{md_table}\n\n"
        "![test AUC of every run](census_auc.png)\n\n"
        f"## Tuning ({len(cfg.learning_rates) * len(cfg.sizes)} settings per method, {cfg.tune_seeds} run(s) "
        f"each, {cfg.epochs} epochs, best of {cfg.evals_per_epoch} evaluations per epoch)\n\n{tune_table}\n\n"
        f"Wall time: {seconds:.0f} s.\n"
    )
    return write_results(out, summary, text)
