"""The bias of CVR models against a known truth: a naive CVR model trained on clicked rows vs ESMM, ESCM2 (IPS,
DR) and AITM, on the simulated click -> conversion funnel (:func:`mtrank.data.synthetic.make_funnel`).

Every model is the same MMoE block (4 experts of 32 units, towers of 16) over the same rows; only the task
dependency (``cvr depends_on ctr``) and the ``funnel`` section differ. Each seed draws a new funnel (its own
rows and true CVR), splits it 60/20/20, trains every model from the same initialisation seed with the best
validation step kept (monitor ``loss``), and scores pCVR on every test impression. Against the true CVR:

* ``bias``: mean(pCVR - true CVR) over every test impression (and over the impressions not clicked);
* ``rmse``: root mean squared error to the true CVR over every impression;
* ``auc cvr``: AUC of pCVR against the observed conversions of clicked test rows (what a log can measure).

Paired differences to the naive model (the same seed = the same rows) with 95% percentile-bootstrap intervals
(:func:`mtrank.stats.paired_bootstrap`, 10,000 resamples of the seeds).

    python benchmarks/zoo_funnel.py --epochs 10    # 50,000 impressions, 5 seeds: docs/results/zoo_funnel.{json,md}
    python benchmarks/zoo_funnel.py --epochs 10 --click-bias -4 --out docs/results/zoo_funnel-sparse   # CTR 7%
    python benchmarks/zoo_funnel.py --quick        # 3,000 impressions, 1 epoch, 2 seeds (seconds; tested)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from mtrank.config import ModelConfig, TrainConfig
from mtrank.data.synthetic import SyntheticFunnelConfig, make_funnel
from mtrank.evaluate.report import fmt_mean_std, markdown_table
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.stats import paired_bootstrap
from mtrank.train import Trainer

REPO = Path(__file__).resolve().parents[1]
FUNNELS = {
    "naive": {"type": "none"},
    "esmm": {"type": "esmm"},
    "escm2-ips": {"type": "escm2", "counterfactual": "ips"},
    "escm2-dr": {"type": "escm2", "counterfactual": "dr"},
    "aitm": {"type": "aitm"},
}
METRICS = ("bias", "bias_unclicked", "rmse", "auc_cvr")


def model_config(dims: int, funnel: dict) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "inputs": {"num_dense": dims},
            "tasks": [{"name": "ctr"}, {"name": "cvr", "depends_on": "ctr"}],
            "block": {"type": "mmoe", "num_experts": 4},
            "experts": {"hidden": [32]},
            "towers": {"hidden": [16]},
            "funnel": funnel,
        }
    )


def cvr_metrics(p_cvr: np.ndarray, true_cvr: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    clicked = labels[:, 0] == 1
    error = p_cvr - true_cvr
    return {
        "bias": float(error.mean()),
        "bias_unclicked": float(error[~clicked].mean()),
        "rmse": float(np.sqrt((error**2).mean())),
        "auc_cvr": float(roc_auc_score(labels[clicked, 1], p_cvr[clicked])),
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, progress=False)
    runs: dict[str, list[dict]] = {name: [] for name in args.models}
    data_facts = []
    started = time.perf_counter()
    for seed in range(args.seeds):
        data, true_cvr = make_funnel(SyntheticFunnelConfig(n=args.rows, click_bias=args.click_bias, seed=seed))
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        cut = [int(len(data) * 0.6), int(len(data) * 0.8)]
        train, valid, test = data[order[: cut[0]]], data[order[cut[0] : cut[1]]], data[order[cut[1] :]]
        test_cvr = true_cvr[order[cut[1] :]].numpy()
        labels = test.labels.numpy()
        data_facts.append(
            {"seed": seed, "ctr": float(data.labels[:, 0].mean()), "true_cvr": float(true_cvr.mean())}
            | {"true_cvr_clicked": float(true_cvr[data.labels[:, 0] == 1].mean())}
        )
        for name in args.models:
            model = MultiTaskModel(model_config(data.dense.shape[1], FUNNELS[name]), seed=seed)
            Trainer(model, TrainConfig(**{**train_config.to_dict(), "seed": seed})).fit(train, valid)
            p_cvr = model.predict(test.dense, test.sparse)[:, 1].numpy()
            result = cvr_metrics(p_cvr, test_cvr, labels)
            result |= {"seed": seed, "params": count_parameters(model)}
            runs[name].append(result)
            print(f"{name} seed {seed}: {result}", file=sys.stderr)
    comparisons = {}
    if "naive" in runs:
        for name in args.models:
            if name == "naive":
                continue
            comparisons[name] = {
                metric: paired_bootstrap(
                    [abs(r[metric]) if "bias" in metric else r[metric] for r in runs[name]],
                    [abs(r[metric]) if "bias" in metric else r[metric] for r in runs["naive"]],
                )
                for metric in METRICS
            }
    return {
        "command": " ".join(["python benchmarks/zoo_funnel.py", *sys.argv[1:]]),
        "funnel": SyntheticFunnelConfig(n=args.rows, click_bias=args.click_bias).__dict__ | {"seed": "0 .. seeds - 1"},
        "rows": args.rows,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
        "data": data_facts,
        "runs": runs,
        "paired_vs_naive": comparisons,
    }


def table(results: dict) -> str:
    header = ["model", "params", "bias (all)", "bias (not clicked)", "RMSE to truth", "AUC cvr (clicked)"]
    header += ["|bias| - naive [95% CI]", "RMSE - naive [95% CI]"]
    rows = []
    for name, runs in results["runs"].items():
        row = [name, f"{runs[0]['params']:,}"]
        row += [fmt_mean_std([r[metric] for r in runs]) for metric in METRICS]
        paired = results["paired_vs_naive"].get(name)
        for metric in ("bias", "rmse"):
            if paired is None:
                row.append("—")
            else:
                p = paired[metric]
                row.append(f"{p['estimate']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}]")
        rows.append(row)
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3,000 impressions, 1 epoch, 2 seeds")
    parser.add_argument("--rows", type=int, default=50_000, help="impressions per seed")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--click-bias", type=float, default=-2.0, help="sets the CTR (-2: about 23%%, -4: 7%%)")
    parser.add_argument("--models", nargs="+", default=list(FUNNELS), choices=list(FUNNELS))
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "zoo_funnel"), help="output path stem")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.epochs, args.seeds = 3_000, 1, 2
    results = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
