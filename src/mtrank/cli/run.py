"""``mtrank run``: the main job (Shared-Bottom vs OMoE vs MMoE on synthetic data at several correlations)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_run(args: argparse.Namespace) -> int:
    from mtrank.experiments.synthetic import StudyConfig, run_study

    study = StudyConfig.quick() if args.quick else StudyConfig()
    if args.seeds is not None:
        study.seeds = args.seeds
    if args.correlations:
        study.correlations = args.correlations
    if args.steps is not None:
        study.steps = args.steps
    study.device = args.device
    summary = run_study(study, Path(args.out), progress=not args.no_progress)
    if not summary:  # a non-zero rank under torchrun: rank 0 reports
        return 0
    print(summary["table"])
    print()
    print(summary["gates_text"])
    print(
        f"\nwrote {args.out}/results.json, results.md, loss_curves.png, gate_heatmaps.png ({summary['seconds']:.0f} s)"
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="the main job: Shared-Bottom vs OMoE vs MMoE on synthetic data at several task correlations",
        description=(
            "Train Shared-Bottom (113 units), OMoE and MMoE (8 experts of 16 units, towers of 8) on the synthetic "
            "data of Ma et al. (KDD 2018) at task correlations 1.0, 0.9 and 0.5, several seeds each. Prints a "
            "table of test MSE per task (mean ± std) and a gate report; writes results.json, results.md, loss "
            "curves and gate heatmaps to --out."
        ),
    )
    p.add_argument("--out", default="runs/main", help="output directory (default: runs/main)")
    p.add_argument("--quick", action="store_true", help="a seconds-long version (tiny data, few steps)")
    p.add_argument("--seeds", type=int, help="seeds per (model, correlation) (default 3; quick 2)")
    p.add_argument("--correlations", type=float, nargs="+", help="task correlations p (default 1.0 0.9 0.5)")
    p.add_argument("--steps", type=int, help="training steps per run (default 4000)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="training device")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_run)
