"""Trainability (Ma et al. KDD 2018, Fig. 5): the spread of the final test loss over many independent runs.

The correlation study's runs (:mod:`mtrank.experiments.correlation`: same splits, ensembles and learning rates)
with seeds ``2 * SEED_STRIDE + s``, ``study.seeds`` (200) per (model, correlation); histograms of the final test
loss and a table of mean, std, min and 90th percentile. The first run of the last setting is also trained alone
with :class:`~mtrank.train.Trainer`, to check the ensemble against it and to time the speed-up.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from mtrank.evaluate.metrics import evaluate
from mtrank.evaluate.report import markdown_table, plot_histograms
from mtrank.experiments.common import MODEL_LABELS, paper_model, run_stats, write_results
from mtrank.experiments.correlation import (
    SEED_STRIDE,
    CorrelationStudy,
    choose_learning_rates,
    synthetic_splits,
    train_config,
    train_runs,
)
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.train.trainer import Trainer


def load_learning_rates(path: Path) -> dict[str, float]:
    """``{"block@p": lr}`` from a correlation study's ``results.json`` (searched or single)."""
    data = json.loads(Path(path).read_text())
    return {key: run["lr"] for key, run in data["runs"].items()}


def check_equivalence(run: dict, ensemble: dict, study: CorrelationStudy) -> dict:
    """Train run 0 of ``run`` (one setting's runs) alone with :class:`Trainer`; compare test loss, best step, time."""
    seed = run["seeds"][0]
    train, valid, test = (part.member(0) for part in synthetic_splits([(run["correlation"], seed)], study))
    start = time.perf_counter()
    model = MultiTaskModel(paper_model(run["block"]), seed=seed)
    single = Trainer(model, train_config(study, run["lr"], seed=seed)).fit(train, valid)
    single_seconds = time.perf_counter() - start
    single_test = evaluate(model, test)["loss"]
    return {
        "block": run["block"],
        "correlation": run["correlation"],
        "ensemble_size": len(ensemble["members"]),
        "single_test_loss": single_test,
        "member_test_loss": run["test_loss"][0],
        "abs_diff": abs(single_test - run["test_loss"][0]),
        "single_best_step": single.best_step,
        "member_best_step": run["best_step"][0],
        "single_seconds": single_seconds,
        "ensemble_seconds": ensemble["seconds"],
        "time_ratio": ensemble["seconds"] / single_seconds,
    }


def run_trainability(
    study: CorrelationStudy, out: Path, lrs: dict[str, float] | None = None, progress: bool = True
) -> dict:
    """Fig. 5: ``study.seeds`` runs per (model, correlation) at the study's learning rates (``lrs``, else searched
    as the correlation study does, with the same seeds and data, so the same picks); histograms and statistics."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lr_search = None
    if lrs is None:
        lr_search, lrs = choose_learning_rates(study, progress)
    settings = [(b, p, lrs.get(f"{b}@{p:g}", 1e-3)) for p in study.correlations for b in study.blocks]
    seeds = [2 * SEED_STRIDE + s for s in range(study.seeds)]
    trained = train_runs(settings, seeds, study, f"trainability x{study.seeds}", progress)
    runs, panels, rows = {}, {}, []
    for (block, p, lr), run in trained["runs"].items():
        stats = run_stats(run["test_loss"])
        runs[f"{block}@{p:g}"] = {**run, "stats": stats}
        panels.setdefault(f"correlation {p:g}", {})[MODEL_LABELS[block]] = run["test_loss"]
        cells = [f"{stats[k]:.4f}" for k in ("mean", "std", "min", "p90")]
        rows.append([f"{p:g}", MODEL_LABELS[block], f"{lr:g}", *cells])
    table = markdown_table(["correlation", "model", "lr", "mean", "std", "min", "p90"], rows)
    plot_histograms(out / "trainability.png", panels, xlabel=f"final test MSE ({study.seeds} runs each)")
    last = runs[f"{block}@{p:g}"]  # the last setting trained: its first run is trained again alone
    ensemble = next(e for e in trained["ensembles"] if [p, seeds[0]] in e["members"] and e["block"] == block)
    equivalence = check_equivalence(last, ensemble, study)
    params = {b: count_parameters(MultiTaskModel(paper_model(b))) for b in study.blocks}
    summary = {
        "study": dataclasses.asdict(study),
        "runs": runs,
        "equivalence": equivalence,
        "lrs": lrs,
        "lr_search": lr_search,
        "params": params,
        "ensembles": trained["ensembles"],
        "seconds": time.perf_counter() - started,
    }
    return write_results(out, summary, trainability_report(summary, table))


def trainability_report(summary: dict, table: str) -> str:
    study, e = CorrelationStudy(**summary["study"]), summary["equivalence"]
    params = ", ".join(f"{MODEL_LABELS[b]} {n:,}" for b, n in summary["params"].items())
    side_by_side = ""
    if study.workers != 1 and len(summary["ensembles"]) > 1:
        side_by_side = " The ensemble trained beside others in worker processes (`--workers 1` for a clean timing)."
    return (
        "# Trainability (Ma et al. 2018, Fig. 5)\n\n"
        f"Final test MSE (mean of the two tasks, weights of the best validation step) of {study.seeds} independent "
        f"runs per setting, each with fresh data and initialisation; {study.steps} steps of batch "
        f"{study.batch_size}. Parameters: {params}.\n\n{table}\n\n![histograms](trainability.png)\n\n"
        f"## Ensemble vs. single runs\n\nRun 0 of a {e['ensemble_size']}-run ensemble ({MODEL_LABELS[e['block']]}, "
        f"correlation {e['correlation']:g}) vs. the same seed trained alone with `Trainer`: test MSE "
        f"{e['member_test_loss']:.6f} vs {e['single_test_loss']:.6f} (|diff| {e['abs_diff']:.2e}), best step "
        f"{e['member_best_step']} vs {e['single_best_step']}. Training time (same machine, same evaluation "
        f"schedule): {e['ensemble_seconds']:.1f} s for all {e['ensemble_size']} runs vs "
        f"{e['single_seconds']:.1f} s for one: {e['time_ratio']:.1f}x the time of "
        f"one run (sequential runs: {e['ensemble_size']}x).{side_by_side}\n"
    )
