"""The model zoo at a matched parameter budget and a matched tuning budget: census groups 1 and 2 (Ma et al.'s
income / education + never married) and the clothing reviews (3 tasks), every architecture of
docs/model-zoo.md, mean ± std of test AUC over seeds, the paired difference to MMoE with a 95% interval, and
training samples/s.

* **Parameter budget**: each snippet's expert width (``experts.hidden[0]``; PEPNet: its gates' ``hidden``) is
  set so that its parameter count is the closest to the MMoE snippet's on that data set (embeddings and towers
  are the same for all). What cannot shrink stays: STEM's K + 1 embedding tables may alone exceed the budget;
  the table gives every count.
* **Tuning budget**: every architecture gets the same trials, one training run per learning rate of ``--lrs``
  at tuning seed 1000, scored by the mean validation AUC over tasks; the best learning rate is then trained with
  seeds 0 .. S-1 (each seed: initialisation and batch order; the split is the config's).
* **Scores**: test AUC per task at the best validation step (monitor ``loss``); MMoE minus the architecture,
  paired by seed, :func:`mtrank.stats.paired_bootstrap` (10,000 resamples); samples/s = training rows / training
  seconds (evaluation excluded), torch threads as given.

    python benchmarks/zoo_study.py --rows 40000 --epochs 2 --seeds 10          # CPU: docs/results/zoo_study-cpu.*
    python benchmarks/zoo_study.py --device cuda --epochs 4 --seeds 10 --workers 12 \
        --lrs 0.0003 0.001 0.003 0.01 0.03 --out docs/results/zoo_study-h200     # docs/results/zoo_study-h200.*
    python benchmarks/zoo_study.py --quick --datasets census1 --models mmoe stem   # seconds (tested)
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml

from mtrank.config.experiment import experiment_from_dict
from mtrank.data.census import ASSOCIATES_OR_HIGHER
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.splits import encode_table, load_splits
from mtrank.evaluate.metrics import evaluate
from mtrank.evaluate.report import fmt_mean_std, markdown_table, mean_std
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.stats import paired_bootstrap
from mtrank.train import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_smoke import subsample  # noqa: E402
from zoo_snippets import REPO, zoo_snippets  # noqa: E402

DATASETS = {
    "census1": "census_income.yaml",
    "census2": "census_income.yaml",
    "clothing": "womens_clothing_reviews.yaml",
}
EDUCATION = {"name": "education", "column": "education", "positive_values": [f" {v}" for v in ASSOCIATES_OR_HIGHER]}
TUNING_SEED = 1000


def dataset_config(name: str, shared_data: Path, epochs: int, device: str) -> dict:
    raw = yaml.safe_load((REPO / "configs" / DATASETS[name]).read_text())
    for key in ("train", "valid", "test"):
        if key in raw["data"]:
            raw["data"][key] = str(shared_data / raw["data"][key].removeprefix("../../shared/data/"))
    if name == "census2":  # Ma et al.'s group 2: education (associates or higher) + never married
        raw["tasks"][0] = EDUCATION
    raw["train"].update(epochs=epochs, progress=False, device=device, monitor="loss")
    return raw


def fit_snippet(snippet: dict, tasks: list[str]) -> dict:
    """A snippet made valid for the data set's tasks and features: HoME gets one task group per task; PEPNet
    reads the first categorical columns by index where the data set has no census names."""
    section = copy.deepcopy(snippet)
    if section["block"].get("task_groups"):
        section["block"]["task_groups"] = [[t] for t in tasks]
    return section


def set_expert_width(section: dict, width: int) -> dict:
    section = copy.deepcopy(section)
    section["experts"]["hidden"] = [width, *section["experts"]["hidden"][1:]]
    return section


def set_pepnet_hidden(section: dict, hidden: int) -> dict:
    section = copy.deepcopy(section)
    section["pepnet"]["hidden"] = hidden
    return section


# (what is sized, its value, a section with another value); PEPNet's gates read the whole block input: its
# budget is met by their hidden units, its experts staying MMoE's
EXPERT_WIDTH = ("experts.hidden[0]", lambda s: s["experts"]["hidden"][0], set_expert_width)
KNOBS = {"pepnet": ("pepnet.hidden", lambda s: s["pepnet"]["hidden"], set_pepnet_hidden)}


def matched(section: dict, knob, params_of, target: int) -> dict:
    """The section whose ``knob`` gives the parameter count closest to ``target`` (counts grow with it)."""
    _, _, setter = knob
    lo, hi = 1, 512
    while lo < hi:  # smallest value with params >= target
        mid = (lo + hi) // 2
        if params_of(setter(section, mid)) < target:
            lo = mid + 1
        else:
            hi = mid
    best = min((v for v in (lo - 1, lo) if v >= 1), key=lambda v: abs(params_of(setter(section, v)) - target))
    return setter(section, best)


class DataSet:
    """One data set read, split and encoded once; builds, sizes and trains the models on it."""

    def __init__(self, name: str, args: argparse.Namespace, mmoe: dict) -> None:
        self.name = name
        self.raw = dataset_config(name, Path(args.shared_data), args.epochs, args.device)
        base = experiment_from_dict({**self.raw, "model": mmoe})
        splits = load_splits(base)
        train_table, train_source = splits["train"]
        self.encoder = FeatureEncoder(base.features).fit(train_table, train_source)
        data = {role: encode_table(self.encoder, table, base, source) for role, (table, source) in splits.items()}
        self.data = {role: subsample(split, args.rows) for role, split in data.items()}
        self.tasks = [t.name for t in base.tasks]

    def configs(self, section: dict):
        """``(experiment config, model config)`` of a model section on this data set."""
        if "pepnet" in section and self.name == "clothing":  # no census names here: the first columns
            section = {**section, "pepnet": {**section["pepnet"], "epnet": [0], "ppnet": [1, 2]}}
        config = experiment_from_dict({**self.raw, "model": section})
        encoder = self.encoder
        return config, config.model_config(encoder.num_dense, encoder.vocab_sizes, encoder.bag_inputs)

    def params(self, section: dict) -> int:
        return count_parameters(MultiTaskModel(self.configs(section)[1]))

    def train(self, section: dict, lr: float, seed: int) -> dict:
        config, model_config = self.configs(section)
        config.train.lr, config.train.seed = lr, seed
        model = MultiTaskModel(model_config, seed=seed)
        result = Trainer(model, config.train).fit(self.data["train"], self.data["valid"])
        valid, test = evaluate(model, self.data["valid"]), evaluate(model, self.data["test"])
        return {
            "seed": seed,
            "valid_auc": float(np.mean([valid[f"auc/{t}"] for t in self.tasks])),
            "test": {t: test[f"auc/{t}"] for t in self.tasks},
            "samples_per_second": result.samples / max(result.seconds - result.eval_seconds, 1e-9),
        }


_DATA: dict[str, DataSet] = {}  # per process: each data set read and encoded once


def study_model(args: argparse.Namespace, name: str, model: str) -> tuple[dict, dict]:
    """One architecture on one data set: sized to MMoE's budget, tuned over ``args.lrs`` at the tuning seed, then
    trained with every seed. Returns ``(facts of the data set, the architecture's results)``; with ``--parts``,
    a job whose file is there is read back instead of run (a study cut short resumes)."""
    part = Path(args.parts) / f"{name}-{model}.json" if args.parts else None
    study = {k: getattr(args, k) for k in ("epochs", "seeds", "lrs", "rows", "device")}
    if part is not None and part.exists():
        facts, result, done_as = json.loads(part.read_text())
        if done_as == study:
            return facts, result
        print(f"{part}: done with other settings ({done_as}), run again", file=sys.stderr)
    torch.set_num_threads(args.threads)
    snippets = zoo_snippets()
    if name not in _DATA:
        _DATA[name] = DataSet(name, args, snippets["mmoe"])
    data = _DATA[name]
    target = data.params(fit_snippet(snippets["mmoe"], data.tasks))
    section, knob = fit_snippet(snippets[model], data.tasks), KNOBS.get(model, EXPERT_WIDTH)
    if model != "mmoe":
        section = matched(section, knob, data.params, target)
    started = time.perf_counter()
    trials = {lr: data.train(section, lr, TUNING_SEED)["valid_auc"] for lr in args.lrs}
    lr = max(trials, key=lambda k: trials[k])
    result = {"params": data.params(section), "sized": f"{knob[0]} = {knob[1](section)}", "tuning": trials}
    result |= {"lr": lr, "lr_at_edge": len(args.lrs) > 1 and lr in (min(args.lrs), max(args.lrs))}
    result["runs"] = [data.train(section, lr, s) for s in range(args.seeds)]
    result["seconds"] = time.perf_counter() - started
    edge = " (at the edge of the range)" if result["lr_at_edge"] else ""
    print(f"{name} {model}: lr {lr}{edge}, params {result['params']:,}", file=sys.stderr, flush=True)
    facts = {"tasks": data.tasks, "rows": {role: len(split) for role, split in data.data.items()}}
    facts["target_params"] = target
    if part is not None:
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text(json.dumps([facts, result, study]))
    return facts, result


def run(args: argparse.Namespace) -> dict:
    """Every (data set, architecture) job, in this process or in ``args.workers`` processes side by side (spawned:
    CUDA needs it); the numbers do not depend on the number of workers."""
    names = args.models or list(zoo_snippets())
    if "mmoe" not in names:
        names = ["mmoe", *names]  # the reference of every paired difference
    jobs = [(name, model) for name in args.datasets for model in names]
    started = time.perf_counter()
    if args.workers > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
            done = list(pool.map(study_model, [args] * len(jobs), *zip(*jobs)))
    else:
        done = [study_model(args, name, model) for name, model in jobs]
    out: dict = {"datasets": {}}
    for (name, model), (facts, result) in zip(jobs, done):
        entry = out["datasets"].setdefault(name, facts | {"models": {}})
        entry["models"][model] = result
    for entry in out["datasets"].values():
        entry["paired_vs_mmoe"] = paired_to_mmoe(entry["models"], entry["tasks"])
    out.update(
        command=" ".join(["python benchmarks/zoo_study.py", *sys.argv[1:]]),
        epochs=args.epochs,
        seeds=args.seeds,
        lrs=args.lrs,
        threads=args.threads,
        workers=args.workers,
        seconds=time.perf_counter() - started,
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    )
    return out


def paired_to_mmoe(runs: dict, tasks: list[str]) -> dict:
    """Per architecture and task: MMoE's test AUC minus the architecture's, paired by seed (> 0: MMoE better)."""
    mmoe = runs["mmoe"]["runs"]
    return {
        name: {t: paired_bootstrap([r["test"][t] for r in mmoe], [r["test"][t] for r in model["runs"]]) for t in tasks}
        for name, model in runs.items()
        if name != "mmoe"
    }


def table(results: dict) -> str:
    parts = []
    for dataset, facts in results["datasets"].items():
        tasks = facts["tasks"]
        header = ["model", "params", "sized by", "lr", *[f"AUC {t}" for t in tasks]]
        header += [f"MMoE - model, {t} [95% CI]" for t in tasks] + ["train samples/s"]
        rows = []
        for name, model in facts["models"].items():
            edge = " (edge)" if model.get("lr_at_edge") else ""
            row = [name, f"{model['params']:,}", model["sized"], f"{model['lr']:g}{edge}"]
            row += [fmt_mean_std([r["test"][t] for r in model["runs"]]) for t in tasks]
            paired = facts["paired_vs_mmoe"].get(name)
            for t in tasks:
                p = paired[t] if paired else None
                row.append("—" if p is None else f"{p['estimate']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}]")
            row.append(f"{mean_std([r['samples_per_second'] for r in model['runs']])[0]:,.0f}")
            rows.append(row)
        rows_note = ", ".join(f"{role} {n:,}" for role, n in facts["rows"].items())
        parts.append(f"**{dataset}** ({rows_note} rows; MMoE's budget {facts['target_params']:,} parameters)\n")
        parts.append(markdown_table(header, rows) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 2 seeds, one learning rate, 3,000 rows")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", help="snippet names (default: all of docs/model-zoo.md)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3], help="the tuning budget")
    parser.add_argument("--rows", type=int, default=0, help="rows kept per split (0 = all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workers", type=int, default=1, help="(data set, architecture) jobs side by side")
    parser.add_argument("--parts", help="folder of finished jobs: written as they end, read back instead of rerun")
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "zoo_study-cpu"))
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.lrs, args.rows = 1, 2, [1e-3], 3000
    results = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(f"Produced by: `{results['command']}`\n\n{table(results)}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
