"""``mtrank train | evaluate | predict``: the data pipeline from the shell (see docs/data.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtrank.cli.common import add_command, add_overrides, add_progress, add_threads, apply_threads, overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from mtrank.config.experiment import load_experiment
    from mtrank.pipeline import baseline_section, fit, hashing_summary, metrics_table

    apply_threads(args)
    settings = overrides(args.set)
    if args.resume or args.overwrite:
        settings["train.resume"] = "require" if args.resume else "overwrite"
    config = load_experiment(args.config, settings)
    if args.no_progress:
        config.train.progress = False
    result = fit(config, output=args.out or config.output, baseline=False if args.no_baseline else None)
    print(metrics_table(result.metrics))
    if result.baseline is not None:
        print("\n" + baseline_section(result.metrics, result.baseline).split("\n", 2)[2])
    rows = ", ".join(f"{k} {v:,}" for k, v in result.rows.items())
    print(
        f"\nrows: {rows}; {result.train_result.steps} steps in {result.train_result.seconds:.1f} s "
        f"({result.train_result.samples_per_second:,.0f} samples/s)"
    )
    if result.hashing:
        print(f"hashed features: {hashing_summary(result.hashing)}")
    print(f"training step: {result.step}")
    print(f"wrote {result.model_dir}/ (model.safetensors, config.json, encoders.json, metrics.json, report.md)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mtrank.pipeline import evaluate_model_dir, metrics_table

    metrics = evaluate_model_dir(args.model_dir, args.data)
    if args.json:
        print(json.dumps(metrics, indent=2, default=float))
    else:
        print(metrics_table({Path(args.data).name: metrics}))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from mtrank.pipeline import predict_model_dir

    predict_model_dir(args.model_dir, args.data, args.output, progress=not args.no_progress)
    import pyarrow.parquet as pq

    meta = pq.read_metadata(args.output)
    scores = [n for n in meta.schema.names if n.startswith("score_")]
    print(f"wrote {args.output}: {meta.num_rows:,} rows, columns {scores} beside the input columns")
    return 0


def register(subparsers) -> None:
    """Add ``train``, ``evaluate`` and ``predict`` to the ``mtrank`` command line."""
    p = add_command(
        subparsers,
        "train",
        _cmd_train,
        "train a model from a YAML experiment config on CSV / Parquet files",
        "Read the files named in CONFIG (CSV, Parquet, a directory of shards, or MovieLens folders; paths are\n"
        "relative to CONFIG's folder), split them, fit the feature encoders on the training split, train the\n"
        "model and a gradient-boosting baseline per task, evaluate every task on validation and test, and\n"
        "write a model directory:\n"
        "  model.safetensors  config.json  encoders.json  metrics.json  report.md  history.jsonl\n"
        "With data.streaming the training files are streamed from disk in record batches (bounded\n"
        "memory). Example configs: configs/*.yaml; every config key: docs/data.md.",
        example="mtrank train configs/census_income.yaml --set train.epochs=2 --out runs/census",
    )
    p.add_argument("config", help="YAML experiment config (sections data, features, tasks, model, train)")
    p.add_argument("--out", help="model directory (default: the config's output)")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the gradient-boosting baseline of the report (default: the config's baseline.enabled, true)",
    )
    add_overrides(p)
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue the checkpoint in train.checkpoint_dir and fail if there is none (default: continue it "
        "when it was written by the same configuration, refuse one of another)",
    )
    resume.add_argument(
        "--overwrite", action="store_true", help="discard the checkpoint in train.checkpoint_dir and start afresh"
    )
    add_threads(p)
    add_progress(p)

    p = add_command(
        subparsers,
        "evaluate",
        _cmd_evaluate,
        "metrics per task of a trained model on a labelled file",
        "Encode DATA with the model directory's saved encoders (unseen categories go to the OOV bucket) and print "
        "AUC / log loss (binary tasks) or MSE / R² (regression) per task.",
    )
    p.add_argument("model_dir", help="a directory written by `mtrank train`")
    p.add_argument("data", help="CSV / Parquet file or directory with the same columns as the training data")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    p = add_command(
        subparsers,
        "predict",
        _cmd_predict,
        "score every row of a file with a trained model, to Parquet",
        "Encode DATA with the saved encoders and write the input columns plus one score_<task> column per task "
        "(probability for binary tasks, prediction for regression) to a Parquet file. Labels are not needed; "
        "files are scored in record batches.",
    )
    p.add_argument("model_dir", help="a directory written by `mtrank train`")
    p.add_argument("data", help="CSV / Parquet file or directory with the feature columns")
    p.add_argument("-o", "--output", default="scores.parquet", help="output Parquet file (default scores.parquet)")
    add_progress(p)
