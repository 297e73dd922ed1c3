"""``mtrank blend tune | learned | fit-learned``: blend weights tuned on validation, the learned-blend study, a
learned blend trained on impression logs for the service."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtrank.cli.common import add_command


def _cmd_blend_tune(args: argparse.Namespace) -> int:
    import numpy as np

    from mtrank.blend.tuning import Objective, tune_blend

    if not (len(args.tasks) == len(args.scores) == len(args.labels)):
        raise ValueError("--tasks, --scores and --labels: give one entry per task, in the same order")
    frame = _read_table(args.data, [*args.scores, *args.labels, *([args.request_id] if args.request_id else [])])
    scores = np.stack([frame[c].to_numpy(dtype=float) for c in args.scores], 1)  # (N, K)
    labels = np.stack([frame[c].to_numpy(dtype=float) for c in args.labels], 1)  # (N, K)
    objective = Objective(
        args.objective,
        weights={k: float(v) for k, v in _pairs(args.objective_weight, "--objective-weight")},
        request_ids=frame[args.request_id].to_numpy() if args.request_id else None,
        top_k=args.top_k,
    )
    transforms = dict(_pairs(args.transform, "--transform"))
    result = tune_blend(
        scores, labels, args.tasks, objective, args.method, transforms, args.search, args.step, args.trials, args.seed
    )
    print(f"objective {args.objective} on {len(frame)} rows ({args.search}, {len(result.trials)} trials)")
    print(f"  equal weights : {result.default_value:.4f}")
    print(
        f"  best weights  : {result.value:.4f}  " + "  ".join(f"{k}={v:.3f}" for k, v in result.blend.weights.items())
    )
    if args.out:
        from mtrank.artifacts import add_to_manifest

        with open(args.out, "w") as handle:
            json.dump(result.blend.to_dict(), handle, indent=2)
        add_to_manifest(Path(args.out).parent, [args.out])  # into a sealed model directory: recorded there
        print(f"wrote {args.out}")
    return 0


def _read_table(path: str, columns: list[str]):
    """A CSV or Parquet file as a DataFrame; an error names the first of ``columns`` it lacks."""
    import pandas as pd

    frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: column {missing[0]!r} is missing (columns: {list(frame.columns)[:20]})")
    return frame


def _pairs(items: list[str] | None, flag: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag}: expected TASK=VALUE, got {item!r}")
        pairs.append(tuple(item.split("=", 1)))
    return pairs


def _cmd_blend_learned(args: argparse.Namespace) -> int:
    import torch

    from mtrank.experiments.learned_blend import run_learned_blend_demo

    torch.set_num_threads(1)
    report = run_learned_blend_demo(args.requests, args.lambdas, args.epochs, args.seeds)
    print(report["table"])
    if args.write_logs:
        from mtrank.experiments.learned_blend import write_preference_logs

        write_preference_logs(args.write_logs, args.requests, seed=0)
        print(f"wrote {args.write_logs}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


def _cmd_blend_fit_learned(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from mtrank.artifacts import model_config, read_model_meta
    from mtrank.blend.learned import LearnedBlendConfig, ServedLearnedBlend, train_learned_blend

    torch.set_num_threads(args.torch_threads)
    if len(args.tasks) != len(args.scores):
        raise ValueError("--tasks and --scores: give one score column per task, in the same order")
    model_tasks = model_config(read_model_meta(args.model_dir), args.model_dir).task_names
    if sorted(args.tasks) != sorted(model_tasks):
        raise ValueError(f"--tasks {args.tasks}: the model in {args.model_dir} has tasks {model_tasks}")
    default = args.default_weights or [1.0] * len(args.tasks)
    if len(default) != len(args.tasks):
        raise ValueError(f"--default-weights: {len(default)} weights for {len(args.tasks)} tasks")
    needed = [*args.context, *args.scores, args.engaged, args.reward]
    frame = _read_table(args.logs, needed)
    columns = {name: np.array(frame[name], dtype=np.float32) for name in needed}  # writable copies
    bad = [name for name, values in columns.items() if not np.isfinite(values).all()]
    if bad:
        row = int(np.flatnonzero(~np.isfinite(columns[bad[0]]))[0])
        raise ValueError(f"{args.logs}: column {bad[0]!r} has a missing or non-finite value in row {row}")

    def tensor(names):
        return torch.from_numpy(np.stack([columns[n] for n in names], 1))

    config = LearnedBlendConfig(hidden=args.hidden, l2_pull=args.l2_pull, epochs=args.epochs, seed=args.seed)
    model, history = train_learned_blend(
        tensor(args.context),
        tensor(args.scores),
        torch.from_numpy(columns[args.engaged]),
        torch.from_numpy(columns[args.reward]),
        default,
        config,
    )
    path = ServedLearnedBlend(model, args.context, args.tasks).save(args.model_dir)
    with torch.no_grad():
        weights = model.task_weights(tensor(args.context)).numpy()
    print(f"trained on {len(frame):,} impressions, {args.epochs} epochs: loss {history[0]:.4f} -> {history[-1]:.4f}")
    for k, task in enumerate(args.tasks):
        w = weights[:, k]
        print(
            f"  weight of {task}: default {default[k]:g}, learned mean {w.mean():.3f}, 5-95% {np.percentile(w, 5):.3f}"
            f" .. {np.percentile(w, 95):.3f}"
        )
    print(f"wrote {path}; `mtrank serve {args.model_dir}` now blends each request with f(context)")
    return 0


def register(subparsers) -> None:
    """Add ``mtrank blend`` and its subcommands ``tune``, ``learned``, ``fit-learned``."""
    p = add_command(
        subparsers,
        "blend",
        None,
        help="tune blend weights on validation scores; the learned-blend study",
        description="Blending task scores into one ranking score.",
    )
    sub = p.add_subparsers(dest="blend_command", metavar="BLEND_COMMAND", required=True)
    t = add_command(
        sub,
        "tune",
        _cmd_blend_tune,
        help="search blend weights on a file of validation scores and labels",
        description=(
            "Search blend weights (summing to 1) that maximise an objective on validation data: 'auc' = "
            "sum_k a_k AUC(blended score, label_k); 'reward@k' = mean over requests of sum_k a_k label_k over the "
            "top-k blended candidates (needs --request-id). Grid over the simplex or optuna TPE."
        ),
    )
    t.add_argument("data", help="CSV or Parquet file with score and label columns")
    t.add_argument("--tasks", nargs="+", required=True, help="task names, in order")
    t.add_argument("--scores", nargs="+", required=True, help="score column of each task")
    t.add_argument("--labels", nargs="+", required=True, help="label column of each task")
    t.add_argument("--method", default="weighted_sum", choices=["weighted_sum", "weighted_product"])
    t.add_argument(
        "--transform",
        nargs="*",
        help="TASK=TRANSFORM (identity, log, logit, sigmoid, log1p; rank and standardize are computed within each "
        "request, as the service does, and need --request-id)",
    )
    t.add_argument("--objective", default="auc", choices=["auc", "reward@k"])
    t.add_argument("--objective-weight", nargs="*", help="TASK=WEIGHT, a_k of the objective (default 1)")
    t.add_argument(
        "--request-id", help="request id column: reward@k, and the rank / standardize transforms, group rows by it"
    )
    t.add_argument("--top-k", type=int, default=1, help="candidates shown per request (reward@k)")
    t.add_argument("--search", default="grid", choices=["grid", "optuna"])
    t.add_argument("--step", type=float, default=0.05, help="grid step (default 0.05)")
    t.add_argument("--trials", type=int, default=100, help="optuna trials (default 100)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="write the best blend as JSON here (e.g. MODEL_DIR/blend.json)")
    lb = add_command(
        sub,
        "learned",
        _cmd_blend_learned,
        help="learned blend vs the best global weights on simulated logs with group-dependent preferences",
        description=(
            "Generate ranking logs where two user groups value two tasks differently (logged under randomised "
            "blend weights), train the learned utility g(x, r) = sigmoid(r . f(x) + b) with reward-weighted "
            "cross-entropy and an L2 pull toward the default weights, and compare the expected reward of the "
            "top item on fresh requests: default weights, the best single global weight vector (grid on a "
            "validation set), the learned blend at each lambda, and the true per-group weights (oracle)."
        ),
    )
    lb.add_argument("--requests", type=int, default=4000, help="training requests (default 4000)")
    lb.add_argument(
        "--lambdas",
        type=float,
        nargs="+",
        default=[2.0, 0.5, 0.1, 0.0],
        help="L2 pull strengths to train (default 2 0.5 0.1 0)",
    )
    lb.add_argument("--epochs", type=int, default=20)
    lb.add_argument("--seeds", type=int, default=3, help="data + training seeds (default 3)")
    lb.add_argument("--json", help="write the results as JSON here")
    lb.add_argument(
        "--write-logs", help="also write seed 0's training logs as Parquet here (input for 'blend fit-learned')"
    )
    fl = add_command(
        sub,
        "fit-learned",
        _cmd_blend_fit_learned,
        help="train a learned blend on impression logs and put it in a model directory for the service",
        description=(
            "Train the learned utility g(x, r) = sigmoid(r . f(x) + b) on impression logs (collected under "
            "randomised blend weights): x = request-context columns, r = the task scores the service returned, "
            "engaged / reward = what the user did. Writes learned_blend.json + learned_blend.safetensors into "
            "MODEL_DIR; 'mtrank serve MODEL_DIR' then ranks each request's candidates by r . f(context) (a "
            "request's own 'blend' still wins; 'mtrank serve --no-learned-blend' ignores it)."
        ),
    )
    fl.add_argument("logs", help="CSV or Parquet file, one row per impression")
    fl.add_argument("--model-dir", required=True, help="the served model's directory (its tasks are checked)")
    fl.add_argument("--context", nargs="+", required=True, help="numeric request-context columns: the inputs x")
    fl.add_argument("--tasks", nargs="+", required=True, help="task names, in the order of --scores")
    fl.add_argument("--scores", nargs="+", required=True, help="the logged score column of each task")
    fl.add_argument("--engaged", required=True, help="column: 1 if the impression was engaged with, else 0")
    fl.add_argument("--reward", required=True, help="column: the value of the engagement (0 when not engaged)")
    fl.add_argument("--default-weights", type=float, nargs="+", help="w0, the production blend (default 1 each)")
    fl.add_argument("--l2-pull", type=float, default=2.0, help="lambda, the pull toward w0 (default 2)")
    fl.add_argument("--hidden", type=int, nargs="+", default=[32], help="hidden widths of f (default 32)")
    fl.add_argument("--epochs", type=int, default=20)
    fl.add_argument("--seed", type=int, default=0)
    fl.add_argument("--torch-threads", type=int, default=1)
