"""``mtrank diagnose MODEL_DIR DATA``: do the tasks pull the shared parameters the same way, and how are the
gates used? Per pair of tasks the gradient cosine per shared layer and overall and the magnitude ratio; the trend
over training when the model was trained with ``train.balancing.conflict_every``; the gate report beside it."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mtrank.cli.common import add_command, add_threads, apply_threads


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from mtrank.artifacts import open_model_dir
    from mtrank.evaluate.conflict import format_conflict_table, plot_conflict, series_from_history, trend_table
    from mtrank.evaluate.gates import format_gate_report
    from mtrank.evaluate.report import write_json
    from mtrank.pipeline import encode_for_model_dir
    from mtrank.train.balancing import diagnose

    apply_threads(args)
    loaded = open_model_dir(args.model_dir)
    if len(loaded.model.task_names) < 2:
        raise ValueError(f"{loaded.path}: the model has one task; task conflict needs two or more")
    data = encode_for_model_dir(loaded, args.data, "diagnosis")
    report = diagnose(loaded.model, data, args.batches, args.batch_size, args.seed)
    metrics_file = loaded.path / "metrics.json"
    history = json.loads(metrics_file.read_text()).get("history", []) if metrics_file.is_file() else []
    series = series_from_history(history)
    print(f"task conflict on {report['rows']:,} rows ({report['batches']} batches of {report['batch_size']}):")
    print(format_conflict_table(report["conflict"]))
    for pair, values in report["batch_cosines"].items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {pair}: cosine per batch {min(values):.3f} .. {max(values):.3f} (std {spread:.3f})")
    if series:
        print("\nover training (train.balancing.conflict_every):")
        print(trend_table(series))
        report["training_series"] = series
    print("\ngates:")
    print(format_gate_report(report["gates"]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "diagnose.json", report)
        plot_conflict(args.out / "conflict.png", report["conflict"], series or None)
        print(f"\nwrote {args.out / 'diagnose.json'} and {args.out / 'conflict.png'}")
    return 0


def register(subparsers) -> None:
    """Add ``mtrank diagnose``."""
    p = add_command(
        subparsers,
        "diagnose",
        _cmd_diagnose,
        "task conflict (gradient cosines per shared layer) and gate statistics of a model on labelled data",
        "For every pair of tasks: the cosine of their loss gradients on the parameters both use (per shared\n"
        "layer and overall; < 0 = a step for one task undoes the other) and the gradient-magnitude ratio,\n"
        "averaged over random batches of DATA; the trend over training when the model was trained with\n"
        "train.balancing.conflict_every; then the gates' utilisation, entropy and expert health.\n"
        "See docs/balancing.md.",
        example="mtrank diagnose runs/census ../shared/data/census/test.csv --out runs/census/diagnose",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("data", metavar="DATA", help="labelled rows (a file or folder the model's experiment reads)")
    p.add_argument("--batches", type=int, default=8, help="random batches to average over (default 8)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per batch (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches (default 0)")
    p.add_argument("--out", type=Path, default=None, help="folder for diagnose.json and conflict.png")
    add_threads(p)
