"""mtrank against a tuned gradient-boosting baseline, with the same trial budget, on real data (docs/quality.md).

Per data set (``configs/*.yaml`` through the pipeline; the split is the config's, read once):

1. **Search, validation only.** mtrank: ``--trials`` optuna trials (:func:`mtrank.tune.search`) over the block
   (MMoE, Shared-Bottom, Single-task), experts, widths, dropout, embedding width, learning rate, weight decay and
   the numeric features' embedding (none, PLE, periodic), maximising the mean validation AUC of the tasks; each
   run trains up to twice the config's epochs, evaluated every half epoch, stopped after 3 evaluations without
   a lower validation loss, its best step kept. The
   GBDT (scikit-learn ``HistGradientBoosting``): ``--trials`` trials per task over its default space
   (:data:`mtrank.tune.BASELINE_SPACES`), maximising that task's validation AUC, boosting early-stopped on the
   same validation rows.
2. **Final runs.** Each chosen setting trained with ``--seeds`` seeds (initialisation and batch order for the
   network, ``random_state`` for the GBDT: its feature subsampling), scored on the test split.
3. **Paired differences.** mtrank minus GBDT per task with a 95% interval from a paired bootstrap that resamples
   the test rows (both methods scored on the same resampled rows) and the seeds.
4. **Ablations on the same split and seeds:** the chosen network with the other numeric embedding (none if it
   chose one, PLE if it chose none); and, on clothing reviews with ``rating`` and ``positive_feedback`` as
   regression tasks, label scaling against none: ``standardize`` for both, and ``log1p_standardize`` for the
   heavy-tailed feedback count (:data:`LABEL_VARIANTS`).

    python benchmarks/quality_vs_gbdt.py --trials 20 --seeds 5 --threads 1       # docs/results/quality_vs_gbdt/
    python benchmarks/quality_vs_gbdt.py --quick --out /tmp/q                    # seconds: the whole path, tiny

Writes ``OUT/results.json`` (every number) and ``OUT/results.md`` (the tables of docs/quality.md); the optuna
studies go to ``OUT/studies-<data set>.db`` (a rerun resumes them; one process per data set may run at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.stats import rankdata

from mtrank.config.experiment import SearchParam, experiment_from_dict
from mtrank.data.readers import encode_labels
from mtrank.data.splits import encode_table, load_splits
from mtrank.evaluate.baseline import fit_baseline
from mtrank.evaluate.metrics import predict_batches
from mtrank.evaluate.report import markdown_table
from mtrank.pipeline import fit_splits
from mtrank.tune import BASELINE_SPACES, baseline_data, search, with_params

REPO = Path(__file__).resolve().parents[1]
CENSUS_EDUCATION = [  # group 2's main task: associates degree or higher (mtrank.data.census.ASSOCIATES_OR_HIGHER)
    " Associates degree-occup /vocational",
    " Associates degree-academic program",
    " Bachelors degree(BA AB BS)",
    " Masters degree(MA MS MEng MEd MSW MBA)",
    " Prof school degree (MD DDS DVM LLB JD)",
    " Doctorate degree(PhD EdD)",
]
NETWORK_SPACE = {
    "train.lr": {"low": 3e-4, "high": 1e-2, "log": True},
    "train.weight_decay": {"low": 1e-7, "high": 1e-3, "log": True},
    "model.block.type": {"choices": ["mmoe", "shared_bottom", "single_task"]},
    "model.block.num_experts": {"low": 2, "high": 8},
    "model.experts.hidden": {"choices": [[16], [32], [64], [64, 32]]},
    "model.experts.dropout": {"low": 0.0, "high": 0.3},
    "model.inputs.embedding_dim": {"choices": [4, 8, 16]},
    "numeric_embedding": {"choices": ["none", "ple", "periodic"]},  # every numeric feature (script-level)
}
EMBEDDINGS = {
    "none": {"type": "none"},
    "ple": {"type": "ple", "bins": 16},
    "periodic": {"type": "periodic", "frequencies": 16, "sigma": 1.0},
}


# ---------------------------------------------------------------------------------------------- data sets


CONFIGS = {  # data set -> its config in configs/
    "clothing": "womens_clothing_reviews",
    "clothing_regression": "womens_clothing_reviews",
    "census1": "census_income",
    "census2": "census_income",
    "movielens": "movielens_100k",
}


def raw_config(name: str, args: argparse.Namespace) -> dict:
    """The experiment of data set ``name``: a config of ``configs/`` (census group 2 and the regression variant of
    clothing reviews derived from theirs), data paths at ``--shared-data`` (MovieLens-100K: ``--movielens``, not
    shipped)."""
    raw = yaml.safe_load((REPO / "configs" / f"{CONFIGS[name]}.yaml").read_text())
    for key in ("train", "valid", "test"):
        if "shared/data/" in raw["data"].get(key, ""):
            raw["data"][key] = str(Path(args.shared_data) / raw["data"][key].split("shared/data/", 1)[1])
    if name == "movielens":
        raw["data"]["train"] = args.movielens
    raw["train"]["progress"] = False
    raw["baseline"] = {"enabled": False}
    if name == "census2":
        raw["name"] = "census-income group 2 (education, never married)"
        raw["tasks"][0] = {"name": "education", "column": "education", "positive_values": CENSUS_EDUCATION}
    if name == "clothing_regression":
        raw["name"] = "womens-clothing-reviews (recommended; rating and positive feedback count as regression)"
        raw["tasks"] = [
            {"name": "recommended", "column": "Recommended IND"},
            {"name": "rating", "column": "Rating", "type": "regression"},
            {"name": "positive_feedback", "column": "Positive Feedback Count", "type": "regression"},
        ]
    if args.quick:
        raw["train"]["epochs"] = 1
    else:  # twice the config's epochs, stopped early on validation loss (the GBDT's rounds stop early too)
        raw["train"].update(epochs=2 * raw["train"]["epochs"], early_stopping_patience=3, monitor="loss")
    return raw


def read_splits(config, args: argparse.Namespace) -> tuple:
    """The splits (read once), and ``config`` evaluating every half epoch."""
    splits = load_splits(config)
    if args.quick:  # the first rows of each split
        sizes = {"train": 2000, "valid": 600, "test": 600}
        splits = {role: (table.slice(0, sizes[role]), source) for role, (table, source) in splits.items()}
    elif args.max_train_rows and splits["train"][0].num_rows > args.max_train_rows:  # a seeded sample
        table, source = splits["train"]
        rows = np.sort(np.random.default_rng(0).choice(table.num_rows, args.max_train_rows, replace=False))
        splits["train"] = (table.take(rows), f"{source} ({args.max_train_rows:,} sampled rows)")
    steps = -(-splits["train"][0].num_rows // config.train.batch_size)
    return splits, with_params(config, {"train.eval_every": max(1, steps // 2)})


def with_embedding(config, kind: str):
    """``config`` with every numeric feature embedded as ``kind`` (:data:`EMBEDDINGS`)."""
    params = {f"features.numeric.{f.name}.embedding": EMBEDDINGS[kind] for f in config.features.numeric}
    return with_params(config, params)


def network_config(config, params: dict):
    """The experiment of one point of :data:`NETWORK_SPACE`."""
    params = dict(params)
    kind = params.pop("numeric_embedding", "none")
    return with_embedding(with_params(config, params), kind)


# ---------------------------------------------------------------------------------------------- runs


def network_test_scores(config, splits: dict, seed: int) -> tuple[np.ndarray, dict, float]:
    """Train ``config`` with ``seed``; test scores ``[N, K]`` (probabilities / predictions), the metrics, seconds."""
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    started = time.perf_counter()
    result = fit_splits(config, splits, None, False, False)
    table, source = splits["test"]
    test = encode_table(result.encoder, table, config, source)
    logits, _ = predict_batches(result.model, test)
    scores = result.model.scores(logits).double().numpy()
    return scores, result.metrics, time.perf_counter() - started


def gbdt_test_scores(config, data, task_params: dict, seed: int) -> tuple[np.ndarray, dict, float]:
    spec = dataclasses.replace(config.baseline, task_params=task_params)
    started = time.perf_counter()
    fitted = fit_baseline(
        spec, config.tasks, data.encoder, data.labels, data.train, data.splits, seed, keep_predictions=True
    )
    return fitted["predictions"]["test"], fitted["metrics"], time.perf_counter() - started


def tune_network(name: str, config, splits: dict, args: argparse.Namespace) -> dict:
    space = {k: SearchParam.from_dict(v, k) for k, v in NETWORK_SPACE.items()}
    tasks = [t.name for t in config.tasks if t.type == "binary"]

    def evaluate(params: dict, report) -> tuple[float, dict]:
        result = fit_splits(network_config(config, params), splits, None, False, False, ("valid",))
        valid = result.metrics["valid"]
        return float(np.mean([valid[f"auc/{t}"] for t in tasks])), {"valid": valid}

    started = time.perf_counter()
    study = search(space, evaluate, args.trials, args.storage, f"{name}-mtrank", "maximize", seed=0, startup_trials=5)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    return {
        "trials": len(study.trials),
        "best_trial": study.best_trial.number,
        "best_value": study.best_value,
        "best_params": {k: _decode(v) for k, v in study.best_trial.params.items()},
        "seconds": time.perf_counter() - started,
        "trial_values": [t.value for t in complete],
    }


def tune_gbdt(name: str, config, data, args: argparse.Namespace) -> dict:
    space = {k: SearchParam.from_dict(v, k) for k, v in BASELINE_SPACES["sklearn"].items()}
    valid = {"valid": data.splits["valid"]}
    out = {}
    for task in config.tasks:
        metric = f"auc/{task.name}" if task.type == "binary" else f"r2/{task.name}"

        def evaluate(params: dict, report, task=task, metric=metric) -> tuple[float, dict]:
            spec = dataclasses.replace(config.baseline, task_params={task.name: params})
            fitted = fit_baseline(spec, config.tasks, data.encoder, data.labels, data.train, valid, 0, only=[task.name])
            return fitted["metrics"]["valid"][metric], {"rounds": fitted["rounds"][task.name]}

        started = time.perf_counter()
        study = search(space, evaluate, args.trials, args.storage, f"{name}-gbdt-{task.name}", "maximize", 0, 5, False)
        out[task.name] = {
            "best_value": study.best_value,
            "best_params": study.best_trial.params,
            "rounds": study.best_trial.user_attrs.get("rounds"),
            "seconds": time.perf_counter() - started,
        }
    return out


def _decode(value):
    return json.loads(value) if isinstance(value, str) and value[:1] == "[" else value


# ---------------------------------------------------------------------------------------------- statistics


def auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of each row of ``scores [R, n]`` for 0/1 ``labels [n]`` (ties count half; scikit-learn's)."""
    positive = labels > 0.5
    m = positive.sum()
    ranks = rankdata(scores, axis=1)
    return (ranks[:, positive].sum(1) - m * (m + 1) / 2) / (m * (len(labels) - m))


def r2_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    total = ((labels - labels.mean()) ** 2).sum()
    return 1.0 - ((scores - labels) ** 2).sum(1) / total


def paired_interval(labels, a: np.ndarray, b: np.ndarray, metric: str, n_boot: int, seed: int = 0) -> dict:
    """``mean_s metric(a_s) - mean_s metric(b_s)`` on the test rows (``a``, ``b``: ``[S, n]`` scores of S seeds)
    and its 95% percentile interval from a paired bootstrap: each draw resamples the rows (both methods on the
    same rows) and the seeds (the same seed indices for both: seed s of one method is not seed s of the other,
    but both sets are drawn alike)."""
    present = ~np.isnan(labels)
    y, a, b = labels[present], a[:, present], b[:, present]
    score = auc_rows if metric == "auc" else r2_rows
    estimate = float(score(y, a).mean() - score(y, b).mean())
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for i in range(n_boot):
        rows = rng.integers(0, len(y), len(y))
        seeds = rng.integers(0, len(a), len(a))
        if metric == "auc" and (y[rows].min() == y[rows].max()):
            draws[i] = math.nan
            continue
        draws[i] = score(y[rows], a[seeds][:, rows]).mean() - score(y[rows], b[seeds][:, rows]).mean()
    low, high = np.nanquantile(draws, [0.025, 0.975])
    return {"estimate": estimate, "low": float(low), "high": float(high), "n_boot": n_boot, "seeds": len(a)}


def summary(values: list[float]) -> dict:
    x = np.asarray(values, dtype=float)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0, "runs": x.tolist()}


def compare(config, splits, a_scores, b_scores, a_metrics, b_metrics, args) -> dict:
    """Per task: both methods' test metric over seeds and the paired difference ``a - b``."""
    table, source = splits["test"]
    labels = encode_labels(table, config.tasks, source).astype(np.float64)
    out = {}
    for k, task in enumerate(config.tasks):
        metric = "auc" if task.type == "binary" else "r2"
        key = f"{metric}/{task.name}"
        a = np.stack([s[:, k] for s in a_scores])
        b = np.stack([s[:, k] for s in b_scores])
        out[task.name] = {
            "metric": metric,
            "a": summary([m["test"][key] for m in a_metrics]),
            "b": summary([m["test"][key] for m in b_metrics]),
            "difference": paired_interval(labels[:, k], a, b, metric, args.n_boot),
        }
    return out


# ---------------------------------------------------------------------------------------------- data sets


def run_dataset(name: str, args: argparse.Namespace) -> dict:
    args.storage = f"sqlite:///{(Path(args.out) / f'studies-{name}.db').resolve()}"  # one per data set: parallel runs
    config = experiment_from_dict(raw_config(name, args), source=f"{name}.yaml")
    started = time.perf_counter()
    splits, config = read_splits(config, args)
    rows = {role: table.num_rows for role, (table, _) in splits.items()}
    sampled = "sampled rows" in splits["train"][1]
    print(f"{name}: rows {rows}", flush=True)
    data = baseline_data(config, splits)
    network = tune_network(name, config, splits, args)
    print(f"{name}: mtrank search {network['seconds']:.0f} s, best {network['best_value']:.4f}", flush=True)
    gbdt = tune_gbdt(name, config, data, args)
    print(f"{name}: GBDT search {sum(g['seconds'] for g in gbdt.values()):.0f} s", flush=True)
    best = network_config(config, network["best_params"])
    chosen = network["best_params"]["numeric_embedding"]
    other = "ple" if chosen == "none" else "none"
    ablation = network_config(config, {**network["best_params"], "numeric_embedding": other})
    runs: dict[str, dict] = {"mtrank": {}, "gbdt": {}, f"mtrank, numeric embedding {other}": {}}
    gbdt_params = {task: g["best_params"] for task, g in gbdt.items()}
    for seed in range(args.seeds):
        for label, run in (
            ("mtrank", lambda s: network_test_scores(best, splits, s)),
            ("gbdt", lambda s: gbdt_test_scores(config, data, gbdt_params, s)),
            (f"mtrank, numeric embedding {other}", lambda s: network_test_scores(ablation, splits, s)),
        ):
            scores, metrics, seconds = run(seed)
            entry = runs[label]
            entry.setdefault("scores", []).append(scores)
            entry.setdefault("metrics", []).append(metrics)
            entry.setdefault("seconds", []).append(seconds)
        print(f"{name}: seed {seed} done", flush=True)
    results = {
        "config": config.source,
        "name": config.name,
        "rows": rows,
        "train_rows_sampled": sampled,  # --max-train-rows cut the training split to a seeded sample
        "tasks": [t.name for t in config.tasks],
        "search": {"mtrank": network, "gbdt": gbdt},
        "numeric_embedding": {"chosen": chosen, "ablation": other},
        "vs_gbdt": compare(
            config,
            splits,
            runs["mtrank"]["scores"],
            runs["gbdt"]["scores"],
            runs["mtrank"]["metrics"],
            runs["gbdt"]["metrics"],
            args,
        ),  # fmt: skip
        "embedding_ablation": compare(
            config,
            splits,
            runs["mtrank"]["scores"],
            runs[f"mtrank, numeric embedding {other}"]["scores"],
            runs["mtrank"]["metrics"],
            runs[f"mtrank, numeric embedding {other}"]["metrics"],
            args,
        ),
        "seconds_per_run": {label: summary(r["seconds"]) for label, r in runs.items()},
        "seconds": time.perf_counter() - started,
    }
    if name == "clothing" and args.label_ablation:
        results["label_scaling"] = label_ablation(network["best_params"], args)
    return results


LABEL_VARIANTS = {  # tasks.<name>.label_transform of the regression tasks
    "standardize": {"rating": "standardize", "positive_feedback": "standardize"},
    "log1p": {"rating": "standardize", "positive_feedback": "log1p_standardize"},
}


def label_ablation(best_params: dict, args: argparse.Namespace) -> dict:
    """Clothing reviews with two regression tasks: the chosen network with label scaling (``standardize``; and
    ``log1p_standardize`` for the heavy-tailed feedback count) against none."""
    config = experiment_from_dict(raw_config("clothing_regression", args), source="clothing_regression.yaml")
    splits, config = read_splits(config, args)
    variants = {"none": config}
    for label, transforms in LABEL_VARIANTS.items():
        variants[label] = with_params(config, {f"tasks.{t}.label_transform": k for t, k in transforms.items()})
    runs = {}
    for label, variant in variants.items():
        chosen = network_config(variant, best_params)
        runs[label] = [network_test_scores(chosen, splits, seed) for seed in range(args.seeds)]
    out = {"variants": LABEL_VARIANTS}
    base = runs["none"]
    for label in LABEL_VARIANTS:
        a = runs[label]
        out[label] = compare(
            config, splits, [r[0] for r in a], [r[0] for r in base], [r[1] for r in a], [r[1] for r in base], args
        )
    tasks = ("rating", "positive_feedback")
    out["mse"] = {label: {t: summary([r[1]["test"][f"mse/{t}"] for r in runs[label]]) for t in tasks} for label in runs}
    return out


# ---------------------------------------------------------------------------------------------- report


def cell(entry: dict) -> str:
    return f"{entry['mean']:.4f} ± {entry['std']:.4f}"


def interval(d: dict, a: str, b: str) -> str:
    verdict = f"{a} better" if d["low"] > 0 else f"{b} better" if d["high"] < 0 else "within noise"
    return f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] ({verdict})"


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"Budget: {args.trials} trials per search (mtrank: one per data set; GBDT: one per task), {args.seeds} seeds "
        f"of each final setting, {args.n_boot} bootstrap draws; "
        + ("QUICK MODE (tiny, not a result)." if args.quick else "the rows of each data set below."),
        "",
    ]
    for r in results["datasets"].values():
        lines += [f"### {r['name']}", "", f"`{r.get('command', '')}` ({r['seconds'] / 60:.0f} min)", ""]
        net = r["search"]["mtrank"]
        params = ", ".join(f"{k}={v}" for k, v in net["best_params"].items())
        sample = " (training split: a seeded sample of the file's rows)" if r.get("train_rows_sampled") else ""
        lines.append(
            f"Rows {r['rows']}{sample}. mtrank's choice (trial {net['best_trial']} of {net['trials']}): {params}."
        )
        lines.append("")
        rows = []
        for task, c in r["vs_gbdt"].items():
            rows.append(
                [task, c["metric"].upper(), cell(c["a"]), cell(c["b"]), interval(c["difference"], "mtrank", "GBDT")]
            )
        lines.append(
            markdown_table(["task", "metric", "mtrank (tuned)", "GBDT (tuned)", "mtrank - GBDT, 95% CI"], rows)
        )
        lines.append("")
        ab = r["numeric_embedding"]
        rows = []
        for task, c in r["embedding_ablation"].items():
            rows.append([task, cell(c["a"]), cell(c["b"]), interval(c["difference"], ab["chosen"], ab["ablation"])])
        header = ["task", f"embedding {ab['chosen']} (chosen)", f"embedding {ab['ablation']}", "chosen - other, 95% CI"]
        lines += ["Numeric embeddings:", "", markdown_table(header, rows), ""]
        if "label_scaling" in r:
            scaling = r["label_scaling"]
            rows = []
            for label in scaling["variants"]:
                for task, c in scaling[label].items():
                    difference = interval(c["difference"], label, "none")
                    rows.append([label, task, c["metric"].upper(), cell(c["a"]), cell(c["b"]), difference])
            header = ["label scaling", "task", "metric", "with", "none", "with - none, 95% CI"]
            lines += ["Label scaling (clothing reviews, rating and feedback count as regression):", ""]
            lines += [markdown_table(header, rows), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["clothing", "census1", "census2", "movielens"],
                        choices=["clothing", "census1", "census2", "movielens"])  # fmt: skip
    parser.add_argument(
        "--max-train-rows",
        type=int,
        default=0,
        help="train on a seeded sample of this many training rows (0: all); valid and test whole",
    )
    parser.add_argument(
        "--movielens",
        default="/tmp/recbole/x/recbole/dataset_example/ml-100k",
        help="MovieLens-100K as RecBole's atomic files (configs/movielens_100k.yaml says how)",
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--no-label-ablation", dest="label_ablation", action="store_false")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "quality_vs_gbdt"))
    parser.add_argument("--quick", action="store_true", help="tiny: 2 trials, 2 seeds, 2,000 training rows")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.seeds, args.n_boot, args.datasets = 2, 2, 50, ["clothing"]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
    command = "python benchmarks/quality_vs_gbdt.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results.update(
        trials=args.trials,
        seeds=args.seeds,
        n_boot=args.n_boot,
        quick=args.quick,
        torch_threads=args.threads,
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
    )
    for name in args.datasets:
        entry = {**run_dataset(name, args), "command": command}
        if path.is_file():  # another process may have written other data sets meanwhile
            results["datasets"] = json.loads(path.read_text())["datasets"]
        results["datasets"][name] = entry
        path.write_text(json.dumps(results, indent=1, default=float))  # after each data set
    (out / "results.md").write_text(markdown(results, args))
    print(markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
