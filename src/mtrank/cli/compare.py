"""``mtrank compare balancing | mtl-help``: task-balancing methods against fixed weights, and multi-task blocks
against single-task models, over paired seeds with intervals (:mod:`mtrank.experiments.balancing`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

from mtrank.cli.common import add_command, add_device, add_progress, add_threads, apply_threads

DEFAULT_OUT = "runs/compare"


def _study(args: argparse.Namespace):
    from mtrank.experiments.balancing import METHODS, BalancingStudy

    data_dir = args.data or os.environ.get("MTRANK_SHARED_DATA", "")
    study = BalancingStudy.quick(data_dir) if args.quick else BalancingStudy(data_dir=data_dir)
    given = {
        "datasets": args.datasets,
        "blocks": args.blocks,
        "methods": args.methods,
        "seeds": args.seeds,
        "steps": args.steps,
        "epochs": args.epochs,
        "census_rows": args.train_rows,
        "valid_rows": args.valid_rows,
        "lr": args.lr,
        "scale": args.scale,
    }
    study = dataclasses.replace(study, device=args.device, **{k: v for k, v in given.items() if v is not None})
    needs_files = [d for d in study.datasets if not d.startswith("synthetic:")]
    if needs_files and not study.data_dir and any(d.startswith("census") for d in needs_files):
        raise ValueError(
            "compare: census datasets need --data DIR (the folder holding census-income/) or MTRANK_SHARED_DATA"
        )
    if args.command_name == "mtl-help" and args.methods is None:
        study = dataclasses.replace(study, methods=["fixed"])
    unknown = sorted(set(study.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"compare: unknown --methods {unknown}; use some of {list(METHODS)}")
    return study


def _cmd_compare(args: argparse.Namespace) -> int:
    from mtrank.experiments.balancing import run_balancing, run_mtl_help

    apply_threads(args)
    study = _study(args)
    out = Path(args.out or f"{DEFAULT_OUT}/{args.command_name}")
    started = time.perf_counter()
    run = run_balancing if args.command_name == "balancing" else run_mtl_help
    summary = run(study, out, not args.no_progress)
    print(summary["markdown"])
    print(f"wrote {out / 'results.md'} and {out / 'results.json'} in {time.perf_counter() - started:.0f} s")
    return 0


def register(subparsers) -> None:
    """Add ``mtrank compare``."""
    p = add_command(
        subparsers,
        "compare",
        _cmd_compare,
        "task-balancing methods against fixed weights, or multi-task against single-task models, over seeds",
        "'balancing': every balancing method (fixed, uncertainty, dwa, famo, gradnorm, pcgrad, cagrad) x block x\n"
        "dataset, per task mean ± std over seeds and the paired difference to fixed weights with a 95% bootstrap\n"
        "interval. 'mtl-help': each task alone (a single-task model of the same width on its own label) against\n"
        "each multi-task block x balancing method (--methods, default fixed), same data, seeds, budget and\n"
        "learning rate; per task the paired difference, negative transfer flagged when its interval lies below 0.\n"
        "Seeds of one setting train as one vectorised ensemble. Datasets: synthetic:P (the\n"
        "second label x --scale), census:1, census:2, clothing. See docs/balancing.md.",
        example="mtrank compare mtl-help --datasets synthetic:1.0 synthetic:0.0 --seeds 10",
    )
    p.add_argument("command_name", choices=["balancing", "mtl-help"], metavar="STUDY", help="balancing | mtl-help")
    p.add_argument("--out", help=f"output directory (default: {DEFAULT_OUT}/STUDY)")
    p.add_argument("--quick", action="store_true", help="a seconds-long run: synthetic:0.5, 3 seeds, 40 steps")
    p.add_argument("--datasets", nargs="+", help="default synthetic:1.0 synthetic:0.5 synthetic:0.0 census:1")
    p.add_argument("--blocks", nargs="+", help="multi-task blocks (default mmoe shared_bottom)")
    p.add_argument("--methods", nargs="+", help="balancing methods (default: balancing all, mtl-help fixed)")
    p.add_argument("--seeds", type=int, help="runs per setting (default 10)")
    p.add_argument("--steps", type=int, help="synthetic: Adam steps (default 1500)")
    p.add_argument("--epochs", type=int, help="census / clothing: epochs (default 3)")
    p.add_argument("--train-rows", type=int, help="census / clothing: training rows kept (default 50000; 0 = all)")
    p.add_argument("--valid-rows", type=int, help="census / clothing: validation rows kept (default 5000; 0 = all)")
    p.add_argument("--lr", type=float, help="learning rate of every setting (default 1e-3)")
    p.add_argument("--scale", type=float, help="synthetic: factor on the second label (default 100)")
    p.add_argument("--data", metavar="DIR", help="folder holding census-income/ (default $MTRANK_SHARED_DATA)")
    add_device(p)
    add_threads(p, default=1)
    add_progress(p)
