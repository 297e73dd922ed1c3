"""``mtrank tune CONFIG --trials N``: a hyper-parameter search on the validation split (:mod:`mtrank.tune`)."""

from __future__ import annotations

import argparse
import json

from mtrank.cli.common import add_command, add_overrides, add_progress, add_threads, apply_threads, overrides


def _objective(text: str | None) -> str | dict | None:
    """``auc/click`` or ``auc/click=1,auc/buy=0.5`` -> the objective (None: the config's)."""
    if not text:
        return None
    if "=" not in text:
        return text
    weights = {}
    for term in text.split(","):
        key, _, weight = term.partition("=")
        try:
            weights[key.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--objective {text!r}: expected METRIC or METRIC=WEIGHT,METRIC=WEIGHT") from None
    return weights


def _cmd_tune(args: argparse.Namespace) -> int:
    from mtrank.config.experiment import load_experiment
    from mtrank.evaluate.report import markdown_table
    from mtrank.tune import settings_for, tune_baseline, tune_model

    apply_threads(args)
    config = load_experiment(args.config, overrides(args.set))
    settings = settings_for(
        config,
        args.trials,
        args.storage or "",
        args.study or "",
        _objective(args.objective),
        args.tune_dir,
        args.out,
        progress=not args.no_progress,
        final=not args.no_final,
    )
    if args.baseline:
        result = tune_baseline(config, settings)
        rows = [
            [task, e["best_trial"], e["best_value"], json.dumps(e["best_params"])]
            for task, e in result["tasks"].items()
        ]
        print(markdown_table(["task", "best trial", "valid", "params"], rows))
        if "test" in result:
            print(f"\ntest (tuned baseline, scored once): {json.dumps(result['test'])}")
        print(f"\nwrote {settings.out}/ (gbdt-*-trials.csv/.md, best-baseline.yaml, result-baseline.json)")
        return 0
    result = tune_model(config, settings)
    print(f"study {result['study']}: {result['objective']}")
    print(f"best trial {result['best_trial']}: {result['best_value']:.6g} with {json.dumps(result['best_params'])}")
    if "test" in result:
        print(f"test (the chosen setting, scored once): {json.dumps(result['test'])}")
        print(f"model directory: {settings.model_dir}")
    print(f"wrote {settings.out}/ (trials.csv, trials.md, best.yaml, result.json); study in {settings.storage}")
    return 0


def register(subparsers) -> None:
    """Add ``tune`` to the ``mtrank`` command line."""
    p = add_command(
        subparsers,
        "tune",
        _cmd_tune,
        "search hyper-parameters on the validation split (optuna; resumable)",
        "Search the config's tune.space (dotted config keys: train.lr, model.block.num_experts,\n"
        "tasks.<name>.weight, ...) with optuna's TPE sampler, each trial trained on the training split and scored\n"
        "by the objective on the validation split only; bad trials are pruned early. The study lives in SQLite\n"
        "(OUT.tune/study.db): the same command again resumes it up to --trials. Then the best setting is written\n"
        "(best.yaml), the trials tabulated (trials.csv / trials.md), and the best setting trained once more into\n"
        "the model directory and scored on the test split, once. --baseline tunes the gradient-boosting\n"
        "baseline instead, one search per task with the same number of trials.",
        example="mtrank tune configs/womens_clothing_reviews.yaml --trials 30",
    )
    p.add_argument("config", help="YAML experiment config with a tune section (space, objective)")
    p.add_argument("--trials", type=int, help="finished trials the study should hold (default: tune.trials)")
    p.add_argument("--storage", help="optuna storage URL (default: sqlite:///OUT.tune/study.db)")
    p.add_argument("--study", help="study name (default: tune.study, else the config's name)")
    p.add_argument(
        "--objective",
        help="validation metric to optimise, e.g. auc/click, or a weighted sum auc/click=1,auc/buy=0.5 (default: "
        "tune.objective, else the mean of the tasks' AUC / R²)",
    )
    p.add_argument("--out", help="model directory of the chosen setting (default: the config's output)")
    p.add_argument("--tune-dir", help="folder of the study's files (default: OUT.tune, beside the model directory)")
    p.add_argument("--baseline", action="store_true", help="tune the gradient-boosting baseline instead")
    p.add_argument("--no-final", action="store_true", help="skip training the chosen setting and its test score")
    add_overrides(p)
    add_threads(p)
    add_progress(p)
