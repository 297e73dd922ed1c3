"""Smoke table of the model zoo on census group 1 (income, never married): every snippet of docs/model-zoo.md
trained a few epochs on CPU for a few seeds, with test AUC, training samples/s and the expert-health report.

Not the study (matched parameter budgets, tuning, >= 10 seeds, paired differences): a check that every
architecture trains to a sensible AUC on real data, and what it costs.

    python benchmarks/zoo_smoke.py                 # 2 epochs, 3 seeds: docs/results/zoo_smoke.{json,md}
    python benchmarks/zoo_smoke.py --quick         # 1 epoch, 1 seed, 3,000 training rows (seconds; tested)

Data: configs/census_income.yaml's files and features (read and encoded once); one torch thread.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from mtrank.config.experiment import experiment_from_dict
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.splits import encode_table, load_splits
from mtrank.evaluate.gates import model_gate_report
from mtrank.evaluate.metrics import evaluate
from mtrank.evaluate.report import fmt_mean_std, markdown_table, mean_std
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.train import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_snippets import REPO, zoo_snippets  # noqa: E402


def census_config(shared_data: Path, epochs: int, model: dict, device: str = "cpu") -> dict:
    raw = yaml.safe_load((REPO / "configs" / "census_income.yaml").read_text())
    for key in ("train", "test"):
        raw["data"][key] = str(shared_data / raw["data"][key].removeprefix("../../shared/data/"))
    raw["model"] = model
    raw["train"].update(epochs=epochs, progress=False, device=device)
    return raw


def subsample(data, rows: int, seed: int = 0):
    if not rows or len(data) <= rows:
        return data
    return data[torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:rows]]


def health_summary(report: dict) -> dict:
    levels = report["experts"]
    spreads = [level["scale_spread"] for level in levels]
    return {
        "active_experts": {task: t["active_experts"] for task, t in report["tasks"].items()},
        "max_zero_activation": max(max(level["zero_activation_ratio"]) for level in levels),
        "max_scale_spread": None if None in spreads else max(spreads),
        "occupied_shared": sum(level["occupied_shared_experts"] for level in levels),
        "shared": sum(len(level["shared_occupancy"]) for level in levels),
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    snippets = zoo_snippets()
    names = args.models or list(snippets)
    first = experiment_from_dict(census_config(Path(args.shared_data), args.epochs, snippets[names[0]]))
    started = time.perf_counter()
    splits = load_splits(first)
    train_table, train_source = splits["train"]
    encoder = FeatureEncoder(first.features).fit(train_table, train_source)
    data = {role: encode_table(encoder, table, first, source) for role, (table, source) in splits.items()}
    data = {role: subsample(split, args.rows) for role, split in data.items()}
    prep_seconds = time.perf_counter() - started
    tasks = [t.name for t in first.tasks]
    runs: dict[str, list[dict]] = {}
    for name in names:
        config = experiment_from_dict(census_config(Path(args.shared_data), args.epochs, snippets[name], args.device))
        for seed in range(args.seeds):
            config.train.seed = seed
            model_config = config.model_config(encoder.num_dense, encoder.vocab_sizes, encoder.bag_inputs)
            model = MultiTaskModel(model_config, seed=seed)
            trainer = Trainer(model, config.train)
            result = trainer.fit(data["train"], data["valid"])
            runs.setdefault(name, []).append(
                {
                    "seed": seed,
                    "test": evaluate(model, data["test"]),
                    "params": count_parameters(model),
                    "samples_per_second": result.samples / max(result.seconds - result.eval_seconds, 1e-9),
                    "health": health_summary(model_gate_report(model, data["test"])),
                    "step_path": trainer.step_path,
                }
            )
            print(f"{name} seed {seed}: {runs[name][-1]['test']}", file=sys.stderr)
    return {
        "command": " ".join(["python benchmarks/zoo_smoke.py", *sys.argv[1:]]),
        "tasks": tasks,
        "rows": {role: len(split) for role, split in data.items()},
        "epochs": args.epochs,
        "seeds": args.seeds,
        "prep_seconds": prep_seconds,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "runs": runs,
    }


def table(results: dict) -> str:
    tasks = results["tasks"]
    header = ["model", "params", *[f"AUC {t}" for t in tasks], "train samples/s", "active experts / row"]
    header += ["max zero act.", "max scale spread", "occupied shared"]
    rows = []
    for name, runs in results["runs"].items():
        row = [name, f"{runs[0]['params']:,}"]
        row += [fmt_mean_std([r["test"].get(f"auc/{t}", math.nan) for r in runs]) for t in tasks]
        row.append(f"{mean_std([r['samples_per_second'] for r in runs])[0]:,.0f}")
        health = runs[0]["health"]  # seed 0
        row.append(" / ".join(f"{health['active_experts'][t]:.2f}" for t in tasks))
        spread = health["max_scale_spread"]
        row += [
            f"{health['max_zero_activation']:.2f}",
            "inf" if spread is None else f"{spread:.1f}",
            f"{health['occupied_shared']}/{health['shared']}",
        ]
        rows.append(row)
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, 3,000 rows per split")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=0, help="rows kept per split (0 = all)")
    parser.add_argument("--models", nargs="+", help="snippet names (default: all of docs/model-zoo.md)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the step is a CUDA graph where exact)")
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "zoo_smoke"))
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.rows = 1, 1, 3000
    results = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(f"Produced by: `{results['command']}`\n\n{table(results)}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
