"""Real-data quality: Single-task, Shared-Bottom, OMoE, MMoE through the data pipeline; AUC per task, seeds.

Each data set is one config in ``configs/``; its files are read, split and encoded once (the split seed is the
config's), then every (block, seed) trains a fresh model on the same encoded splits with
:class:`mtrank.train.Trainer`, selecting the best validation step, and is scored on test.

    python benchmarks/quality.py   # all data sets, 5 seeds: docs/results/quality.json, docs/benchmarks-quality.md
    python benchmarks/quality.py --datasets clothing --seeds 5 --epochs 3
    python benchmarks/quality.py --movielens /path/to/ml-100k --movielens-format movielens-grouplens

MovieLens-100K is not shipped: give its folder (RecBole atomic files by default; configs/movielens_100k.yaml).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from mtrank.config.experiment import experiment_from_dict
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.splits import encode_table, load_splits
from mtrank.evaluate.metrics import evaluate
from mtrank.evaluate.report import fmt_mean_std, markdown_table, mean_std
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.stats import MIN_PAIRS, paired_bootstrap, verdict
from mtrank.train import Trainer

REPO = Path(__file__).resolve().parents[1]
BLOCKS = ["single_task", "shared_bottom", "omoe", "mmoe"]
DATASETS = {
    "census": "census_income.yaml",
    "clothing": "womens_clothing_reviews.yaml",
    "movielens": "movielens_100k.yaml",
}


def load_config(name: str, args: argparse.Namespace) -> dict:
    raw = yaml.safe_load((REPO / "configs" / DATASETS[name]).read_text())
    shared = Path(args.shared_data)
    for key in ("train", "valid", "test"):
        value = raw["data"].get(key, "")
        if "shared/data/" in value:  # the configs reach ../shared/data from their own folder
            raw["data"][key] = str(shared / value.split("shared/data/", 1)[1])
    if name == "movielens":
        raw["data"]["train"] = args.movielens
        raw["data"]["format"] = args.movielens_format
    raw["train"]["progress"] = False
    if args.epochs:
        raw["train"]["epochs"] = args.epochs
    return raw


def with_block(model, block: str):
    """The config's model with another block type (``single_task``, ``shared_bottom``, ``omoe``, ``mmoe``)."""
    return dataclasses.replace(model, block=dataclasses.replace(model.block, type=block))


def run_dataset(name: str, args: argparse.Namespace) -> dict:
    raw = load_config(name, args)
    config = experiment_from_dict(raw, source=DATASETS[name])
    start = time.perf_counter()
    splits = load_splits(config)
    train_table, train_source = splits["train"]
    encoder = FeatureEncoder(config.features).fit(train_table, train_source)
    data = {role: encode_table(encoder, table, config, source) for role, (table, source) in splits.items()}
    prep_seconds = time.perf_counter() - start
    tasks = [t.name for t in config.tasks]
    runs: dict[str, list[dict]] = {}
    bar = tqdm(total=len(BLOCKS) * len(args.seeds), desc=name, unit="run")
    for block in BLOCKS:
        for seed in args.seeds:
            config.model = with_block(config.model, block)
            config.train.seed = seed
            torch.manual_seed(seed)
            model = MultiTaskModel(config.model_config(encoder.num_dense, encoder.vocab_sizes))
            result = Trainer(model, config.train).fit(data["train"], data["valid"])
            test = evaluate(model, data["test"])
            runs.setdefault(block, []).append(
                {
                    "seed": seed,
                    "test": test,
                    "best_step": result.best_step,
                    "seconds": result.seconds,
                    "params": count_parameters(model),
                }
            )
            bar.update(1)
            bar.set_postfix(block=block, auc=f"{test.get(f'auc/{tasks[0]}', math.nan):.4f}")
    bar.close()
    if name == "census" and args.compare_census_loader:
        runs.update(census_loader_runs(config, args))
    return {
        "config": DATASETS[name],
        "name": config.name,
        "tasks": tasks,
        "rows": {k: len(v) for k, v in data.items()},
        "prep_seconds": prep_seconds,
        "epochs": config.train.epochs,
        "model": config.model.to_dict(),
        "runs": runs,
        "inputs": {"num_dense": encoder.num_dense, "vocab_sizes": encoder.vocab_sizes},
    }


def census_loader_runs(config, args: argparse.Namespace) -> dict[str, list[dict]]:
    """MMoE with the same model and training settings on the dedicated census loader's tensors
    (``mtrank.data.census.load_census``, group 1), to show the generic pipeline gives the same quality."""
    try:
        from mtrank.data.census import load_census
    except ImportError:
        print("mtrank.data.census is not available: no dedicated-loader comparison", file=sys.stderr)
        return {}
    data = load_census(Path(args.shared_data) / "census-income", group=1)
    runs = []
    for seed in tqdm(args.seeds, desc="census loader", unit="run"):
        config.model = with_block(config.model, "mmoe")
        config.train.seed = seed
        torch.manual_seed(seed)
        model = MultiTaskModel(config.model_config(data.num_dense, data.vocab_sizes))
        result = Trainer(model, config.train).fit(data.train, data.valid)
        test = evaluate(model, data.test)
        test = {k.replace("/marital", "/never_married"): v for k, v in test.items()}
        runs.append(
            {
                "seed": seed,
                "test": test,
                "best_step": result.best_step,
                "seconds": result.seconds,
                "params": count_parameters(model),
            }
        )
    return {"mmoe (dedicated loader)": runs}


def comparisons(result: dict, n_boot: int = 10_000) -> str:
    """MMoE minus each other model, per task: the mean test-AUC difference over the seeds, paired by seed (the
    same splits), with its 95% paired-bootstrap interval and the verdict it supports (training randomness
    only: every run is scored on the same test rows)."""
    if "mmoe" not in result["runs"]:
        return ""
    rows = []
    for task in result["tasks"]:
        mine = [r["test"].get(f"auc/{task}", math.nan) for r in result["runs"]["mmoe"]]
        for block, runs in result["runs"].items():
            if block == "mmoe" or "dedicated loader" in block or len(runs) != len(mine):  # other test rows
                continue
            theirs = [r["test"].get(f"auc/{task}", math.nan) for r in runs]
            ci = paired_bootstrap(mine, theirs, n_boot=n_boot)
            interval = f"[{ci['low']:+.4f}, {ci['high']:+.4f}]"
            decided = verdict(ci, "mmoe", block) if len(mine) >= MIN_PAIRS else f"too few seeds ({len(mine)})"
            rows.append([task, f"mmoe − {block}", f"{ci['estimate']:+.4f}", interval, decided])
    return markdown_table(["task", "comparison", "mean diff", "95% interval (paired bootstrap)", "verdict"], rows)


def table(result: dict) -> str:
    header = ["model", "params"] + [f"AUC {t}" for t in result["tasks"]] + ["s / run"]
    rows = []
    for block, runs in result["runs"].items():
        row = [block, f"{runs[0]['params']:,}"]
        for task in result["tasks"]:
            row.append(fmt_mean_std([r["test"].get(f"auc/{task}", math.nan) for r in runs]))
        row.append(f"{mean_std([r['seconds'] for r in runs])[0]:.0f}")
        rows.append(row)
    return markdown_table(header, rows)


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# Real-data quality: Single-task, Shared-Bottom, OMoE, MMoE",
        "",
        "Test AUC per task, mean ± std over seeds (sample std), best validation step (monitor `loss`) of "
        "each run. Every block has the same expert width (`expert_hidden`), towers and embeddings, so parameter "
        "counts differ (Single-task: one bottom per task; Shared-Bottom: one; OMoE/MMoE: `num_experts`). "
        "These are the configs' defaults, not tuned per model: the tables compare the models as configured, "
        "not at their best. Below each table, MMoE minus each other model, paired by seed, with a 95% "
        "bootstrap interval over the seeds (training randomness only; every run is scored on the same test "
        "rows) and the verdict it supports (`mtrank.stats`); with fewer than 10 seeds such an interval is too "
        "narrow to decide anything, and none is decided: these tables show levels, not a ranking.",
        "",
        "Data: `census-income` and `womens-clothing-reviews` from `../shared/data`; MovieLens-100K from the "
        "RecBole atomic files in the recbole 1.2.1 wheel (`pip download --no-deps recbole==1.2.1`, not "
        "committed), split by time. `s / run` is training wall time with one torch thread on a 2-core machine "
        "shared with other jobs. Every number here is in `docs/results/quality.json`, written by the same "
        "runs; `--markdown-only` rewrites this file from it.",
        "",
    ]
    for result in results.values():
        seeds = len(next(iter(result["runs"].values())))
        rows = ", ".join(f"{k} {v:,}" for k, v in result["rows"].items())
        lines += [
            f"## {result['name']}",
            "",
            f"Config `configs/{result['config']}`; rows {rows}; {result['epochs']} epochs; {seeds} seeds; "
            f"inputs "
            f"{result['inputs']['num_dense']} dense + {len(result['inputs']['vocab_sizes'])} categorical.",
            "",
            f"Produced by: `{result['command']}`",
            "",
            table(result),
            "",
            comparisons(result),
            "",
        ]
        if any("dedicated loader" in block for block in result["runs"]):
            lines += [
                "`mmoe (dedicated loader)`: the same model and training settings on the tensors of "
                "`mtrank.data.census.load_census(group=1)` (the paper-reproduction loader, with its own 1:1 "
                "validation/test permutation of the test file), to check the generic pipeline against it.",
                "",
            ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    parser.add_argument("--epochs", type=int, default=0, help="override the configs' epochs (0 = keep)")
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--movielens", default="/tmp/recbole/x/recbole/dataset_example/ml-100k")
    parser.add_argument(
        "--movielens-format",
        default="movielens-recbole",
        choices=["movielens-recbole", "movielens-grouplens"],
    )
    parser.add_argument(
        "--compare-census-loader",
        action="store_true",
        help="census: also train MMoE on mtrank.data.census's tensors (the dedicated loader)",
    )
    parser.add_argument("--markdown-only", action="store_true", help="rewrite --out from --json, train nothing")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks-quality.md"))
    parser.add_argument("--json", default=str(REPO / "docs" / "results" / "quality.json"))
    args = parser.parse_args(argv)
    args.seeds = list(range(args.seeds))
    if args.threads:
        torch.set_num_threads(args.threads)
    json_path = Path(args.json)
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if args.markdown_only:
        write_markdown(results, Path(args.out))
        return 0
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in args.datasets:
        results[name] = run_dataset(name, args)
        results[name]["command"] = command.strip()
        print(f"\n{results[name]['name']}\n{table(results[name])}\n", flush=True)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1, default=float))
        write_markdown(results, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
