"""Ma et al. (KDD 2018) on synthetic data: the correlation study (Fig. 4) and trainability (Fig. 5).

Both train many independent runs per (model, correlation) as one :class:`~mtrank.train.ensemble.Ensemble`:
run r gets a fresh synthetic draw (data seed ``base + r``) and its own initialisation and batch order.

* Correlation study: for each (model, correlation) the learning rate is picked from ``{1e-4, 1e-3, 1e-2}``
  on the mean validation loss of a few runs, then ``seeds`` runs at that rate give the loss curves (mean ± std
  band) and the test-loss table; the paper's claims are checked on those numbers.
* Trainability: ``seeds`` (200) runs per (model, correlation) at the chosen rates; histograms of the final
  test loss and a table of mean, std, min and 90th percentile. The first run is also trained alone with
  :class:`~mtrank.train.Trainer` to check the ensemble against it and to time the speed-up.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mtrank.config import TrainConfig
from mtrank.data.synthetic import SyntheticConfig, make_synthetic
from mtrank.evaluate.metrics import evaluate
from mtrank.evaluate.report import markdown_table, plot_curves, plot_histograms, write_json
from mtrank.experiments.synthetic import MODEL_LABELS, paper_model
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.train.ensemble import Ensemble, EnsembleData
from mtrank.train.trainer import Trainer

LEARNING_RATES = (1e-4, 1e-3, 1e-2)
SEED_STRIDE = 100_000  # data/init seeds of the lr search, the study and trainability never overlap


@dataclass
class SyntheticPaperConfig:
    """Sizes and budget of the synthetic reproductions (the paper gives only d and the model sizes)."""

    blocks: list[str] = field(default_factory=lambda: ["shared_bottom", "omoe", "mmoe"])
    correlations: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.5, 0.0])
    seeds: int = 20
    lr_search_seeds: int = 4
    learning_rates: list[float] = field(default_factory=lambda: list(LEARNING_RATES))
    n_train: int = 10_000
    n_valid: int = 2_000
    n_test: int = 2_000
    steps: int = 2_000
    batch_size: int = 128
    eval_every: int = 100
    device: str = "cpu"

    @classmethod
    def quick(cls) -> SyntheticPaperConfig:
        return cls(
            correlations=[1.0, 0.5],
            seeds=3,
            lr_search_seeds=2,
            n_train=600,
            n_valid=200,
            n_test=200,
            steps=40,
            batch_size=64,
            eval_every=20,
        )


def ensemble_splits(correlation: float, data_seeds: list[int], cfg: SyntheticPaperConfig):
    """Per-run train / validation / test splits, stacked: ``EnsembleData`` with a leading run dimension."""
    n = cfg.n_train + cfg.n_valid + cfg.n_test
    parts = [make_synthetic(SyntheticConfig(n=n, correlation=correlation, seed=s)) for s in data_seeds]
    a, b = cfg.n_train, cfg.n_train + cfg.n_valid
    return (
        EnsembleData.stack([p[:a] for p in parts]),
        EnsembleData.stack([p[a:b] for p in parts]),
        EnsembleData.stack([p[b:] for p in parts]),
    )


def train_config(cfg: SyntheticPaperConfig, lr: float, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        lr=lr,
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        eval_every=cfg.eval_every,
        seed=seed,
        device=cfg.device,
        progress=False,
    )


def run_ensemble(block: str, correlation: float, lr: float, seeds: list[int], cfg: SyntheticPaperConfig) -> dict:
    """Train ``len(seeds)`` runs (data, init, shuffle seed = ``seeds[r]``); per-run curves, test losses."""
    train, valid, test = ensemble_splits(correlation, seeds, cfg)
    ensemble = Ensemble(paper_model(block), seeds, cfg.device)
    result = ensemble.fit(train, valid, train_config(cfg, lr))
    test_metrics = ensemble.evaluate(test)
    return {
        "steps": [h["step"] for h in result.history[0]],
        "curves": [[h["valid/loss"] for h in hist] for hist in result.history],
        "valid_loss": [m["loss"] for m in result.best_metrics],
        "test_loss": [m["loss"] for m in test_metrics],
        "best_step": result.best_step,
        "seconds": result.seconds,
    }


def pick_learning_rates(cfg: SyntheticPaperConfig, progress: bool = True) -> dict:
    """``{"block@p": {"lr": best, "valid": {lr: mean validation loss}}}`` over ``lr_search_seeds`` runs."""
    jobs = [(b, p, lr) for p in cfg.correlations for b in cfg.blocks for lr in cfg.learning_rates]
    search: dict = {}
    seeds = [SEED_STRIDE + s for s in range(cfg.lr_search_seeds)]
    for block, correlation, lr in tqdm(jobs, desc="learning-rate search", disable=not progress, unit="grid"):
        runs = run_ensemble(block, correlation, lr, seeds, cfg)
        entry = search.setdefault(f"{block}@{correlation:g}", {"valid": {}})
        entry["valid"][f"{lr:g}"] = float(np.nanmean(runs["valid_loss"]))
    for entry in search.values():
        entry["lr"] = float(min(entry["valid"], key=entry["valid"].get))
    return search


def _stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "min": float(arr.min()),
        "p90": float(np.percentile(arr, 90)),
        "max": float(arr.max()),
        "n": arr.size,
    }


def check_claims(table: dict, blocks: list[str], correlations: list[float]) -> list[dict]:
    """The paper's Fig. 4 claims with the numbers that decide them; ``table[block][p]`` = mean test loss."""
    claims = []
    have = set(blocks)
    spread = {b: max(table[b].values()) - min(table[b].values()) for b in blocks}
    if {"mmoe", "omoe", "shared_bottom"} <= have and len(correlations) > 1:
        claims.append(
            {
                "claim": "MMoE's loss changes least across correlations",
                "holds": spread["mmoe"] <= min(spread["omoe"], spread["shared_bottom"]),
                "numbers": "max-min of mean test loss over correlations: "
                + ", ".join(f"{MODEL_LABELS[b]} {spread[b]:.4f}" for b in blocks),
            }
        )
    if {"mmoe", "omoe", "shared_bottom"} <= have:
        avg = {b: float(np.mean(list(table[b].values()))) for b in blocks}
        claims.append(
            {
                "claim": "both MoE models beat Shared-Bottom on average",
                "holds": max(avg["mmoe"], avg["omoe"]) < avg["shared_bottom"],
                "numbers": "mean test loss over correlations: "
                + ", ".join(f"{MODEL_LABELS[b]} {avg[b]:.4f}" for b in blocks),
            }
        )
    if {"mmoe", "omoe"} <= have and 1.0 in correlations:
        m, o = table["mmoe"][1.0], table["omoe"][1.0]
        claims.append(
            {
                "claim": "MMoE ~ OMoE at correlation 1 (within 10%)",
                "holds": abs(m - o) <= 0.1 * max(m, o),
                "numbers": f"MMoE {m:.4f}, OMoE {o:.4f}",
            }
        )
    if {"mmoe", "omoe"} <= have and 0.5 in correlations:
        m, o = table["mmoe"][0.5], table["omoe"][0.5]
        claims.append(
            {
                "claim": "OMoE worse than MMoE at correlation 0.5",
                "holds": o > m,
                "numbers": f"MMoE {m:.4f}, OMoE {o:.4f}",
            }
        )
    return claims


def plot_correlation_curves(runs: dict, path: Path) -> None:
    """Fig. 4's panels from a correlation study's ``runs``: per correlation, the mean validation-loss curve of
    each model with the 95% confidence interval of that mean (a ±std band of these heavy-tailed runs would
    cover every curve and say nothing about the means the claims compare)."""
    curves: dict = {}
    order = list(MODEL_LABELS)  # panels by falling correlation (the paper's order), models in a fixed order
    for run in sorted(runs.values(), key=lambda r: (-r["correlation"], order.index(r["block"]))):
        panel = curves.setdefault(f"correlation {run['correlation']:g}", {})
        panel[MODEL_LABELS[run["block"]]] = (run["steps"], run["curves"])
    plot_curves(path, curves, ylabel="validation MSE (mean of 2 tasks)", band="ci95")


def replot_correlation(out: Path) -> None:
    """Redraw ``out/loss_curves.png`` from ``out/results.json`` of an earlier correlation study."""
    runs = json.loads((Path(out) / "results.json").read_text())["runs"]
    plot_correlation_curves(runs, Path(out) / "loss_curves.png")


def run_correlation(cfg: SyntheticPaperConfig, out: Path, progress: bool = True) -> dict:
    """Fig. 4: learning-rate search, then ``cfg.seeds`` runs per (model, correlation); tables, curves."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    search = pick_learning_rates(cfg, progress)
    seeds = list(range(cfg.seeds))
    runs = {}
    jobs = [(b, p) for p in cfg.correlations for b in cfg.blocks]
    for block, correlation in tqdm(jobs, desc="correlation study", disable=not progress, unit="setting"):
        lr = search[f"{block}@{correlation:g}"]["lr"]
        result = run_ensemble(block, correlation, lr, seeds, cfg)
        runs[f"{block}@{correlation:g}"] = {"block": block, "correlation": correlation, "lr": lr, **result}

    table = {b: {p: float(np.mean(runs[f"{b}@{p:g}"]["test_loss"])) for p in cfg.correlations} for b in cfg.blocks}
    claims = check_claims(table, cfg.blocks, cfg.correlations)
    rows = []
    for p in cfg.correlations:
        for b in cfg.blocks:
            r = runs[f"{b}@{p:g}"]
            s = _stats(r["test_loss"])
            rows.append([f"{p:g}", MODEL_LABELS[b], f"{r['lr']:g}", f"{s['mean']:.4f} ± {s['std']:.4f}"])
    md_table = markdown_table(["correlation", "model", "lr (picked)", f"test MSE, mean ± std of {cfg.seeds}"], rows)
    lr_rows = [
        [
            k.split("@")[1],
            MODEL_LABELS[k.split("@")[0]],
            *[f"{v['valid'][f'{lr:g}']:.4f}" for lr in cfg.learning_rates],
            f"{v['lr']:g}",
        ]
        for k, v in search.items()
    ]
    lr_table = markdown_table(
        ["correlation", "model", *[f"valid @ lr {lr:g}" for lr in cfg.learning_rates], "picked"], lr_rows
    )
    claims_md = "\n".join(
        f"- {'holds' if c['holds'] else 'does NOT hold'}: {c['claim']} ({c['numbers']})" for c in claims
    )
    plot_correlation_curves(runs, out / "loss_curves.png")
    summary = {
        "config": dataclasses.asdict(cfg),
        "lr_search": search,
        "runs": runs,
        "table": table,
        "claims": claims,
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "results.json", summary)
    text = (
        f"# Correlation study (Ma et al. 2018, Fig. 4)\n\n{cfg.seeds} runs per setting (fresh data and "
        f"initialisation each), {cfg.steps} steps of batch {cfg.batch_size}, Adam; weights of the best "
        f"validation step.\n\n{md_table}\n\n## Learning-rate search ({cfg.lr_search_seeds} runs each, mean "
        f"validation MSE)\n\n{lr_table}\n\n## The paper's claims\n\n{claims_md}\n\n"
        "![loss curves](loss_curves.png)\n\nCurves: mean validation MSE over the runs; band: 95% confidence "
        "interval of that mean.\n"
    )
    (out / "results.md").write_text(text)
    summary["markdown"] = text
    return summary


def load_learning_rates(path: Path) -> dict[str, float]:
    """``{"block@p": lr}`` from a correlation study's ``results.json``."""
    data = json.loads(Path(path).read_text())
    return {k: v["lr"] for k, v in data["lr_search"].items()}


def check_equivalence(
    block: str, correlation: float, lr: float, seed: int, ensemble_run: dict, cfg: SyntheticPaperConfig
) -> dict:
    """Train run 0 of ``ensemble_run`` (seed ``seed``) alone with :class:`Trainer`; compare results, times."""
    train, valid, test = (part.member(0) for part in ensemble_splits(correlation, [seed], cfg))
    start = time.perf_counter()
    model = MultiTaskModel(paper_model(block), seed=seed)
    single = Trainer(model, train_config(cfg, lr, seed=seed)).fit(train, valid)
    single_seconds = time.perf_counter() - start
    single_test = evaluate(model, test)["loss"]
    member_test = ensemble_run["test_loss"][0]
    return {
        "block": block,
        "correlation": correlation,
        "ensemble_size": len(ensemble_run["test_loss"]),
        "single_test_loss": single_test,
        "member_test_loss": member_test,
        "abs_diff": abs(single_test - member_test),
        "single_best_step": single.best_step,
        "member_best_step": ensemble_run["best_step"][0],
        "single_seconds": single_seconds,
        "ensemble_seconds": ensemble_run["seconds"],
        "time_ratio": ensemble_run["seconds"] / single_seconds,
    }


def run_trainability(
    cfg: SyntheticPaperConfig, out: Path, lrs: dict[str, float] | None = None, progress: bool = True
) -> dict:
    """Fig. 5: ``cfg.seeds`` runs per (model, correlation) as one ensemble each; histograms and statistics."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lr_search = None
    if lrs is None:  # the correlation study's search (same seeds and data, so the same picks)
        lr_search = pick_learning_rates(cfg, progress)
        lrs = {key: entry["lr"] for key, entry in lr_search.items()}
    seeds = [2 * SEED_STRIDE + s for s in range(cfg.seeds)]
    runs, panels = {}, {}
    jobs = [(b, p) for p in cfg.correlations for b in cfg.blocks]
    for block, correlation in tqdm(jobs, desc=f"trainability x{cfg.seeds}", disable=not progress, unit="setting"):
        lr = lrs.get(f"{block}@{correlation:g}", 1e-3)
        result = run_ensemble(block, correlation, lr, seeds, cfg)
        runs[f"{block}@{correlation:g}"] = {
            "block": block,
            "correlation": correlation,
            "lr": lr,
            "stats": _stats(result["test_loss"]),
            **result,
        }
        panels.setdefault(f"correlation {correlation:g}", {})[MODEL_LABELS[block]] = result["test_loss"]
    rows = []
    for r in runs.values():
        s = r["stats"]
        rows.append(
            [
                f"{r['correlation']:g}",
                MODEL_LABELS[r["block"]],
                f"{r['lr']:g}",
                f"{s['mean']:.4f}",
                f"{s['std']:.4f}",
                f"{s['min']:.4f}",
                f"{s['p90']:.4f}",
                f"{r['seconds']:.0f}",
            ]
        )
    table = markdown_table(["correlation", "model", "lr", "mean", "std", "min", "p90", "train s"], rows)
    plot_histograms(out / "trainability.png", panels, xlabel=f"final test MSE ({cfg.seeds} runs each)")
    last = runs[f"{block}@{correlation:g}"]  # the last setting trained: its run 0 is re-trained alone
    equivalence = check_equivalence(block, correlation, last["lr"], seeds[0], last, cfg)
    params = {b: count_parameters(MultiTaskModel(paper_model(b))) for b in cfg.blocks}
    summary = {
        "config": dataclasses.asdict(cfg),
        "runs": runs,
        "equivalence": equivalence,
        "lrs": lrs,
        "lr_search": lr_search,
        "params": params,
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "results.json", summary)
    e = equivalence
    text = (
        "# Trainability (Ma et al. 2018, Fig. 5)\n\n"
        f"Final test MSE (mean of the two tasks, weights of the best "
        f"validation step) of {cfg.seeds} independent runs per setting, each with fresh data and "
        f"initialisation; {cfg.steps} steps of batch {cfg.batch_size}. Parameters: "
        + ", ".join(f"{MODEL_LABELS[b]} {n:,}" for b, n in params.items())
        + f".\n\n{table}\n\n![histograms](trainability.png)\n\n## Ensemble vs. single runs\n\n"
        f"Run 0 of a {e['ensemble_size']}-run ensemble ({MODEL_LABELS[e['block']]}, correlation "
        f"{e['correlation']:g}) vs. the same seed trained alone with `Trainer`: test MSE "
        f"{e['member_test_loss']:.6f} vs {e['single_test_loss']:.6f} (|diff| {e['abs_diff']:.2e}), best step "
        f"{e['member_best_step']} vs {e['single_best_step']}. Training time (same machine, same evaluation "
        f"schedule): {e['ensemble_seconds']:.1f} s for all {e['ensemble_size']} runs vs "
        f"{e['single_seconds']:.1f} s for one: {e['time_ratio']:.1f}x the time of "
        f"one run (sequential runs: {e['ensemble_size']}x).\n"
    )
    (out / "results.md").write_text(text)
    summary["markdown"] = text
    return summary
