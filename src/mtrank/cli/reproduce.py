"""``mtrank reproduce correlation|trainability|census``: Ma et al. (KDD 2018), one command per experiment."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

from mtrank.cli.common import add_command, add_device, add_progress, add_threads, apply_threads
from mtrank.cli.run import add_study_options, print_summary, study_from_args

DEFAULT_OUT = "runs/reproduce"


def census_path(args: argparse.Namespace) -> Path:
    """``--data``, else ``$MTRANK_SHARED_DATA/census-income``; without either, an error that says what to pass."""
    if args.data:
        return Path(args.data)
    root = os.environ.get("MTRANK_SHARED_DATA")
    if root:
        return Path(root) / "census-income"
    raise ValueError(
        "census: no data folder; pass --data DIR (the folder with census-income.data(.gz) and "
        "census-income.test(.gz), or where --download should put them) or set MTRANK_SHARED_DATA"
    )


def _correlation(args: argparse.Namespace, out: Path, progress: bool) -> dict:
    from mtrank.experiments.correlation import CorrelationStudy, run_correlation

    return run_correlation(study_from_args(CorrelationStudy.paper(), args), out, progress)


def _trainability(args: argparse.Namespace, out: Path, progress: bool) -> dict:
    import dataclasses

    from mtrank.experiments.correlation import CorrelationStudy
    from mtrank.experiments.trainability import load_learning_rates, run_trainability

    study = study_from_args(dataclasses.replace(CorrelationStudy.paper(), seeds=200), args)
    lrs = load_learning_rates(Path(args.lrs_from)) if args.lrs_from else None
    return run_trainability(study, out, lrs, progress)


def _census(args: argparse.Namespace, out: Path, progress: bool) -> dict:
    from mtrank.experiments.census import CensusPaperConfig, run_census

    cfg = CensusPaperConfig.quick() if args.quick else CensusPaperConfig()
    given = {
        "seeds": args.seeds,
        "epochs": args.epochs,
        "sizes": args.sizes,
        "learning_rates": args.learning_rates,
        "tune_seeds": args.tune_seeds,
        "methods": args.methods,
        "device": args.device,
    }
    for name, value in given.items():
        if value is not None:
            setattr(cfg, name, value)
    return run_census(cfg, census_path(args), args.group, out, progress, download=args.download)


def audit_config(args: argparse.Namespace):
    """The census audit's config: ``--quick`` / ``--medium`` / the full budget, with the options given."""
    from mtrank.experiments.census_audit import AuditConfig

    cfg = AuditConfig.quick() if args.quick else AuditConfig.medium() if args.medium else AuditConfig.full()
    given = {
        "groups": args.groups,
        "methods": args.methods,
        "runs": args.runs,
        "splits": args.splits,
        "trials": args.trials,
        "ablation_runs": args.ablation_runs,
        "max_epochs": args.max_epochs,
        "train_rows": args.train_rows,
        "workers": args.workers,
    }
    cfg = dataclasses.replace(cfg, device=args.device, **{k: v for k, v in given.items() if v is not None})
    return cfg.check()


def _census_audit(args: argparse.Namespace, out: Path, progress: bool) -> dict | None:
    from mtrank.experiments.census_audit import run_audit, worst_case_seconds

    cfg, path = audit_config(args), census_path(args)
    try:
        import optuna  # noqa: F401  (the searches' sampler)
    except ImportError:
        raise ValueError("census-audit: its searches need optuna; pip install optuna (or 'mtrank[serve]')") from None
    if args.estimate or not args.quick:
        e = worst_case_seconds(cfg, path)
        print(
            f"census audit ({cfg.preset}) on {e['device']}: at most {e['total_seconds'] / 60:.0f} min with one worker "
            f"({e['searches_trials']} trials of {e['seconds_per_trial']:.1f} s, {e['final_ensembles']} run ensembles "
            f"of {e['seconds_per_final_ensemble']:.0f} s, each as if every run trained {cfg.max_epochs} epochs; early "
            "stopping and --workers shorten it)",
            flush=True,
        )
        if args.estimate:
            return None
    return run_audit(cfg, path, out, progress, math.inf if args.stop_after is None else args.stop_after)


EXPERIMENTS = {
    "correlation": (_correlation, ""),  # the figures of the study's models
    "trainability": (_trainability, "trainability.png"),
    "census": (_census, "census_auc.png"),
    "census-audit": (_census_audit, "census_auc.png, intervals.png, searches.png, parts/"),
}


def _cmd_reproduce(args: argparse.Namespace) -> int:
    out = Path(args.out or f"{DEFAULT_OUT}/{args.command_name}")
    apply_threads(args)
    started = time.perf_counter()
    experiment, figures = EXPERIMENTS[args.command_name]
    summary = experiment(args, out, not args.no_progress)
    if summary is None:  # census-audit --estimate, or stopped by --stop-after before the end
        return 0
    return print_summary(summary, out, figures, time.perf_counter() - started)


def register(subparsers) -> None:
    """Add ``mtrank reproduce`` to the command line."""
    p = add_command(
        subparsers,
        "reproduce",
        _cmd_reproduce,
        help="reproduce the experiments of the MMoE paper (Ma et al., KDD 2018)",
        description=(
            "Reproduce Ma et al. (KDD 2018). 'correlation': the correlation study of 'mtrank run' at the "
            "paper's budget: Shared-Bottom, OMoE and MMoE on synthetic data at task correlations 1.0, 0.9, 0.5, "
            "0.0, 20 runs each, learning rate picked per setting from {1e-4, 1e-3, 1e-2} on validation, loss "
            "curves, gates and a check of the paper's claims (Fig. 4). 'trainability': 200 independent runs per "
            "(model, correlation) trained as vectorised ensembles, histograms of the final test loss (Fig. 5). "
            "'census': Single-task, Shared-Bottom, OMoE and MMoE on UCI Census-Income, tuned on validation, then "
            "20 seeds; test AUC beside the paper's Tables 1 and 2. 'census-audit': the same tables decided: an "
            "optuna search per method (lr, width up to 2,048 units, experts; up to 15 epochs with early "
            "stopping), independent Single-task models, runs on several random splits, a matched-parameter "
            "Shared-Bottom, an ablation without the household columns, and intervals (paired bootstrap + "
            "DeLong, Holm-corrected) with a verdict per claim. Each writes results.md, results.json and figures "
            "to --out. See docs/reproduction.md."
        ),
    )
    p.add_argument("command_name", choices=list(EXPERIMENTS), metavar="EXPERIMENT", help=" | ".join(EXPERIMENTS))
    p.add_argument("--out", help=f"output directory (default: {DEFAULT_OUT}/EXPERIMENT)")
    add_study_options(
        p,
        seeds="runs per setting (default: correlation 20, trainability 200, census 20; quick 2)",
        steps="default 2000",
        correlations="default 1 0.9 0.5 0",
    )
    p.add_argument(
        "--lrs-from",
        metavar="JSON",
        help="trainability: a correlation study's results.json whose learning rates to use (default: run the "
        "same learning-rate search here)",
    )
    p.add_argument(
        "--group",
        type=int,
        choices=[1, 2],
        default=1,
        help="census task group: 1 = income + marital, 2 = education + marital (default 1)",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="census: folder with census-income.data(.gz) and census-income.test(.gz) "
        "(default: $MTRANK_SHARED_DATA/census-income)",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="census: download missing files from UCI into --data and check their SHA-256",
    )
    p.add_argument("--epochs", type=int, help="census: epochs per run (default 3)")
    census_choices = {
        "--sizes": (
            ["small", "large", "xlarge"],
            "census: model sizes in the tuning grid (default small large xlarge); hidden units of Single-task per "
            "task 64/128/256, Shared-Bottom 128/256/512, (O/M)MoE per expert (8 experts) 16/32/64",
        ),
        "--methods": (
            ["single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple"],
            "census: methods to compare (default the paper's four; cgc and ple, from Tang et al. 2020, with the "
            "same expert budget, 4 shared + 2 per task)",
        ),
    }
    for flag, (choices, text) in census_choices.items():
        p.add_argument(flag, nargs="+", choices=choices, help=text)
    p.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        help="census: learning rates in the tuning grid (default 1e-3 4e-3 1e-2)",
    )
    p.add_argument("--tune-seeds", type=int, help="census: runs per tuning setting, averaged on validation (default 3)")
    audit = p.add_argument_group(
        "census-audit",
        "the uncensored census protocol of docs/reproduction.md; --workers N runs N searches or method ensembles "
        "side by side; the parts it writes to --out/parts let a rerun with the same options resume",
    )
    audit.add_argument(
        "--medium",
        action="store_true",
        help="a CPU-sized audit (about 20 min of one core): 20,000 training and 20,000 held-out rows, 6 trials per "
        "search, 8 runs on each of 3 splits",
    )
    audit.add_argument("--estimate", action="store_true", help="print the time estimate on --device and stop")
    audit.add_argument(
        "--stop-after",
        type=float,
        metavar="SECONDS",
        help="start no job or search trial after this long, finish the running ones and stop (the same command "
        "again goes on); for machines lent by the call",
    )
    audit.add_argument("--groups", type=int, nargs="+", choices=[1, 2], help="task groups (default 1 2)")
    audit_counts = {
        "--runs": "runs per method on each split (default 100)",
        "--splits": "random 1:1 validation/test splits of the test file, seeds 0..K-1 (default 5)",
        "--trials": "optuna trials per search (default 30, +15 after widening)",
        "--ablation-runs": "runs per method and split without the household columns (default 100; 0: none)",
        "--max-epochs": "epochs per run at most, early stopping on validation (default 15)",
        "--train-rows": "a fixed random subset of the training file (default all)",
    }
    for flag, text in audit_counts.items():
        audit.add_argument(flag, type=int, metavar="N", help=text)
    add_device(p)
    add_threads(p, default=1)
    add_progress(p)
