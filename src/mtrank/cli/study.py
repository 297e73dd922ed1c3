"""``mtrank study NAME [--quick] [--seeds N] [--out DIR]``: the production studies of issue 12
(:mod:`mtrank.experiments.studies`), each writing ``results.json``, ``results.md`` and a figure."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtrank.cli.common import add_command, add_progress, add_threads, apply_threads

DEFAULT_OUT = "runs/studies"


def _cmd_study(args: argparse.Namespace) -> int:
    from mtrank.experiments.studies import get_study
    from mtrank.experiments.studies.runner import rewrite_study, run_study

    study = get_study(args.name)
    apply_threads(args)
    out = Path(args.out or f"{DEFAULT_OUT}/{args.name}")
    if args.rewrite:
        if not (out / "results.json").is_file():
            raise FileNotFoundError(f"study {args.name}: --rewrite needs {out / 'results.json'}; run the study first")
        rewrite_study(study, out)
        print(f"rewrote {out / 'results.md'} and {out / (study.name + '.png')} from {out / 'results.json'}")
        return 0
    overrides = {"device": args.device} if args.device else {}
    results = run_study(study, out, args.quick, args.seeds, not args.no_progress, **overrides)
    for d in results["differences"]:
        interval = f"[{d['low']:+.4f}, {d['high']:+.4f}]"
        print(f"{d['a']} - {d['b']}: {d['metric']} {d['estimate']:+.4f} {interval} {d['verdict']}")
    figure = out / f"{study.name}.png"
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {figure} in {results['seconds']:.0f} s")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from mtrank.experiments.studies import STUDIES

    parser = add_command(
        subparsers,
        "study",
        _cmd_study,
        help="the production studies: does each mechanism do what it was built for (docs/production.md)",
        example="mtrank study gate-polarization --quick --out /tmp/gates",
    )
    parser.add_argument("name", metavar="NAME", help=f"the study: {', '.join(STUDIES)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes that run in seconds (the tests run these)")
    parser.add_argument("--seeds", type=int, default=5, help="runs per arm, seeds 0..N-1 (default 5; at least 2)")
    parser.add_argument("--out", help=f"output folder (default {DEFAULT_OUT}/NAME)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], help="where the study trains and times (default: the study's, cpu)"
    )
    parser.add_argument(
        "--rewrite", action="store_true", help="redraw results.md and the figure from OUT/results.json (no training)"
    )
    add_threads(parser, default=1)
    add_progress(parser)
