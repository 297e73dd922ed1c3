"""``mtrank run``: the main job, the correlation study at its main-job preset (:mod:`mtrank.experiments.correlation`).

:func:`add_study_options` and :func:`study_from_args` serve ``mtrank reproduce correlation|trainability`` too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtrank.cli.common import add_command, add_device, add_progress, add_threads, apply_threads

MODELS = ["shared_bottom", "omoe", "mmoe"]


def add_study_options(parser: argparse.ArgumentParser, seeds: str, steps: str, correlations: str) -> None:
    """``--quick``, ``--seeds``, ``--steps``, ``--correlations``, ``--models``; the strings say each default."""
    parser.add_argument("--quick", action="store_true", help="a seconds-long version on tiny data (what tests run)")
    parser.add_argument("--seeds", type=int, metavar="N", help=seeds)
    parser.add_argument("--steps", type=int, metavar="N", help=f"synthetic: training steps per run ({steps})")
    parser.add_argument(
        "--correlations",
        type=float,
        nargs="+",
        metavar="P",
        help=f"synthetic: task correlations p, the cosine of the two tasks' weight vectors ({correlations})",
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, help="synthetic: models to compare (default all three)")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="synthetic: processes training the ensembles side by side, each with --threads threads (default: one "
        "per ensemble on a CPU, e.g. 3 for the main job; 1: all in this process); the numbers do not depend on it",
    )


def study_from_args(base, args: argparse.Namespace):
    """``base`` (a :class:`CorrelationStudy`), or its quick version, with the options given on the command line."""
    import dataclasses

    from mtrank.experiments.correlation import CorrelationStudy

    study = CorrelationStudy.quick(base) if args.quick else base
    given = {"seeds": args.seeds, "steps": args.steps, "correlations": args.correlations, "blocks": args.models}
    given["workers"] = args.workers
    return dataclasses.replace(study, device=args.device, **{k: v for k, v in given.items() if v is not None})


def _cmd_run(args: argparse.Namespace) -> int:
    from mtrank.experiments.correlation import CorrelationStudy, run_correlation
    from mtrank.train.distributed import rank_and_world

    if rank_and_world()[0] != 0:  # under torchrun: the study trains ensembles, not data-parallel; rank 0 runs it
        return 0
    apply_threads(args)
    study = study_from_args(CorrelationStudy.main_job(), args)
    summary = run_correlation(study, Path(args.out), progress=not args.no_progress)
    return print_summary(summary, Path(args.out), "", summary["seconds"])


def print_summary(summary: dict, out: Path, figures: str, seconds: float) -> int:
    """Print an experiment's report and the files it wrote (``figures``; a correlation study's when empty)."""
    if not figures:
        figures = "loss_curves.png" + (", gate_heatmaps.png" if summary["gate_reports"] else "")
    print(summary["markdown"])
    print(f"wrote {out}/: results.md, results.json, {figures} ({seconds:.0f} s)")
    return 0


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "run",
        _cmd_run,
        help="the main job: Shared-Bottom vs OMoE vs MMoE on synthetic data at several task correlations",
        description=(
            "Train Shared-Bottom (113 units), OMoE and MMoE (8 experts of 16 units, towers of 8) on the synthetic "
            "data of Ma et al. (KDD 2018) at task correlations 1.0, 0.9 and 0.5, 3 seeds each (a fresh data draw, "
            "initialisation and batch order per seed), 4,000 steps of batch 128 at Adam lr 1e-3; the runs of a "
            "model train together as one vectorised ensemble, the models' ensembles side by side in worker "
            "processes. Prints and writes to --out: results.md (test MSE per task, mean ± std; the paper's claims; "
            "gate report), results.json, loss_curves.png, "
            "gate_heatmaps.png. 'mtrank reproduce correlation' is the same study at the paper's budget."
        ),
    )
    p.add_argument("--out", default="runs/main", help="output directory (default: runs/main)")
    add_study_options(
        p,
        seeds="runs per (model, correlation), seeds 0..N-1 (default 3; quick 2)",
        steps="default 4000; quick 60",
        correlations="default 1.0 0.9 0.5",
    )
    add_device(p)
    add_threads(p, default=1)
    add_progress(p)
