"""Study 4, infrastructure cost (Pinterest ads engagement model): lightweight (linear) vs MLP gates, and fp32
vs reduced-precision inference (bf16, ``mixed`` = bf16 expert bank with float32 accumulation, int8 on CPU; fp16
on GPU): latency, parameters, FLOPs and the change in AUC. Pinterest reports ~40% lower latency from mixed
precision on GPU.

Model: MMoE with DCNv2 experts (Pinterest's expert type: a cross network, then an MLP) on UCI census-income
(income + marital; a subsample of the training file, AUC on half as many test rows), one model per (gate
type, seed). Every precision of one model is timed side by side in one loop (each round calls each precision
once, in a rotating order, so machine noise hits them alike): the median time of scoring ``batch`` candidates
end to end (float32 inputs in, float32 scores out). FLOPs: :class:`torch.utils.flop_counter.FlopCounterMode`
on the float32 forward, per candidate (the same arithmetic at every precision). AUC change: the precision's
test AUC minus the float32 AUC of the same model (mean over the two tasks).
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
from mtrank.evaluate.metrics import task_metrics
from mtrank.experiments.studies.common import plot_arm_bars
from mtrank.experiments.studies.gate_polarization import census_splits
from mtrank.experiments.studies.runner import Metric, Study
from mtrank.export.precision import PrecisionScoring, inference_model
from mtrank.model import MultiTaskModel, count_parameters
from mtrank.train.trainer import Trainer

GATES = {"linear gates": 0, "MLP gates": 64}  # gate.hidden: 0 = one linear projection (Pinterest's light gate)
PRECISIONS = {"cpu": ("fp32", "bf16", "mixed", "int8"), "cuda": ("fp32", "bf16", "fp16", "mixed")}


@dataclass(frozen=True)
class InfraCostSetting:
    """Sizes of the study (``quick``: seconds, for the tests); frozen: one trained model per (setting, gate, seed)
    serves every precision's arm."""

    census: str = ""  # the census-income folder; empty: $MTRANK_SHARED_DATA/census-income
    train_rows: int = 40_000
    num_experts: int = 8
    expert_hidden: tuple[int, ...] = (128, 64)
    cross_layers: int = 2
    gate_hidden: int = 64
    epochs: int = 2
    batch_size: int = 512
    lr: float = 2e-3
    serve_batch: int = 512
    rounds: int = 60
    device: str = "cpu"

    @classmethod
    def quick(cls) -> InfraCostSetting:
        return cls(
            train_rows=800, num_experts=2, expert_hidden=(8,), epochs=1, batch_size=256, serve_batch=64, rounds=3
        )


def setting(quick: bool) -> InfraCostSetting:
    base = InfraCostSetting.quick() if quick else InfraCostSetting()
    folder = Path(os.environ.get("MTRANK_SHARED_DATA", "../shared/data")) / "census-income"
    return dataclasses.replace(base, census=base.census or str(folder))


def arm_name(gate: str, precision: str) -> str:
    return f"{gate}, {precision}"


def arms(s: InfraCostSetting) -> list[str]:
    return [arm_name(g, p) for g in GATES for p in PRECISIONS[s.device]]


def comparisons(s: InfraCostSetting) -> list[tuple[str, str]]:
    precisions = PRECISIONS[s.device]
    linear, mlp = GATES
    pairs = [(arm_name(linear, "fp32"), arm_name(mlp, "fp32"))]
    return pairs + [(arm_name(g, p), arm_name(g, "fp32")) for g in GATES for p in precisions[1:]]


def model_config(s: InfraCostSetting, gate_hidden: int, data) -> ModelConfig:
    tasks, vocab, train = data[0], data[1], data[2]
    return ModelConfig(
        inputs={"num_dense": train.dense.shape[1], "vocab_sizes": vocab, "embedding_dim": 8},
        tasks=list(tasks),
        block={"type": "mmoe", "num_experts": s.num_experts},
        experts={"type": "dcn", "hidden": list(s.expert_hidden), "cross_layers": s.cross_layers},
        gate={"hidden": gate_hidden},
        towers={"hidden": [16]},
    )


def flops_per_candidate(model: MultiTaskModel, dense: torch.Tensor, sparse: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(dense, sparse)
    return counter.get_total_flops() / dense.shape[0]


def time_side_by_side(scorers: dict[str, PrecisionScoring], dense, sparse, rounds: int, cuda: bool) -> dict:
    """Median milliseconds per call of each scorer, every round calling each once in a rotating order."""
    names = list(scorers)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:  # warm-up
            for _ in range(3):
                scorers[name](dense, sparse)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                started = time.perf_counter()
                scorers[name](dense, sparse)
                if cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - started)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


@lru_cache(maxsize=4)
def measure(s: InfraCostSetting, gate: str, seed: int) -> dict[str, dict[str, float]]:
    """Train one model of ``gate`` with ``seed``; every precision's metrics, measured side by side."""
    data = census_splits(s.census, s.train_rows)
    tasks, train, valid, test = data[0], data[2], data[3], data[4]
    model = MultiTaskModel(model_config(s, GATES[gate] and s.gate_hidden, data), seed=seed)
    config = TrainConfig(lr=s.lr, batch_size=s.batch_size, epochs=s.epochs, seed=seed, progress=False)
    Trainer(model, config, callbacks=[]).fit(train, valid)  # trained on CPU; timed on s.device
    model.cpu().eval()
    precisions = PRECISIONS[s.device]
    scorers = {p: PrecisionScoring(inference_model(model, p, s.device)) for p in precisions}
    labels = test.labels
    aucs = {}
    for p, scorer in scorers.items():
        with torch.no_grad():
            scores = torch.cat(
                [scorer(part.dense.to(s.device), part.sparse.to(s.device)).cpu() for part in _batches(test)]
            )
        logits = torch.logit(scores.double().clamp(1e-7, 1 - 1e-7)).float()
        metrics = task_metrics(list(tasks), logits, labels)
        aucs[p] = float(np.mean([metrics[f"auc/{t.name}"] for t in tasks]))
    dense, sparse = test.dense[: s.serve_batch].to(s.device), test.sparse[: s.serve_batch].to(s.device)
    latency = time_side_by_side(scorers, dense, sparse, s.rounds, s.device == "cuda")
    flops = flops_per_candidate(model, test.dense[:64], test.sparse[:64])
    params = count_parameters(model)
    return {
        p: {
            "auc": aucs[p],
            "auc_change": aucs[p] - aucs["fp32"],
            "latency_ms": latency[p],
            "params": float(params),
            "kflops": flops / 1e3,
        }
        for p in precisions
    }


def _batches(data, size: int = 8192):
    return [data[start : start + size] for start in range(0, len(data), size)]


def run(s: InfraCostSetting, arm: str, seed: int) -> dict:
    gate, precision = arm.rsplit(", ", 1)
    return {"metrics": measure(s, gate, seed)[precision]}


def figure(results: dict, path: Path) -> None:
    panels = {"latency_ms": "latency (ms per batch)", "auc_change": "AUC change vs fp32", "auc": "test AUC"}
    plot_arm_bars(path, results, panels)


def notes(s: InfraCostSetting) -> str:
    return (
        f"MMoE, {s.num_experts} DCNv2 experts ({s.cross_layers} cross layers, MLP {list(s.expert_hidden)}), towers "
        f"[16], embeddings of 8; gates: linear (one projection) or MLP (hidden {s.gate_hidden}). Census-income "
        f"income + marital, {s.train_rows:,} training rows, {s.epochs} epochs, batch {s.batch_size}, Adam lr "
        f"{s.lr:g}; AUC on the first {s.train_rows // 2:,} test rows. Latency on {s.device} with "
        f"{torch.get_num_threads()} thread(s): median of {s.rounds} side-by-side rounds, batch {s.serve_batch}."
    )


STUDY = Study(
    name="infra-cost",
    title="Study 4: infrastructure cost, light gates and reduced precision (Pinterest ads)",
    setting=setting,
    arms=arms,
    comparisons=comparisons,
    metrics=[
        Metric("latency_ms", "latency ms", higher_is_better=False),
        Metric("auc", "test AUC"),
        Metric("auc_change", "AUC change vs fp32"),
        Metric("params", "parameters", higher_is_better=False),
        Metric("kflops", "kFLOPs / candidate", higher_is_better=False),
    ],
    run=run,
    figure=figure,
    notes=notes,
)
