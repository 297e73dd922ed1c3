"""How a model is trained: optimiser, schedule, evaluation, checkpoints, precision, logging."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from mtrank.config.base import Config, ConfigError, check, join

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16")
DISTILL_MODES = ("none", "pointwise", "pairwise", "score_l2")
TASK_METRICS = {"binary": ("auc", "logloss"), "regression": ("mse", "r2")}  # what validation reports per task
SEED_END = 2**32  # train.seed: shuffles seed torch with seed * 1_000_003 + epoch, streams numpy with [seed, epoch]


@dataclass
class TrainConfig(Config):
    """How a model is trained.

    Args:
        optimizer: ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        weight_decay: weight decay (decoupled for AdamW).
        batch_size: rows per step.
        epochs: passes over the training data (ignored when ``steps`` > 0).
        steps: total optimisation steps; 0 = use ``epochs``.
        schedule: learning-rate schedule: ``constant``, ``cosine`` or ``linear`` decay.
        warmup_steps: linear warm-up steps.
        eval_every: evaluate on validation every this many steps; 0 = once per epoch.
        early_stopping_patience: stop after this many evaluations without improvement; 0 = never.
        monitor: validation metric for early stopping and best-checkpoint selection, e.g. ``"loss"`` or
            ``"auc/income"`` (``metric/task``); ``"loss"`` is minimised, AUC/R² maximised. A name that is not one
            of the tasks' metrics (:func:`monitor_choices`) fails when training starts.
        precision: ``"fp32"`` or ``"bf16"`` (autocast where the hardware supports it).
        seed: seed of initialisation, shuffling and dropout, in ``[0, 2^32)``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        grad_clip: clip the global gradient norm to this value; 0 = no clipping.
        checkpoint_dir: write checkpoints here (and resume from the latest one); empty = none.
        checkpoint_every: steps between checkpoints (0 = at each evaluation).
        keep_checkpoints: how many complete checkpoints to keep (>= 1; the resume falls back to an older one
            when the newest fails its checksums).
        resume: with a checkpoint in ``checkpoint_dir``: ``"auto"`` resumes it when it was written by the same
            configuration and refuses a different one (naming what changed); ``"overwrite"`` discards it and
            starts afresh; ``"require"`` resumes it and fails if there is none.
        progress: show a progress bar.
        log_dir: write the history as JSON lines (``history.jsonl``) here, live; empty = none.
        tensorboard: also write TensorBoard events to ``log_dir`` (needs the ``tensorboard`` package).
        distill: distillation from teacher logits attached to the data (``TensorData.teacher``): ``"none"``,
            ``"pointwise"``, ``"pairwise"`` or ``"score_l2"`` (see :func:`mtrank.train.losses.distillation_loss`).
        distill_weight: weight of the distillation term added to the label loss.
    """

    section: ClassVar[str] = "train"
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    epochs: int = 10
    steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    eval_every: int = 0
    early_stopping_patience: int = 0
    monitor: str = "loss"
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    grad_clip: float = 0.0
    checkpoint_dir: str = ""
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: Literal["auto", "overwrite", "require"] = "auto"
    progress: bool = True
    log_dir: str = ""
    tensorboard: bool = False
    distill: Literal["none", "pointwise", "pairwise", "score_l2"] = "none"
    distill_weight: float = 1.0

    def check(self, path: str) -> None:
        check(0 < self.lr < math.inf, join(path, "lr"), f"must be > 0 and finite, got {self.lr}")
        finite = 0 <= self.weight_decay < math.inf
        check(finite, join(path, "weight_decay"), f"must be >= 0 and finite, got {self.weight_decay}")
        check(self.batch_size >= 1, join(path, "batch_size"), f"must be >= 1, got {self.batch_size}")
        check(self.epochs >= 1 or self.steps >= 1, join(path, "epochs"), "give epochs >= 1 or steps >= 1")
        check(self.steps >= 0, join(path, "steps"), f"must be >= 0, got {self.steps}")
        check(self.warmup_steps >= 0, join(path, "warmup_steps"), f"must be >= 0, got {self.warmup_steps}")
        check(self.eval_every >= 0, join(path, "eval_every"), f"must be >= 0, got {self.eval_every}")
        check(self.early_stopping_patience >= 0, join(path, "early_stopping_patience"), "must be >= 0")
        check(self.grad_clip >= 0, join(path, "grad_clip"), f"must be >= 0, got {self.grad_clip}")
        check(self.checkpoint_every >= 0, join(path, "checkpoint_every"), "must be >= 0")
        check(self.keep_checkpoints >= 1, join(path, "keep_checkpoints"), f"must be >= 1, got {self.keep_checkpoints}")
        finite = 0 <= self.distill_weight < math.inf
        check(finite, join(path, "distill_weight"), f"must be >= 0 and finite, got {self.distill_weight}")
        check(0 <= self.seed < SEED_END, join(path, "seed"), f"must be in [0, 2^32), got {self.seed}")


def monitor_choices(task_types: dict[str, str]) -> list[str]:
    """The validation metrics ``train.monitor`` may name: ``loss`` and ``metric/task`` for each task
    (``{"click": "binary"}`` -> ``["loss", "auc/click", "logloss/click"]``)."""
    return ["loss", *(f"{metric}/{task}" for task, kind in task_types.items() for metric in TASK_METRICS[kind])]


def check_monitor(monitor: str, task_types: dict[str, str], path: str = "train.monitor") -> None:
    """A ``monitor`` that no validation metric has (a typo would make early stopping count evaluations, not
    improvements) is a :class:`ConfigError` naming the choices."""
    choices = monitor_choices(task_types)
    if monitor not in choices:
        close = difflib.get_close_matches(str(monitor), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: {monitor!r} is not a validation metric{hint}; choose one of {choices}")
