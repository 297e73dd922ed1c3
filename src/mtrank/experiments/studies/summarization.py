"""Study 6, the summarization layer and the transformer mixer (Pinterest Closeup): quality (test AUC) and cost
(parameters, FLOPs per row, training milliseconds per step) of MMoE with no mixer, with a mixer over every
feature token, and with the summarization layer (each group of tokens summarized into one by attention
pooling) before the mixer; the mixer's output wired to the block input (``input``) or, as published, beside
the experts' output (``experts``).

Data: MovieLens-100K with each rating's preceding history (``configs/movielens_100k_seq.yaml``: liked, loved;
the history a token of its own, a one-layer transformer and target attention) and UCI census-income (income +
marital, a subsample). Groups: MovieLens user (user id, gender, occupation, zip code), behaviour (the history),
item (the dense token: age, release year, genres; the item id); census: the tokens in column order, cut into
``census_groups`` runs (the data has no user / item / context split).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from mtrank.config import ModelConfig, TrainConfig
from mtrank.evaluate.metrics import evaluate
from mtrank.experiments.studies.common import plot_arm_bars
from mtrank.experiments.studies.gate_polarization import census_splits
from mtrank.experiments.studies.runner import Metric, Study
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.train.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[4] / "configs" / "movielens_100k_seq.yaml"
MOVIELENS_GROUPS = [[1, 3, 4, 5], [6], [0, 2]]  # user; behaviour (history); item (dense token, item id)
VARIANTS = {  # mixer section of each variant (groups filled per dataset)
    "no mixer": None,
    "mixer all, input": {"wiring": "input"},
    "mixer all, experts": {"wiring": "experts"},
    "summary, input": {"wiring": "input", "summarize": True},
    "summary, experts": {"wiring": "experts", "summarize": True},
}


@dataclass(frozen=True)
class SummarizationSetting:
    """Sizes of the study (``quick``: seconds, for the tests)."""

    movielens: str = ""  # the ml-100k folder (RecBole atomic files); empty: $MTRANK_MOVIELENS or not run
    census: str = ""  # the census-income folder; empty: $MTRANK_SHARED_DATA/census-income
    census_rows: int = 40_000
    census_groups: int = 4
    history: int = 20
    movielens_rows: int = 0  # training rows kept (the earliest); 0 = all 80,000
    num_experts: int = 4
    expert_hidden: int = 32
    mixer_layers: int = 1
    embedding_dim: int = 8
    epochs: int = 2
    batch_size: int = 512
    lr: float = 2e-3
    timing_rounds: int = 30

    @classmethod
    def quick(cls) -> SummarizationSetting:
        return cls(
            census_rows=600, num_experts=2, expert_hidden=8, epochs=1, batch_size=128, history=5, timing_rounds=2
        )


def setting(quick: bool) -> SummarizationSetting:
    base = SummarizationSetting.quick() if quick else SummarizationSetting()
    folder = Path(os.environ.get("MTRANK_SHARED_DATA", "../shared/data")) / "census-income"
    return dataclasses.replace(
        base, census=base.census or str(folder), movielens=base.movielens or os.environ.get("MTRANK_MOVIELENS", "")
    )


def datasets(s: SummarizationSetting) -> list[str]:
    return (["movielens"] if s.movielens else []) + ["census"]


def arms(s: SummarizationSetting) -> list[str]:
    return [f"{d}: {v}" for d in datasets(s) for v in VARIANTS]


def comparisons(s: SummarizationSetting) -> list[tuple[str, str]]:
    pairs = [
        ("summary, input", "no mixer"),
        ("summary, experts", "no mixer"),
        ("summary, input", "mixer all, input"),
        ("summary, experts", "mixer all, experts"),
        ("summary, experts", "summary, input"),
        ("mixer all, experts", "mixer all, input"),
    ]
    return [(f"{d}: {a}", f"{d}: {b}") for d in datasets(s) for a, b in pairs]


@lru_cache(maxsize=2)
def movielens_data(s: SummarizationSetting):
    """``(model config without mixer, train, valid, test)`` of MovieLens-100K with the history sequence."""
    from mtrank.config.experiment import load_experiment
    from mtrank.data.encoders import FeatureEncoder
    from mtrank.data.splits import encode_table, load_splits

    overrides = {"data.train": s.movielens, "data.history": s.history}
    overrides["features.sequence"] = [
        {
            "name": "history",
            "column": "history_items",
            "actions_column": "history_ratings",
            "max_length": s.history,
            "target": "item_id",
            "pooling": "target",
        }
    ]
    config = load_experiment(CONFIG, overrides)
    splits = load_splits(config)
    train_table = splits["train"][0]
    if s.movielens_rows:
        train_table = train_table.slice(0, s.movielens_rows)
    encoder = FeatureEncoder(config.features).fit(train_table, splits["train"][1])
    train = encode_table(encoder, train_table, config, splits["train"][1])
    valid, test = (encode_table(encoder, splits[role][0], config, splits[role][1]) for role in ("valid", "test"))
    model = config.model_config(
        encoder.num_dense,
        encoder.vocab_sizes,
        encoder.bag_inputs,
        encoder.numeric_inputs,
        None,
        encoder.sequence_inputs,
    )
    return model, train, valid, test


def data_for(s: SummarizationSetting, dataset: str):
    """``(base model config, groups, train, valid, test)`` of ``dataset``."""
    if dataset == "movielens":
        model, train, valid, test = movielens_data(s)
        return model, MOVIELENS_GROUPS, train, valid, test
    tasks, vocab, train, valid, test = census_splits(s.census, s.census_rows)
    inputs = {"num_dense": train.dense.shape[1], "vocab_sizes": vocab, "embedding_dim": s.embedding_dim}
    model = ModelConfig(inputs=inputs, tasks=list(tasks))
    tokens = len(vocab) + 1  # the dense token first
    groups = [part.tolist() for part in np.array_split(np.arange(tokens), s.census_groups)]
    return model, groups, train, valid, test


def variant_config(s: SummarizationSetting, base: ModelConfig, groups: list[list[int]], variant: str) -> ModelConfig:
    mixer = VARIANTS[variant]
    section = {"layers": 0}
    if mixer is not None:
        section = {"layers": s.mixer_layers, "heads": 2, "wiring": mixer["wiring"]}
        if mixer.get("summarize"):
            section.update(groups=groups, summary="attention")
    return ModelConfig.from_dict(
        {
            "inputs": dataclasses.asdict(base.inputs) | {"embedding_dim": s.embedding_dim},
            "tasks": [dataclasses.asdict(t) for t in base.tasks],
            "block": {"type": "mmoe", "num_experts": s.num_experts},
            "experts": {"hidden": [s.expert_hidden]},
            "towers": {"hidden": [8]},
            "mixer": section,
        }
    ).validate("model")


def run(s: SummarizationSetting, arm: str, seed: int) -> dict:
    dataset, variant = arm.split(": ", 1)
    base, groups, train, valid, test = data_for(s, dataset)
    config = variant_config(s, base, groups, variant)
    model = MultiTaskModel(config, seed=seed)
    train_config = TrainConfig(lr=s.lr, batch_size=s.batch_size, epochs=s.epochs, seed=seed, progress=False)
    Trainer(model, train_config, callbacks=[]).fit(train, valid)
    scores = evaluate(model, test)
    auc = float(np.mean([scores[f"auc/{t.name}"] for t in config.tasks]))
    flops = forward_flops(model, test.dense[:64], test.sparse[:64])
    metrics = {
        "auc": auc,
        "params": float(count_parameters(model)),
        "kflops": flops / 1e3,
        "ms_per_step": step_ms(model, train[: s.batch_size], s.timing_rounds),
    }
    return {"metrics": metrics}


def forward_flops(model: MultiTaskModel, dense: torch.Tensor, sparse: torch.Tensor) -> float:
    """FLOPs of the forward pass per row, counted in training mode without gradients: in evaluation mode
    ``nn.TransformerEncoderLayer`` (the mixer) runs a fused kernel that :class:`FlopCounterMode` does not count
    (it reported 59k instead of 72k FLOPs for a 13-token mixer model). No arm has dropout or a bias tower, so
    the training-mode forward is the serving one."""
    was_training = model.training
    model.train()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(dense, sparse)
    model.train(was_training)
    return counter.get_total_flops() / dense.shape[0]


def step_ms(model: MultiTaskModel, batch, rounds: int) -> float:
    """Median milliseconds of one training step's forward and backward pass on ``batch`` (3 warm-up steps):
    the median, so that other processes on a shared machine disturb it less than a mean of the whole run."""
    model.train()
    times = []
    for r in range(rounds + 3):
        started = time.perf_counter()
        out = model(batch.dense, batch.sparse)
        (out.task_logits.float().square().mean() + out.aux_loss).backward()
        if r >= 3:
            times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return 1e3 * float(np.median(times))


def figure(results: dict, path: Path) -> None:
    """Each run's AUC gain over no mixer on the same data and seed (the datasets' AUCs differ by 0.2), and FLOPs."""
    runs = {}
    for arm, arm_runs in results["runs"].items():
        base = results["runs"][f"{arm.split(': ')[0]}: no mixer"]
        runs[arm] = [
            {"metrics": {**run["metrics"], "auc_gain": run["metrics"]["auc"] - ref["metrics"]["auc"]}}
            for run, ref in zip(arm_runs, base)
        ]
    panels = {"auc_gain": "test AUC - no mixer (same data and seed)", "kflops": "kFLOPs / row"}
    plot_arm_bars(path, {**results, "runs": runs}, panels)


def notes(s: SummarizationSetting) -> str:
    movielens = (
        f"MovieLens-100K (time split 80/10/10, history of at most {s.history} items with their ratings)"
        if s.movielens
        else "MovieLens-100K: not run (no data folder given: set MTRANK_MOVIELENS)"
    )
    return (
        f"MMoE, {s.num_experts} experts of {s.expert_hidden}, towers of 8, embedding {s.embedding_dim}; mixer: "
        f"{s.mixer_layers} pre-norm transformer layer(s), 2 heads; summary: attention pooling per group. "
        f"{movielens}; census (income + marital): {s.census_rows:,} training rows, tokens cut into "
        f"{s.census_groups} groups in column order. Adam lr {s.lr}, batch {s.batch_size}, {s.epochs} epochs, "
        "best validation step; AUC on the test rows (mean of the two tasks). ms/step: median of "
        f"{s.timing_rounds} forward + backward passes on one training batch after training, one CPU thread of a "
        "2-core machine shared with other work (noisy: FLOPs are the steadier cost); FLOPs: torch's "
        "FlopCounterMode on the forward pass (training mode: see forward_flops), per row. Side-by-side "
        "timing: benchmarks/summarization_cost.py."
    )


STUDY = Study(
    name="summarization",
    title="Study 6: summarization layer and transformer mixer (Pinterest Closeup)",
    setting=setting,
    arms=arms,
    comparisons=comparisons,
    metrics=[
        Metric("auc", "test AUC"),
        Metric("params", "parameters", higher_is_better=False),
        Metric("kflops", "kFLOPs / row", higher_is_better=False),
        Metric("ms_per_step", "train ms / step", higher_is_better=False),
    ],
    run=run,
    figure=figure,
    notes=notes,
)
