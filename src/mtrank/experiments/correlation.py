"""The correlation study of Ma et al. (KDD 2018, Fig. 4): Shared-Bottom, OMoE and MMoE on synthetic data whose two
tasks have weight cosine p. ``mtrank run`` (the main job) and ``mtrank reproduce correlation`` are this study at
two presets.

* A **run** is one (model, correlation p, seed): its own synthetic draw (``make_synthetic(p, seed)``, split into
  train / validation / test), its own initialisation and batch order, all from that one seed, whatever else is
  trained beside it.
* Runs of one model and learning rate train together as one :class:`~mtrank.train.ensemble.Ensemble` (at most
  ``max_members`` a time): the main job trains one ensemble of 3 correlations x 3 seeds per model.
* With one learning rate there is no search; with several, each (model, p) takes the one with the lowest mean
  validation loss over ``lr_search_seeds`` runs (seeds ``SEED_STRIDE + s``) before the study's runs (seeds
  ``0 .. seeds-1``).

Outputs (:func:`run_correlation`): ``results.json``, ``results.md`` (test MSE per task, mean ± std over seeds; the
learning-rate search; the paper's claims where the study has the correlations they need; gates of the first seed),
``loss_curves.png`` (mean validation MSE with the 95% confidence interval of that mean), ``gate_heatmaps.png``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import queue
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mtrank.config import TrainConfig
from mtrank.data.synthetic import SyntheticConfig, make_synthetic
from mtrank.evaluate.gates import format_gate_report, gate_report
from mtrank.evaluate.metrics import predict_batches
from mtrank.evaluate.report import fmt_mean_std, markdown_table, plot_curves, plot_gate_heatmaps
from mtrank.experiments.common import MODEL_LABELS, SYNTHETIC_TASKS, paper_model, write_results
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.stats import MIN_PAIRS, paired_bootstrap
from mtrank.train.callbacks import Callback
from mtrank.train.ensemble import Ensemble, EnsembleData
from mtrank.train.trainer import resolve_device

LEARNING_RATES = (1e-4, 1e-3, 1e-2)  # the paper's grid
SEED_STRIDE = 100_000  # seeds of the learning-rate search, the study and trainability never overlap
GATED = ("omoe", "mmoe")  # models whose gates the report shows


@dataclass
class CorrelationStudy:
    """Settings of the correlation study; the defaults are the main job's (:meth:`main_job`)."""

    blocks: list[str] = field(default_factory=lambda: ["shared_bottom", "omoe", "mmoe"])
    correlations: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.5])  # p = cos(w1, w2)
    seeds: int = 3  # runs per (model, correlation), seeds 0 .. seeds-1
    learning_rates: list[float] = field(default_factory=lambda: [1e-3])  # several: picked per (model, correlation)
    lr_search_seeds: int = 4  # runs per (model, correlation, learning rate) in the search
    n_train: int = 10_000  # rows of each run's draw, in this order: training,
    n_valid: int = 2_000  # validation (best step, learning rate search),
    n_test: int = 2_000  # test (the table)
    steps: int = 4_000  # Adam steps at a constant learning rate, no early stopping
    batch_size: int = 128
    eval_every: int = 200  # validation every so many steps; each run keeps the weights of its best step
    max_members: int = 200  # runs per ensemble at most (each member holds its own data)
    workers: int = 0  # processes training ensembles side by side; 0: one per ensemble on a CPU, up to cores + 1
    device: str = "cpu"

    @classmethod
    def main_job(cls) -> CorrelationStudy:
        """``mtrank run``: p = 1, 0.9, 0.5; 3 seeds; 4,000 steps of batch 128 at lr 1e-3."""
        return cls()

    @classmethod
    def paper(cls) -> CorrelationStudy:
        """``mtrank reproduce correlation``: p = 1, 0.9, 0.5, 0; 20 seeds; 2,000 steps; lr from the paper's grid."""
        return cls(
            correlations=[1.0, 0.9, 0.5, 0.0],
            seeds=20,
            learning_rates=list(LEARNING_RATES),
            steps=2_000,
            eval_every=100,
        )

    @classmethod
    def quick(cls, base: CorrelationStudy | None = None) -> CorrelationStudy:
        """A seconds-long version of ``base`` (default the main job): tiny draws, 60 steps, 2 seeds."""
        tiny = {"n_train": 600, "n_valid": 200, "n_test": 200, "steps": 60, "batch_size": 64, "eval_every": 20}
        return dataclasses.replace(base or cls(), seeds=2, lr_search_seeds=2, **tiny)


def synthetic_splits(
    runs: list[tuple[float, int]], study: CorrelationStudy
) -> tuple[EnsembleData, EnsembleData, EnsembleData]:
    """Train / validation / test rows of each run ``(correlation, seed)``, stacked on a leading run dimension.

    Each run is one draw of ``n_train + n_valid + n_test`` rows, split in that order.
    """
    n = study.n_train + study.n_valid + study.n_test
    draws = [make_synthetic(SyntheticConfig(n=n, correlation=p, seed=seed)) for p, seed in runs]
    a, b = study.n_train, study.n_train + study.n_valid
    return (
        EnsembleData.stack([d[:a] for d in draws]),
        EnsembleData.stack([d[a:b] for d in draws]),
        EnsembleData.stack([d[b:] for d in draws]),
    )


def train_config(study: CorrelationStudy, lr: float, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        lr=lr,
        batch_size=study.batch_size,
        steps=study.steps,
        eval_every=study.eval_every,
        seed=seed,
        device=study.device,
        progress=False,
    )


Setting = tuple[str, float, float]  # (model, correlation, learning rate)


def train_runs(
    settings: list[Setting],
    seeds: list[int],
    study: CorrelationStudy,
    desc: str = "training",
    progress: bool = True,
    gate_seed: int | None = None,
) -> dict:
    """Train every (setting, seed); runs of one (model, learning rate) as one ensemble.

    Returns ``{"runs": {setting: per-run lists}, "ensembles": [...], "gate_reports": {...}}``; a setting's lists
    (``curves``, ``valid_loss``, ``test``, ``test_loss``, ``best_step``) have one entry per seed, in ``seeds``'
    order. ``gate_seed``: report the gates of that seed's OMoE / MMoE runs on their test split.
    """
    groups: dict[tuple[str, float], list[tuple[float, int]]] = {}
    for block, correlation, lr in settings:
        groups.setdefault((block, lr), []).extend((correlation, seed) for seed in seeds)
    chunks = [
        (block, lr, members[i : i + study.max_members])
        for (block, lr), members in groups.items()
        for i in range(0, len(members), study.max_members)
    ]
    runs = {
        (block, p, lr): {
            "block": block,
            "correlation": p,
            "lr": lr,
            "params": count_parameters(MultiTaskModel(paper_model(block))),
        }
        for block, p, lr in settings
    }
    ensembles, gates = [], {}
    with tqdm(total=len(chunks) * study.steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for (block, lr, members), trained in zip(chunks, train_chunks(chunks, study, gate_seed, bar)):
            ensembles.append(trained["ensemble"])
            gates.update(trained["gate_reports"])
            for (p, _seed), member in zip(members, trained["members"]):
                run = runs[block, p, lr]
                run["steps"] = trained["steps"]
                for name, value in member.items():
                    run.setdefault(name, []).append(value)
    return {"runs": runs, "ensembles": ensembles, "gate_reports": gates}


Chunk = tuple[str, float, list[tuple[float, int]]]  # one ensemble: model, learning rate, runs (correlation, seed)


def train_chunks(chunks: list[Chunk], study: CorrelationStudy, gate_seed: int | None, bar: tqdm) -> list[dict]:
    """:func:`train_ensemble` of every chunk, in order; ``bar`` counts their steps.

    On a CPU, ``study.workers`` processes train the ensembles side by side, each with this process's number of
    PyTorch threads (so the numbers are the ones this process would get). On the 2-core development machine the
    main job's 3 ensembles take 57 s in 3 processes and 97 s one after the other (idle); the cost is memory, one
    process and its data per ensemble running.
    """
    workers = study.workers or 1
    if not study.workers and resolve_device(study.device).type == "cpu":
        # one per ensemble, at most one more than the cores: the main job's 3 ensembles on 2 cores end together
        workers = min(len(chunks), (os.cpu_count() or 1) + 1)
    if min(workers, len(chunks)) <= 1:
        results = []
        for block, lr, members in chunks:
            start = bar.n
            bar.set_postfix_str(f"{MODEL_LABELS[block]} x{len(members)}, lr {lr:g}")

            def advance(step: int, start: int = start) -> None:
                bar.update(start + step - bar.n)

            results.append(train_ensemble(block, lr, members, study, advance, gate_seed))
        return results
    # fork: a worker starts at once with everything imported, and does not run the parent's __main__ again;
    # safe on Linux for a CPU-only parent (no CUDA context to inherit)
    cpu_linux = sys.platform == "linux" and resolve_device(study.device).type == "cpu"
    context = mp.get_context("fork" if cpu_linux else "spawn")
    progress = context.Queue()
    done = [0] * len(chunks)  # steps of each chunk so far
    initargs = (torch.get_num_threads(), progress)
    with ProcessPoolExecutor(min(workers, len(chunks)), context, _start_worker, initargs) as pool:
        futures = [pool.submit(_train_chunk, i, *chunk, study, gate_seed) for i, chunk in enumerate(chunks)]
        while not all(f.done() for f in futures) or not progress.empty():
            try:
                i, step = progress.get(timeout=0.2)
            except queue.Empty:
                continue
            bar.update(step - done[i])
            done[i] = step
        results = [f.result() for f in futures]
    bar.update(sum(study.steps - d for d in done))  # progress still in flight when the last ensemble returned
    return results


_progress: Any = None  # a worker's queue of (chunk, step) for the bar in the parent


def _start_worker(threads: int, progress: Any) -> None:
    global _progress
    torch.set_num_threads(threads)
    _progress = progress


def _train_chunk(index: int, block: str, lr: float, members: list, study: CorrelationStudy, gate_seed: int | None):
    return train_ensemble(block, lr, members, study, lambda step: _progress.put((index, step)), gate_seed)


class AtEvaluation(Callback):
    """Calls ``report(step)`` at each evaluation (progress of an ensemble trained in another process)."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self.report = report

    def on_evaluate(self, step: int, records: list[dict | None]) -> None:
        self.report(step)


class FinalTest(Callback):
    """Scores ``test`` with the weights of the last step, at the loop's last evaluation (before it restores each
    run's best weights): the final loss the paper's Fig. 5 plots."""

    def __init__(self, ensemble: Ensemble, test: EnsembleData) -> None:
        self.ensemble, self.test = ensemble, test
        self.total_steps = 0
        self.metrics: list[dict] | None = None

    def on_train_begin(self, info: dict) -> None:
        self.total_steps = info["total_steps"]

    def on_evaluate(self, step: int, records: list[dict | None]) -> None:
        if step == self.total_steps:
            self.metrics = self.ensemble.evaluate(self.test)


def train_ensemble(
    block: str,
    lr: float,
    members: list[tuple[float, int]],
    study: CorrelationStudy,
    on_eval: Callable[[int], None] | None = None,
    gate_seed: int | None = None,
) -> dict:
    """One ensemble: member r trains on run ``members[r] = (correlation, seed)``; per-member results."""
    train, valid, test = synthetic_splits(members, study)
    ensemble = Ensemble(paper_model(block), [seed for _, seed in members], study.device)
    final = FinalTest(ensemble, test)
    callbacks = [final] + ([] if on_eval is None else [AtEvaluation(on_eval)])
    result = ensemble.fit(train, valid, train_config(study, lr), callbacks=callbacks)
    test_metrics = ensemble.evaluate(test)
    label_var = train.labels.var(dim=1).mean(-1).tolist()  # (R,) the draw's label variance, mean of the tasks
    gates = {}
    for r, (p, seed) in enumerate(members):
        if seed == gate_seed and block in GATED:
            _, weights = predict_batches(ensemble.member(r), test.member(r), with_gates=True)
            gates[f"{MODEL_LABELS[block]} p={p:g}"] = gate_report(weights, [t.name for t in SYNTHETIC_TASKS])
    return {
        "steps": [h["step"] for h in result.history[0]],
        "members": [
            {
                "seeds": seed,  # a setting's lists: one entry per run
                "curves": [h["valid/loss"] for h in result.history[r]],
                "valid_loss": result.best_metrics[r].get("loss", float("nan")),
                "test": test_metrics[r],
                "test_loss": test_metrics[r]["loss"],  # weights of the best validation step
                "final_test_loss": final.metrics[r]["loss"],  # weights after the last step
                "label_var": label_var[r],
                "best_step": result.best_step[r],
            }
            for r, (_, seed) in enumerate(members)
        ],
        "ensemble": {"block": block, "lr": lr, "members": [list(m) for m in members], "seconds": result.seconds},
        "gate_reports": gates,
    }


def pick_learning_rates(study: CorrelationStudy, progress: bool = True) -> dict:
    """``{"block@p": {"lr": best, "valid": {lr: mean validation loss}}}`` over ``lr_search_seeds`` runs each."""
    settings = [(b, p, lr) for p in study.correlations for b in study.blocks for lr in study.learning_rates]
    seeds = [SEED_STRIDE + s for s in range(study.lr_search_seeds)]
    trained = train_runs(settings, seeds, study, "learning-rate search", progress)
    search: dict = {}
    for (block, p, lr), run in trained["runs"].items():
        entry = search.setdefault(f"{block}@{p:g}", {"valid": {}})
        entry["valid"][f"{lr:g}"] = float(np.nanmean(run["valid_loss"]))
    for entry in search.values():
        entry["lr"] = float(min(entry["valid"], key=entry["valid"].get))
    return search


def choose_learning_rates(study: CorrelationStudy, progress: bool = True) -> tuple[dict | None, dict[str, float]]:
    """The search (None with one learning rate) and ``{"block@p": lr}``."""
    if len(study.learning_rates) == 1:
        return None, {f"{b}@{p:g}": study.learning_rates[0] for b in study.blocks for p in study.correlations}
    search = pick_learning_rates(study, progress)
    return search, {key: entry["lr"] for key, entry in search.items()}


def check_claims(runs: dict, blocks: list[str], correlations: list[float], n_boot: int = 10_000) -> list[dict]:
    """The paper's Fig. 4 claims that the study can decide. ``runs["block@p"]["test_loss"]``: one test loss per
    seed; run r of every model and correlation has seed r, so models pair up run by run (the same data draw).

    Each claim: ``holds`` (on the means), ``resolved`` (its 95% paired-bootstrap interval over the seeds
    excludes no-difference, or for the "~" claim lies within the 10% band; never with fewer than
    ``MIN_PAIRS`` seeds) and ``status``: ``holds``, ``holds on the means, within noise``, ``does not
    hold on the means, within noise`` or ``does not hold``.
    """
    losses = {b: np.array([runs[f"{b}@{p:g}"]["test_loss"] for p in correlations]) for b in blocks}  # [P, seeds]
    strata = np.repeat(np.arange(len(correlations)), losses[blocks[0]].shape[1])
    claims = []

    enough = losses[blocks[0]].shape[1] >= MIN_PAIRS

    def claim(text: str, holds: bool, resolved: bool, numbers: str, interval: tuple[float, float]) -> None:
        resolved = resolved and enough
        status = ("holds" if holds else "does not hold") + ("" if resolved else " on the means, within noise")
        claims.append(
            {
                "claim": text,
                "holds": bool(holds),
                "resolved": bool(resolved),
                "status": status,
                "numbers": numbers,
                "interval": [float(interval[0]), float(interval[1])],
            }
        )

    def paired(a: np.ndarray, b: np.ndarray) -> dict:
        return paired_bootstrap(a.ravel(), b.ravel(), strata=strata, n_boot=n_boot)

    three = {"mmoe", "omoe", "shared_bottom"} <= set(blocks)
    if three and len(correlations) > 1:
        seeds = losses["mmoe"].shape[1]
        draws = np.random.default_rng(0).integers(0, seeds, size=(n_boot, seeds))  # seeds resampled jointly
        point = {b: float(np.ptp(losses[b].mean(-1))) for b in blocks}  # max - min of the mean over correlations
        low, high = np.quantile(_spread_boot(losses, draws), [0.025, 0.975])
        numbers = ", ".join(f"{MODEL_LABELS[b]} {point[b]:.4f}" for b in blocks)
        claim(
            "MMoE's loss changes least across correlations",
            point["mmoe"] <= min(point["omoe"], point["shared_bottom"]),
            high < 0 or low > 0,
            f"max-min of mean test loss over correlations: {numbers}; MMoE minus the smaller other: 95% interval "
            f"[{low:+.4f}, {high:+.4f}]",
            (low, high),
        )
    if three:
        numbers = ", ".join(f"{MODEL_LABELS[b]} {losses[b].mean():.4f}" for b in blocks)
        tests = [paired(losses["shared_bottom"], losses[m]) for m in ("omoe", "mmoe")]
        text = "; ".join(
            f"Shared-Bottom − {MODEL_LABELS[m]} [{t['low']:+.4f}, {t['high']:+.4f}]"
            for m, t in zip(("omoe", "mmoe"), tests)
        )
        claim(
            "both MoE models beat Shared-Bottom on average",
            all(t["estimate"] > 0 for t in tests),
            all(t["low"] > 0 or t["high"] < 0 for t in tests),
            f"mean test loss over correlations: {numbers}; {text}",
            (min(t["low"] for t in tests), max(t["high"] for t in tests)),
        )
    if {"mmoe", "omoe"} <= set(blocks):
        at = {p: i for i, p in enumerate(correlations)}
        if 1.0 in at:
            m, o = losses["mmoe"][at[1.0]], losses["omoe"][at[1.0]]
            t = paired_bootstrap(m, o, n_boot=n_boot)
            band = 0.1 * max(m.mean(), o.mean())
            claim(
                "MMoE ~ OMoE at correlation 1 (within 10%)",
                abs(t["estimate"]) <= band,
                (-band <= t["low"] and t["high"] <= band) or t["low"] > band or t["high"] < -band,
                f"MMoE {m.mean():.4f}, OMoE {o.mean():.4f}; MMoE − OMoE [{t['low']:+.4f}, {t['high']:+.4f}], "
                f"band ±{band:.4f}",
                (t["low"], t["high"]),
            )
        if 0.5 in at:
            m, o = losses["mmoe"][at[0.5]], losses["omoe"][at[0.5]]
            t = paired_bootstrap(o, m, n_boot=n_boot)
            claim(
                "OMoE worse than MMoE at correlation 0.5",
                t["estimate"] > 0,
                t["low"] > 0 or t["high"] < 0,
                f"MMoE {m.mean():.4f}, OMoE {o.mean():.4f}; OMoE − MMoE [{t['low']:+.4f}, {t['high']:+.4f}]",
                (t["low"], t["high"]),
            )
    return claims


def _spread_boot(losses: dict, draws: np.ndarray) -> np.ndarray:
    """Bootstrap of (MMoE's spread of mean loss over correlations) minus the smaller of the others', the seeds
    resampled jointly (``draws [B, seeds]``) so every model and correlation keeps its pairs."""

    def spread(block: str) -> np.ndarray:
        means = losses[block][:, draws].mean(-1)  # [P, B]
        return means.max(0) - means.min(0)

    return spread("mmoe") - np.minimum(spread("omoe"), spread("shared_bottom"))


def plot_correlation_curves(runs: dict, path: Path) -> None:
    """Fig. 4's panels from a study's ``runs``: per correlation, the mean validation-loss curve of each model with
    the 95% confidence interval of that mean (a ±std band of these heavy-tailed runs would cover every curve and
    say nothing about the means the claims compare)."""
    curves: dict = {}
    order = list(MODEL_LABELS)  # panels by falling correlation (the paper's order), models in a fixed order
    for run in sorted(runs.values(), key=lambda r: (-r["correlation"], order.index(r["block"]))):
        panel = curves.setdefault(f"correlation {run['correlation']:g}", {})
        panel[MODEL_LABELS[run["block"]]] = (run["steps"], run["curves"])
    plot_curves(path, curves, ylabel="validation MSE (mean of 2 tasks)", band="ci95")


def recheck_claims(out: Path) -> list[dict]:
    """The claims of an earlier study (``out/results.json``) checked again by :func:`check_claims`; written to
    ``out/claims.json`` and ``out/claims.md`` (a study's own report has them since the check has intervals)."""
    runs = json.loads((Path(out) / "results.json").read_text())["runs"]
    blocks = [b for b in MODEL_LABELS if any(r["block"] == b for r in runs.values())]
    correlations = sorted({r["correlation"] for r in runs.values()}, reverse=True)
    claims = check_claims(runs, blocks, correlations)
    seeds = len(next(iter(runs.values()))["test_loss"])
    write_results(
        Path(out),
        {"claims": claims},
        f"# The paper's claims, rechecked with intervals ({seeds} runs per setting)\n\n"
        + "\n".join(f"- {c['status']}: {c['claim']} ({c['numbers']})" for c in claims)
        + "\n\n95% paired bootstrap intervals over the seeds (run r of every model has seed r's data draw), "
        "by `mtrank.experiments.correlation.recheck_claims`.\n",
        stem="claims",
    )
    return claims


def replot_correlation(out: Path) -> None:
    """Redraw ``out/loss_curves.png`` from ``out/results.json`` of an earlier correlation study."""
    runs = json.loads((Path(out) / "results.json").read_text())["runs"]
    plot_correlation_curves(runs, Path(out) / "loss_curves.png")


def run_correlation(study: CorrelationStudy, out: Path, progress: bool = True) -> dict:
    """The study: learning rates (searched if several), ``study.seeds`` runs per (model, correlation); tables,
    claims, curves and gates written to ``out``. Returns the summary (``results.json``) with ``markdown``."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    search, lrs = choose_learning_rates(study, progress)
    settings = [(b, p, lrs[f"{b}@{p:g}"]) for p in study.correlations for b in study.blocks]
    trained = train_runs(settings, list(range(study.seeds)), study, "correlation study", progress, gate_seed=0)
    runs = {f"{b}@{p:g}": run for (b, p, _), run in trained["runs"].items()}
    table = {b: {p: float(np.mean(runs[f"{b}@{p:g}"]["test_loss"])) for p in study.correlations} for b in study.blocks}
    gate_reports = {  # by falling correlation, OMoE before MMoE
        key: trained["gate_reports"][key]
        for p in study.correlations
        for b in study.blocks
        if (key := f"{MODEL_LABELS[b]} p={p:g}") in trained["gate_reports"]
    }
    summary = {
        "study": dataclasses.asdict(study),
        "lr_search": search,
        "runs": runs,
        "table": table,
        "claims": check_claims(runs, study.blocks, study.correlations),
        "gate_reports": gate_reports,
        "ensembles": trained["ensembles"],
        "seconds": time.perf_counter() - started,
    }
    plot_correlation_curves(runs, out / "loss_curves.png")
    if gate_reports:
        names = [t.name for t in SYNTHETIC_TASKS]
        heatmaps = {
            k: (np.array([r["tasks"][t]["utilisation"] for t in names]), names) for k, r in gate_reports.items()
        }
        plot_gate_heatmaps(out / "gate_heatmaps.png", heatmaps)
    return write_results(out, summary, correlation_report(summary))


def correlation_report(summary: dict) -> str:
    """``results.md`` from a study's summary: numbers only (no timings), so a rerun writes the same bytes."""
    study = CorrelationStudy(**summary["study"])
    tasks = [t.name for t in SYNTHETIC_TASKS]
    rows = []
    for p in study.correlations:
        for b in study.blocks:
            run = summary["runs"][f"{b}@{p:g}"]
            per_task = [fmt_mean_std([m[f"mse/{t}"] for m in run["test"]]) for t in tasks]
            rows.append([f"{p:g}", MODEL_LABELS[b], f"{run['params']:,}", f"{run['lr']:g}", *per_task])
            rows[-1].append(fmt_mean_std(run["test_loss"]))
    header = ["correlation", "model", "params", "lr", *[f"test MSE {t}" for t in tasks], "test MSE, mean of tasks"]
    lr_text = f"Adam lr {study.learning_rates[0]:g}"
    if summary["lr_search"]:
        lr_text = "Adam, lr picked per setting (below)"
    text = (
        f"# Correlation study (Ma et al. 2018, Fig. 4)\n\n{study.seeds} runs per setting, mean ± std; run r has "
        f"its own synthetic draw, initialisation and batch order (seed r). {study.steps} steps of batch "
        f"{study.batch_size}, {lr_text}; weights of the best validation step (evaluated every "
        f"{study.eval_every} steps).\n\n{markdown_table(header, rows)}\n\n"
    )
    if summary["lr_search"]:
        text += _search_section(summary["lr_search"], study)
    if summary["claims"]:
        claims = "\n".join(f"- {c['status']}: {c['claim']} ({c['numbers']})" for c in summary["claims"])
        text += (
            f"## The paper's claims\n\n{claims}\n\nEach claim is checked on the means and by a 95% paired "
            f"bootstrap interval over the {study.seeds} seeds (run r of every model has seed r's data draw); "
            "'within noise': the means point that way but the interval does not exclude the opposite (with fewer "
            f"than {MIN_PAIRS} seeds every claim is within noise: such an interval is too narrow).\n\n"
        )
    text += (
        "![loss curves](loss_curves.png)\n\nCurves: mean validation MSE over the runs; band: 95% confidence "
        "interval of that mean.\n"
    )
    if summary["gate_reports"]:
        gates = "\n\n".join(f"{key}\n{format_gate_report(r)}" for key, r in summary["gate_reports"].items())
        text += f"\n## Gates (test split, seed 0)\n\n```\n{gates}\n```\n\n![gate heatmaps](gate_heatmaps.png)\n"
    return text


def _search_section(search: dict, study: CorrelationStudy) -> str:
    rows = []
    for key, entry in search.items():
        block, p = key.split("@")
        rows.append([p, MODEL_LABELS[block], *[f"{entry['valid'][f'{lr:g}']:.4f}" for lr in study.learning_rates]])
        rows[-1].append(f"{entry['lr']:g}")
    header = ["correlation", "model", *[f"valid @ lr {lr:g}" for lr in study.learning_rates], "picked"]
    return (
        f"## Learning-rate search ({study.lr_search_seeds} runs each, mean validation MSE)\n\n"
        f"{markdown_table(header, rows)}\n\n"
    )
