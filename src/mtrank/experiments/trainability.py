"""Trainability (Ma et al. KDD 2018, Fig. 5): the spread of the final test loss over many independent runs.

The correlation study's runs (:mod:`mtrank.experiments.correlation`: same splits, ensembles and learning rates)
with seeds ``2 * SEED_STRIDE + s``, ``study.seeds`` (200) per (model, correlation); histograms of the test loss
after the last step (the paper's "final loss") beside the test loss at each run's best validation step, a table
of both (mean, std, median, 90th percentile, failed fits) and their rank correlation with the label variance.
The first run of the last setting is also trained alone with :class:`~mtrank.train.Trainer`, to check the
ensemble against it and to time the speed-up.
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
from mtrank.stats import far_outliers, paired_bootstrap, spearman
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
    runs = {f"{b}@{p:g}": with_statistics(run) for (b, p, _), run in trained["runs"].items()}
    block, p = settings[-1][:2]
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
    return write_report(out, summary)


def with_statistics(run: dict) -> dict:
    """A setting's runs with their statistics: of the final loss and the best step's, failed fits, and the rank
    correlation of each with the label variance of the runs' draws."""
    final, best = run["final_test_loss"], run["test_loss"]
    tail = {
        "final": int(far_outliers(final).sum()),
        "best": int(far_outliers(best).sum()),
        "label_var_rank_correlation": {
            "final": spearman(run["label_var"], final),
            "best": spearman(run["label_var"], best),
        },
    }
    return {**run, "stats": run_stats(best), "final_stats": run_stats(final), "tail": tail}


def write_report(out: Path, summary: dict) -> dict:
    """The claims, table, histograms and ``results.md`` of a trainability summary (also of an earlier run's
    ``results.json``, through :func:`rewrite_trainability`)."""
    study = CorrelationStudy(**summary["study"])
    runs = summary["runs"]
    summary["claims"] = {k: trainability_claims(runs, k) for k in ("final_test_loss", "test_loss")}
    panels, rows = {}, []
    for run in runs.values():
        block, p, final, best, tail = run["block"], run["correlation"], run["final_stats"], run["stats"], run["tail"]
        panels.setdefault(f"p = {p:g}: final (step {study.steps:,})", {})[MODEL_LABELS[block]] = run["final_test_loss"]
        panels.setdefault(f"p = {p:g}: best validation step", {})[MODEL_LABELS[block]] = run["test_loss"]
        cells = [f"{final[k]:.4f}" for k in ("mean", "std", "median", "p90")] + [str(tail["final"])]
        cells += [f"{best[k]:.4f}" for k in ("mean", "std", "median", "p90")] + [str(tail["best"])]
        rho = tail["label_var_rank_correlation"]
        rows.append(
            [f"{p:g}", MODEL_LABELS[block], f"{run['lr']:g}", *cells, f"{rho['final']:.2f} / {rho['best']:.2f}"]
        )
    header = ["correlation", "model", "lr"]
    header += [f"final: {k}" for k in ("mean", "std", "median", "p90", "failed fits")]
    header += [f"best step: {k}" for k in ("mean", "std", "median", "p90", "failed fits")]
    table = markdown_table([*header, "rank corr. with label variance (final / best)"], rows)
    plot_histograms(
        out / "trainability.png",
        panels,
        xlabel=f"test MSE ({study.seeds} runs each; last bin: above the 99th pct)",
        columns=2,
    )
    return write_results(out, summary, trainability_report(summary, table))


def recheck_trainability_claims(out: Path) -> dict:
    """The Fig. 5 claims of an earlier run (``out/results.json``), on whichever losses it kept (runs made before
    the final loss was recorded have only the best step's), written to ``out/claims.json`` and ``claims.md``."""
    runs = json.loads((Path(out) / "results.json").read_text())["runs"]
    keys = [k for k in ("final_test_loss", "test_loss") if all(k in r for r in runs.values())]
    claims = {k: trainability_claims(runs, k) for k in keys}
    label = {"final_test_loss": "final loss", "test_loss": "best-step loss"}
    lines = [f"- {label[k]}: {c['status']}: {c['claim']} ({c['numbers']})" for k in keys for c in claims[k]]
    text = (
        "# The paper's trainability claims, rechecked with intervals\n\n" + "\n".join(lines) + "\n\n95% paired "
        "bootstrap over the seeds of the first model's minus the second's std and 90th percentile, by "
        "`mtrank.experiments.trainability.recheck_trainability_claims`.\n"
    )
    return write_results(Path(out), {"claims": claims}, text, stem="claims")


def rewrite_trainability(out: Path) -> dict:
    """Rewrite ``out``'s claims, table, figure and report from its ``results.json`` (no training)."""
    summary = json.loads((Path(out) / "results.json").read_text())
    summary["runs"] = {key: with_statistics(run) for key, run in summary["runs"].items()}
    return write_report(Path(out), summary)


def trainability_claims(runs: dict, key: str = "final_test_loss", n_boot: int = 10_000) -> list[dict]:
    """The paper's Fig. 5 claims, each decided by 95% paired-bootstrap intervals of the difference in spread
    (std and 90th percentile of ``key``) between two models over the same seeds (run r of every model has seed
    r's data). ``runs["block@p"][key]``: one loss per seed."""
    claims = []
    correlations = sorted({r["correlation"] for r in runs.values()}, reverse=True)

    def spread(a: str, b: str, p: float) -> dict:
        x, y = runs[f"{a}@{p:g}"][key], runs[f"{b}@{p:g}"][key]
        return {s: paired_bootstrap(x, y, s, n_boot=n_boot) for s in ("std", "p90")}

    def add(text: str, p: float, tests: list[dict], want: str) -> None:
        intervals = [t[s] for t in tests for s in ("std", "p90")]
        above = all(i["low"] > 0 for i in intervals)
        if want == "larger":
            status = "holds" if above else "does not hold" if any(i["high"] < 0 for i in intervals) else "within noise"
        else:  # "no difference": only its opposite can be resolved
            status = "does not hold" if any(i["low"] > 0 or i["high"] < 0 for i in intervals) else "no difference found"
        numbers = "; ".join(f"{s} [{i['low']:+.4f}, {i['high']:+.4f}]" for s, i in zip(("std", "p90") * 2, intervals))
        claims.append({"claim": text, "correlation": p, "status": status, "numbers": numbers})

    blocks = {r["block"] for r in runs.values()}
    for p in correlations:
        if {"shared_bottom", "omoe", "mmoe"} <= blocks:
            tests = [spread("shared_bottom", m, p) for m in ("omoe", "mmoe")]
            add(f"p = {p:g}: Shared-Bottom's losses spread more than OMoE's and MMoE's", p, tests, "larger")
        if {"omoe", "mmoe"} <= blocks and p == 1.0:
            add("p = 1: OMoE as robust as MMoE", p, [spread("omoe", "mmoe", p)], "no difference")
        elif {"omoe", "mmoe"} <= blocks:
            add(f"p = {p:g}: OMoE's losses spread more than MMoE's", p, [spread("omoe", "mmoe", p)], "larger")
    return claims


def claims_text(claims: dict) -> str:
    """The claims on the final loss and on the best step's, with their intervals (A minus B: std, p90)."""
    lines = []
    for key, label in (("final_test_loss", "final loss"), ("test_loss", "best-step loss")):
        lines += [f"- {label}: {c['status']}: {c['claim']} ({c['numbers']})" for c in claims[key]]
    return "\n".join(lines) + (
        "\n\nIntervals: 95% paired bootstrap over the seeds of the first model's minus the second's std and 90th "
        "percentile (for Shared-Bottom, against OMoE then MMoE)."
    )


def trainability_report(summary: dict, table: str) -> str:
    study, e = CorrelationStudy(**summary["study"]), summary["equivalence"]
    params = ", ".join(f"{MODEL_LABELS[b]} {n:,}" for b, n in summary["params"].items())
    side_by_side = ""
    if study.workers != 1 and len(summary["ensembles"]) > 1:
        side_by_side = " The ensemble trained beside others in worker processes (`--workers 1` for a clean timing)."
    return (
        "# Trainability (Ma et al. 2018, Fig. 5)\n\n"
        f"Test MSE (mean of the two tasks) of {study.seeds} independent runs per setting, each with fresh data and "
        f"initialisation; {study.steps} steps of batch {study.batch_size}, validation every {study.eval_every} "
        f"steps. **final**: the weights after the last step, as the paper's Fig. 5 plots; **best step**: the "
        f"weights of each run's best validation step. Failed fits: runs above Q3 + 3 IQR of their setting "
        f"(Tukey's far-out values). Rank correlation: Spearman's, between a run's test MSE and the variance of "
        f"its draw's training labels. Parameters: {params}.\n\n{table}\n\n![histograms](trainability.png)\n\n"
        f"## The paper's claims\n\n{claims_text(summary['claims'])}\n\n"
        f"## Ensemble vs. single runs\n\nRun 0 of a {e['ensemble_size']}-run ensemble ({MODEL_LABELS[e['block']]}, "
        f"correlation {e['correlation']:g}) vs. the same seed trained alone with `Trainer`: test MSE "
        f"{e['member_test_loss']:.6f} vs {e['single_test_loss']:.6f} (|diff| {e['abs_diff']:.2e}), best step "
        f"{e['member_best_step']} vs {e['single_best_step']}. Training time (same machine, same evaluation "
        f"schedule): {e['ensemble_seconds']:.1f} s for all {e['ensemble_size']} runs vs "
        f"{e['single_seconds']:.1f} s for one: {e['time_ratio']:.1f}x the time of "
        f"one run (sequential runs: {e['ensemble_size']}x).{side_by_side}\n"
    )
