"""Study 1, gate polarization (YouTube, Zhao et al. RecSys 2019, section 4.4): with many experts, long training
and correlated tasks, MMoE's softmax gates can collapse onto one or two experts; YouTube drops each gate
output with probability 10% in training (gate dropout) to keep the experts in use.

Arms: MMoE with and without gate dropout 0.1 (``model.gate.dropout``), on the synthetic two-task data of Ma et
al. (:mod:`mtrank.data.synthetic`, task correlation ``correlation``) and on UCI census-income (income +
marital, a subsample of the training file). Per run: the task metric (R² on the synthetic data, AUC on census,
mean over the two tasks) on the test rows, and the gates on the test rows at the best validation step: gate
entropy, polarised experts (mean utilisation < 1%), the top expert's share and the effective number of
experts, followed at every evaluation over training (the figure).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from mtrank.config import ModelConfig, TaskConfig, TrainConfig
from mtrank.data.synthetic import make_synthetic
from mtrank.data.tensors import TensorData
from mtrank.evaluate.gates import model_gate_report
from mtrank.evaluate.metrics import evaluate
from mtrank.experiments.studies.common import GateTracker, gate_summary, plot_arm_curves
from mtrank.experiments.studies.runner import Metric, Study
from mtrank.model import MultiTaskModel
from mtrank.train.trainer import Trainer

GATE_DROPOUT = 0.1
DATASETS = ("synthetic", "census")


@dataclass
class GatePolarizationSetting:
    """Sizes of the study (``quick``: seconds, for the tests). ``regimes``: ``(dataset, lr, shared hidden
    width)`` each trained with and without gate dropout; the first is where the gates collapse."""

    regimes: tuple[tuple[str, float, int], ...] = (
        ("synthetic", 0.03, 128),
        ("synthetic", 0.01, 64),
        ("census", 0.03, 128),
    )
    correlation: float = 1.0
    synthetic_rows: int = 4000
    num_experts: int = 16
    expert_hidden: int = 16
    steps: int = 2000
    census_rows: int = 20_000
    batch_size: int = 128
    evals: int = 10
    census: str = ""  # the census-income folder; empty: $MTRANK_SHARED_DATA/census-income, else no census arms
    device: str = "cpu"

    @classmethod
    def quick(cls) -> GatePolarizationSetting:
        return cls(synthetic_rows=600, num_experts=4, expert_hidden=4, steps=30, census_rows=600, evals=2)


def setting(quick: bool) -> GatePolarizationSetting:
    base = GatePolarizationSetting.quick() if quick else GatePolarizationSetting()
    if not base.census and os.environ.get("MTRANK_SHARED_DATA"):
        base.census = str(Path(os.environ["MTRANK_SHARED_DATA"]) / "census-income")
    return base


def arm_specs(s: GatePolarizationSetting) -> dict[str, tuple[str, float, int, float]]:
    """``{arm name: (dataset, lr, shared hidden width, gate dropout)}``; census only with its folder."""
    return {
        f"{data} lr {lr:g} h{width}, gate dropout {p:g}": (data, lr, width, p)
        for data, lr, width in s.regimes
        if data == "synthetic" or s.census
        for p in (0.0, GATE_DROPOUT)
    }


def arms(s: GatePolarizationSetting) -> list[str]:
    return list(arm_specs(s))


def comparisons(s: GatePolarizationSetting) -> list[tuple[str, str]]:
    names = arms(s)
    return [(names[i + 1], names[i]) for i in range(0, len(names), 2)]  # gate dropout 0.1 - none, per regime


@lru_cache(maxsize=2)
def census_splits(folder: str, rows: int) -> tuple[list[TaskConfig], list[int], TensorData, TensorData, TensorData]:
    """Census (income + marital): the first ``rows`` of a fixed shuffle of the training file, and as many
    validation and test rows (the same for every seed: the seeds vary initialisation and batch order)."""
    from mtrank.data.census import load_census

    data = load_census(folder, group=1)
    order = np.random.default_rng(0).permutation(len(data.train))[:rows]
    import torch

    take = torch.from_numpy(order)
    return data.tasks, list(data.vocab_sizes), data.train[take], data.valid[: rows // 2], data.test[: rows // 2]


def data_for(s: GatePolarizationSetting, dataset: str, width: int, seed: int):
    """``(model config, train, valid, test, metric)`` of one dataset and seed."""
    block = {"type": "mmoe", "num_experts": s.num_experts, "shared_hidden": [width]}
    experts = {"block": block, "experts": {"hidden": [s.expert_hidden]}}
    if dataset == "synthetic":
        rows = make_synthetic(n=s.synthetic_rows * 2, correlation=s.correlation, seed=seed)
        train, valid, test = rows.split((0.5, 0.25, 0.25), seed=seed)
        tasks = [TaskConfig("y1", "regression"), TaskConfig("y2", "regression")]
        config = ModelConfig(inputs={"num_dense": 100}, tasks=tasks, towers={"hidden": [8]}, **experts)
        return config, train, valid, test, "r2"
    tasks, vocab, train, valid, test = census_splits(s.census, s.census_rows)
    inputs = {"num_dense": train.dense.shape[1], "vocab_sizes": vocab, "embedding_dim": 4}
    config = ModelConfig(inputs=inputs, tasks=list(tasks), towers={"hidden": [8]}, **experts)
    return config, train, valid, test, "auc"


def run(s: GatePolarizationSetting, arm: str, seed: int) -> dict:
    dataset, lr, width, dropout = arm_specs(s)[arm]
    config, train, valid, test, metric = data_for(s, dataset, width, seed)
    config.gate.dropout = dropout
    model = MultiTaskModel(config, seed=seed)
    tracker = GateTracker(model, test)
    train_config = TrainConfig(
        lr=lr,
        batch_size=s.batch_size,
        steps=s.steps,
        eval_every=max(1, s.steps // s.evals),
        seed=seed,
        device=s.device,
        progress=False,
    )
    Trainer(model, train_config, callbacks=[tracker]).fit(train, valid)
    scores = evaluate(model, test)
    quality = float(np.mean([scores[f"{metric}/{t.name}"] for t in config.tasks]))
    gates = gate_summary(model_gate_report(model, test))
    return {"metrics": {"quality": quality, **gates}, "gates_over_training": tracker.history}


def figure(results: dict, path: Path) -> None:
    panels = {
        "gate_entropy": "gate entropy (nats; mean over tasks)",
        "polarized_experts": "polarised experts (< 1% weight)",
        "effective_experts": "effective experts exp(H(mean utilisation))",
    }
    plot_arm_curves(path, results, "gates_over_training", panels)


def notes(s: GatePolarizationSetting) -> str:
    census = f"census (income + marital): {s.census_rows:,} training rows" if s.census else "census: not run"
    return (
        f"MMoE with {s.num_experts} experts of {s.expert_hidden} units on one shared hidden layer of width h "
        f"(YouTube's layout), towers of 8, softmax gates, Adam at lr, batch {s.batch_size}, {s.steps} steps, "
        f"{s.evals} evaluations. Synthetic (Ma et al.): task correlation {s.correlation:g}, {s.synthetic_rows:,} "
        f"training rows; {census}. Quality: R² (synthetic) / AUC (census), mean of the two tasks, "
        "on the test rows at the best validation step; gate statistics on the test rows, evaluation mode."
    )


STUDY = Study(
    name="gate-polarization",
    title="Study 1: gate polarization and gate dropout (YouTube)",
    setting=setting,
    arms=arms,
    comparisons=comparisons,
    metrics=[
        Metric("quality", "R² / AUC"),
        Metric("gate_entropy", "gate entropy (nats)"),
        Metric("polarized_experts", "polarised experts", higher_is_better=False),
        Metric("top_expert_share", "top expert share", higher_is_better=False),
        Metric("effective_experts", "effective experts"),
    ],
    run=run,
    figure=figure,
    notes=notes,
)
