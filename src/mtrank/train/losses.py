"""Multi-task losses, written once for every model and every number of runs: masked, weighted, per task.

Every function takes tensors with optional leading run dimensions (``[B, K]`` for one model, ``[R, B, K]`` for
an ensemble of R runs) and reduces over the batch dimension (-2) only, so one definition serves the trainer,
the ensemble and the CUDA-graph step. The router balancing loss of top-k gates is computed inside the gate
(it needs the gate's noise); its formula is :func:`mtrank.nn.gates.load_balance_loss`, re-exported here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mtrank.nn.gates import load_balance_loss

__all__ = [
    "multitask_loss",
    "distillation_loss",
    "batch_losses",
    "task_presence",
    "BatchLosses",
    "load_balance_loss",
    "DISTILL_MODES",
]

DISTILL_MODES = ("pointwise", "pairwise", "score_l2")


def multitask_loss(
    task_logits: torch.Tensor,
    labels: torch.Tensor,
    binary_mask: torch.Tensor,
    task_weights: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of per-task losses; a NaN label masks that task for that row only.

    ``loss_k = sum_b m_bk s_b l(y_bk, z_bk) / max(1, sum_b m_bk s_b)`` with ``l`` = BCE-with-logits for binary
    tasks and squared error for regression, ``m`` the label mask, ``s`` the sample weights;
    ``total = sum_k w_k loss_k``. A task with no labels in the batch contributes exactly 0 (and no NaN).

    Shapes: ``task_logits, labels [..., B, K]``, ``binary_mask, task_weights [K]``, ``sample_weights [..., B]``
    -> ``(total [...], per_task [..., K])``, float32.

    Example:
        >>> logits = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
        >>> labels = torch.tensor([[1.0, 1.5], [0.0, float("nan")]])
        >>> total, per_task = multitask_loss(logits, labels, torch.tensor([True, False]), torch.ones(2))
        >>> [round(v, 4) for v in per_task.tolist()]  # BCE mean of 2 rows; squared error of the 1 labelled row
        [1.41, 0.25]
    """
    logits = task_logits.float()
    present = ~torch.isnan(labels)  # (..., B, K)
    target = torch.where(present, labels, torch.zeros_like(labels)).float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    mse = (logits - target) ** 2
    elementwise = torch.where(binary_mask, bce, mse)  # (..., B, K)
    mask = present.float()
    if sample_weights is not None:
        mask = mask * sample_weights.float().unsqueeze(-1)
    per_task = (elementwise * mask).sum(-2) / mask.sum(-2).clamp_min(1e-12)  # (..., K)
    per_task = torch.where(mask.sum(-2) > 0, per_task, torch.zeros_like(per_task))
    return (per_task * task_weights).sum(-1), per_task


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, binary_mask: torch.Tensor, mode: str = "pointwise"
) -> torch.Tensor:
    """Distillation from a teacher (Pinterest ads) or score regularisation (Pinterest Closeup), mean over tasks.

    * ``pointwise``: binary tasks fit the teacher's probabilities with BCE; regression tasks its predictions with
      squared error.
    * ``pairwise``: each row is paired with another row of the batch (a fixed rotation); the student's score
      difference fits the teacher's: ``BCE(sigmoid(s_i - s_j), sigmoid(t_i - t_j))`` for binary tasks, squared
      error of the differences for regression. Only the ranking the teacher implies is transferred.
    * ``score_l2``: ``mean((score_s - score_t)^2)`` on scores (probabilities for binary tasks), the score
      regulariser that keeps a retrained model's scores consistent with the production model's.

    Shapes: ``[..., B, K]`` each, ``binary_mask [K]`` -> ``[...]``.
    """
    s, t = student_logits.float(), teacher_logits.float()
    if mode == "pairwise":
        s, t = s - s.roll(1, -2), t - t.roll(1, -2)  # (..., B, K) differences to another row
    if mode == "score_l2":
        score_s = torch.where(binary_mask, torch.sigmoid(s), s)
        score_t = torch.where(binary_mask, torch.sigmoid(t), t)
        return ((score_s - score_t) ** 2).mean((-2, -1))
    if mode not in ("pointwise", "pairwise"):
        raise ValueError(f"unknown distillation mode {mode!r}; use one of {DISTILL_MODES}")
    bce = F.binary_cross_entropy_with_logits(s, torch.sigmoid(t), reduction="none")
    mse = (s - t) ** 2
    return torch.where(binary_mask, bce, mse).mean((-2, -1))


class BatchLosses(NamedTuple):
    """One batch's losses, as the step and the balancing methods (:mod:`mtrank.train.balancing`) need them.

    Attributes:
        total: ``[...]`` the fixed-weight objective ``sum_k w_k L_k + extra`` (what the history reports).
        per_task: ``[..., K]`` each task's masked mean loss ``L_k`` (0 for a task with no label in the batch).
        extra: ``[...]`` the terms outside the task losses: the gates' auxiliary loss + distillation.
        present: ``[..., K]`` bool, the task has a labelled row of positive weight in the batch.
    """

    total: torch.Tensor
    per_task: torch.Tensor
    extra: torch.Tensor
    present: torch.Tensor


def task_presence(labels: torch.Tensor, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[..., B, K]`` labels -> ``[..., K]`` bool: the task has at least one labelled row of positive weight."""
    mask = (~torch.isnan(labels)).float()
    if sample_weights is not None:
        mask = mask * sample_weights.float().unsqueeze(-1)
    return mask.sum(-2) > 0


def batch_losses(
    task_logits: torch.Tensor,
    aux_loss: torch.Tensor,
    labels: torch.Tensor,
    binary_mask: torch.Tensor,
    task_weights: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    distill: str = "none",
    distill_weight: float = 1.0,
) -> BatchLosses:
    """The training objective of one batch: label loss + the gates' auxiliary loss (+ distillation).

    ``total = multitask_loss + aux_loss + distill_weight * distillation_loss`` (the last with a teacher only);
    ``extra = aux_loss + distill_weight * distillation_loss``.
    Shapes: ``task_logits, labels, teacher [..., B, K]``, ``aux_loss [...]`` -> :class:`BatchLosses`.
    """
    total, per_task = multitask_loss(task_logits, labels, binary_mask, task_weights, sample_weights)
    aux = aux_loss.float()
    total = total + aux
    extra = aux
    if distill != "none" and teacher_logits is not None:
        term = distill_weight * distillation_loss(task_logits, teacher_logits, binary_mask, distill)
        total = total + term
        extra = extra + term
    return BatchLosses(total, per_task, extra.expand_as(total), task_presence(labels, sample_weights))
