"""``mtrank reproduce correlation|trainability|census``: Ma et al. (KDD 2018), one command per experiment."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

DEFAULT_OUT = "runs/reproduce"


def default_census_path() -> Path:
    """``$MTRANK_SHARED_DATA/census-income``, else ``../shared/data/census-income`` (relative to the cwd)."""
    root = os.environ.get("MTRANK_SHARED_DATA")
    return Path(root) / "census-income" if root else Path("..") / "shared" / "data" / "census-income"


def _synthetic_config(args: argparse.Namespace):
    from mtrank.experiments.paper_synthetic import SyntheticPaperConfig

    cfg = SyntheticPaperConfig.quick() if args.quick else SyntheticPaperConfig()
    if args.command_name == "trainability" and not args.quick:
        cfg.seeds = 200
    for name in ("seeds", "steps", "correlations", "device"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    if getattr(args, "models", None):
        cfg.blocks = args.models
    return cfg


def _cmd_reproduce(args: argparse.Namespace) -> int:
    out = Path(args.out or f"{DEFAULT_OUT}/{args.command_name}")
    progress = not args.no_progress
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.command_name == "correlation":
        from mtrank.experiments.paper_synthetic import run_correlation

        summary = run_correlation(_synthetic_config(args), out, progress)
        figures = "loss_curves.png"
    elif args.command_name == "trainability":
        from mtrank.experiments.paper_synthetic import load_learning_rates, run_trainability

        lrs = load_learning_rates(Path(args.lrs_from)) if args.lrs_from else None
        summary = run_trainability(_synthetic_config(args), out, lrs, progress)
        figures = "trainability.png"
    else:
        from mtrank.experiments.census import CensusPaperConfig, run_census

        cfg = CensusPaperConfig.quick() if args.quick else CensusPaperConfig()
        if args.seeds is not None:
            cfg.seeds = args.seeds
        if args.epochs is not None:
            cfg.epochs = args.epochs
        if args.sizes:
            cfg.sizes = args.sizes
        if args.learning_rates:
            cfg.learning_rates = args.learning_rates
        if args.tune_seeds is not None:
            cfg.tune_seeds = args.tune_seeds
        if args.methods:
            cfg.methods = args.methods
        cfg.device = args.device or cfg.device
        path = Path(args.data) if args.data else default_census_path()
        summary = run_census(cfg, path, args.group, out, progress, download=args.download)
        figures = "census_auc.png"
    print(summary["markdown"])
    print(f"wrote {out}/results.md, results.json, {figures} in {time.perf_counter() - started:.0f} s")
    return 0


def register(subparsers) -> None:
    """Add ``mtrank reproduce`` to the command line."""
    p = subparsers.add_parser(
        "reproduce",
        help="reproduce the experiments of the MMoE paper (Ma et al., KDD 2018)",
        description=(
            "Reproduce Ma et al. (KDD 2018). 'correlation': Shared-Bottom, OMoE and MMoE on synthetic "
            "data at task correlations 1.0, 0.9, 0.5, 0.0, learning rate picked from {1e-4, 1e-3, 1e-2} on "
            "validation, loss curves and a check of the paper's claims (Fig. 4). 'trainability': 200 "
            "independent runs per (model, correlation) trained as one vectorised ensemble, histograms of the "
            "final test loss (Fig. 5). 'census': Single-task, Shared-Bottom, OMoE and MMoE on UCI "
            "Census-Income, tuned on validation, then 20 seeds; test AUC beside the paper's Tables 1 and 2. "
            "Each writes results.md, results.json and figures to --out. See docs/reproduction.md."
        ),
    )
    p.add_argument(
        "command_name",
        choices=["correlation", "trainability", "census"],
        metavar="EXPERIMENT",
        help="correlation | trainability | census",
    )
    p.add_argument("--out", help=f"output directory (default: {DEFAULT_OUT}/EXPERIMENT)")
    p.add_argument("--quick", action="store_true", help="a seconds-long version on tiny data (what tests run)")
    p.add_argument("--seeds", type=int, help="runs per setting (default: correlation 20, trainability 200, census 20)")
    p.add_argument(
        "--group",
        type=int,
        choices=[1, 2],
        default=1,
        help="census task group: 1 = income + marital, 2 = education + marital (default 1)",
    )
    p.add_argument(
        "--data",
        help="census: folder with census-income.data(.gz) and census-income.test(.gz) "
        "(default: $MTRANK_SHARED_DATA/census-income or ../shared/data/census-income)",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="census: download missing files from UCI into --data and check their SHA-256",
    )
    p.add_argument("--epochs", type=int, help="census: epochs per run (default 3)")
    p.add_argument(
        "--sizes",
        nargs="+",
        choices=["small", "large", "xlarge"],
        help="census: model sizes in the tuning grid (default small large xlarge); hidden units of Single-task "
        "per task 64/128/256, Shared-Bottom 128/256/512, (O/M)MoE per expert (8 experts) 16/32/64",
    )
    p.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        help="census: learning rates in the tuning grid (default 1e-3 4e-3 1e-2)",
    )
    p.add_argument("--tune-seeds", type=int, help="census: runs per tuning setting, averaged on validation (default 3)")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=["single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple"],
        help="census: methods to compare (default the paper's four; cgc and ple, from Tang et al. 2020, with the "
        "same expert budget, 4 shared + 2 per task)",
    )
    p.add_argument("--steps", type=int, help="synthetic: training steps per run (default 2000)")
    p.add_argument("--correlations", type=float, nargs="+", help="synthetic: task correlations (default 1 .9 .5 0)")
    p.add_argument(
        "--models",
        nargs="+",
        choices=["shared_bottom", "omoe", "mmoe"],
        help="synthetic: models to compare (default all three)",
    )
    p.add_argument(
        "--lrs-from",
        help="trainability: a correlation study's results.json whose picked learning "
        "rates to use (default: run the same learning-rate search here)",
    )
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="training device (default cpu)")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for PyTorch (default: PyTorch's choice; on a busy machine 1 is often fastest)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_reproduce)
