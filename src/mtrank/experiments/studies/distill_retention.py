"""Study 3, distillation under short data retention (Pinterest ads, "learn from deleted data"): labels are kept
for a short window only, but the production model (the teacher) scored every row while it was live, so a new
model can still learn from the older rows through the teacher's scores (``train.distill``).

Data: :mod:`mtrank.data.drift` (periods of rows whose label relation drifts). With ``P`` periods: the teacher
trains on periods ``0 .. P-3`` with labels (a long window); the students see labels of period ``P-2`` only (the
short retention window); period ``P-1`` (the following window) is the test. Arms:

Each arm runs at every drift of ``drifts`` (radians per period; 0: no drift).

* ``teacher (long window)``: the reference (stale by the drift);
* ``student, short window``: labels of period ``P-2`` only;
* ``student + pointwise`` / ``student + pairwise``: the same labelled rows plus the ``unlabelled_periods`` periods
  before it whose labels are gone (``NaN``: no label loss), every row with the teacher's logits, trained with
  ``train.distill: pointwise`` (fit the teacher's probabilities) or ``pairwise`` (its score differences).

Measured: AUC on the following window.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from mtrank.config import ModelConfig, TaskConfig, TrainConfig
from mtrank.data.drift import DriftConfig, make_drifting_periods
from mtrank.data.tensors import TensorData
from mtrank.evaluate.metrics import evaluate, predict_batches
from mtrank.experiments.studies.common import plot_arm_bars
from mtrank.experiments.studies.runner import Metric, Study
from mtrank.model import MultiTaskModel
from mtrank.train.trainer import Trainer

TEACHER, SHORT = "teacher (long window)", "student, short window"
DISTILLED = {"student + pointwise": "pointwise", "student + pairwise": "pairwise"}


@dataclass(frozen=True)
class DistillRetentionSetting:
    """Sizes of the study (``quick``: seconds, for the tests)."""

    periods: int = 8
    rows_per_period: int = 2000
    drifts: tuple[float, ...] = (0.0, 0.05, 0.15)
    unlabelled_periods: int = 3
    distill_weight: float = 1.0
    num_experts: int = 4
    expert_hidden: int = 32
    epochs: int = 6
    batch_size: int = 256
    lr: float = 2e-3
    device: str = "cpu"

    @classmethod
    def quick(cls) -> DistillRetentionSetting:
        return cls(
            drifts=(0.1,),
            periods=4,
            rows_per_period=400,
            unlabelled_periods=1,
            num_experts=2,
            expert_hidden=8,
            epochs=4,
            batch_size=64,
        )


def setting(quick: bool) -> DistillRetentionSetting:
    return DistillRetentionSetting.quick() if quick else DistillRetentionSetting()


def arm_name(method: str, drift: float) -> str:
    return f"{method}, drift {drift:g}"


def arms(s: DistillRetentionSetting) -> list[str]:
    return [arm_name(m, d) for d in s.drifts for m in (TEACHER, SHORT, *DISTILLED)]


def comparisons(s: DistillRetentionSetting) -> list[tuple[str, str]]:
    return [(arm_name(m, d), arm_name(b, d)) for d in s.drifts for b in (SHORT, TEACHER) for m in DISTILLED]


def model_config(s: DistillRetentionSetting) -> ModelConfig:
    return ModelConfig(
        inputs={"num_dense": 16},
        tasks=[TaskConfig("click", "binary")],
        block={"type": "mmoe", "num_experts": s.num_experts},
        experts={"hidden": [s.expert_hidden]},
        towers={"hidden": [8]},
    )


def fit(s: DistillRetentionSetting, rows: TensorData, seed: int, distill: str = "none") -> MultiTaskModel:
    model = MultiTaskModel(model_config(s), seed=seed)
    config = TrainConfig(
        lr=s.lr,
        batch_size=s.batch_size,
        epochs=s.epochs,
        seed=seed,
        device=s.device,
        progress=False,
        distill=distill,
        distill_weight=s.distill_weight,
    )
    Trainer(model, config, callbacks=[]).fit(rows)
    return model


@lru_cache(maxsize=2)
def world(s: DistillRetentionSetting, drift: float, seed: int) -> tuple[list[TensorData], MultiTaskModel]:
    """The periods of ``seed`` and the teacher trained on periods ``0 .. P-3`` (shared by the drift's arms)."""
    config = DriftConfig(periods=s.periods, rows_per_period=s.rows_per_period, drift=drift, seed=seed)
    periods = make_drifting_periods(config)
    teacher = fit(s, TensorData.concat(periods[:-2]), seed)
    return periods, teacher


def run(s: DistillRetentionSetting, arm: str, seed: int) -> dict:
    arm, drift = arm.rsplit(", drift ", 1)
    periods, teacher = world(s, float(drift), seed)
    short, test = periods[-2], periods[-1]
    if arm == TEACHER:
        model = teacher
    elif arm == SHORT:
        model = fit(s, short, seed + 1)
    else:
        old = TensorData.concat(periods[-2 - s.unlabelled_periods : -2])
        deleted = TensorData(old.dense, old.sparse, torch.full_like(old.labels, float("nan")))  # labels gone
        rows = TensorData.concat([deleted, short])
        model = fit(s, rows.with_teacher(predict_batches(teacher, rows)[0]), seed + 1, DISTILLED[arm])
    return {"metrics": {"auc": evaluate(model, test)["auc/click"]}}


def figure(results: dict, path: Path) -> None:
    plot_arm_bars(path, results, {"auc": "AUC on the following window (every seed a dot)"})


def notes(s: DistillRetentionSetting) -> str:
    drifts = ", ".join(f"{d:g}" for d in s.drifts)
    last_unlabelled = s.periods - 3
    return (
        f"Drifting-time simulator (`mtrank.data.drift`): {s.periods} periods of {s.rows_per_period:,} rows, 16 "
        f"features, drift {drifts} rad per period. Teacher: periods 0..{last_unlabelled} with labels. Students: "
        f"labels of period {s.periods - 2} only; distilled students also get periods "
        f"{s.periods - 2 - s.unlabelled_periods}..{last_unlabelled} without labels, every row with the teacher's "
        f"logits (distill weight {s.distill_weight:g}). Test: period {s.periods - 1}. MMoE {s.num_experts} experts "
        f"of {s.expert_hidden}, one task, Adam lr {s.lr:g}, batch {s.batch_size}, {s.epochs} epochs."
    )


STUDY = Study(
    name="distill-retention",
    title="Study 3: distillation under short data retention (Pinterest ads)",
    setting=setting,
    arms=arms,
    comparisons=comparisons,
    metrics=[Metric("auc", "AUC, following window")],
    run=run,
    figure=figure,
    notes=notes,
)
