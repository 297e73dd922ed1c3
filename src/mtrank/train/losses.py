"""Multi-task losses, written once for every model: masked, weighted, per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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

    Shapes: ``task_logits, labels [B, K]``, ``binary_mask, task_weights [K]``, ``sample_weights [B]``
    -> ``(total [], per_task [K])``, float32.
    """
    logits = task_logits.float()
    present = ~torch.isnan(labels)  # (B, K)
    target = torch.where(present, labels, torch.zeros_like(labels)).float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    mse = (logits - target) ** 2
    elementwise = torch.where(binary_mask, bce, mse)  # (B, K)
    mask = present.float()
    if sample_weights is not None:
        mask = mask * sample_weights.float().unsqueeze(1)
    per_task = (elementwise * mask).sum(0) / mask.sum(0).clamp_min(1e-12)  # (K,)
    per_task = torch.where(mask.sum(0) > 0, per_task, torch.zeros_like(per_task))
    return (per_task * task_weights).sum(), per_task
