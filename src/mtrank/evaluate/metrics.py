"""Per-task metrics computed over the whole split (never averaged per batch), with scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import log_loss, mean_squared_error, r2_score, roc_auc_score

from mtrank.config import TaskConfig
from mtrank.data.tensors import TensorData


@torch.no_grad()
def predict_batches(
    model: torch.nn.Module, data: TensorData, batch_size: int = 8192, with_gates: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Task logits ``[N, K]`` (float32, CPU) for a whole split, and optionally gate weights ``[N, K, E]``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, gates = [], []
    try:
        for start in range(0, len(data), batch_size):
            part = data[start : start + batch_size]
            out = model(part.dense.to(device), part.sparse.to(device))
            logits.append(out.task_logits.float().cpu())
            if with_gates:
                gates.append(out.gate_weights.float().cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("cannot evaluate on an empty split")
    return torch.cat(logits), (torch.cat(gates) if with_gates else None)


def task_metrics(
    tasks: list[TaskConfig], logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> dict[str, float]:
    """``{"auc/<task>", "logloss/<task>"}`` for binary tasks, ``{"mse/<task>", "r2/<task>"}`` for regression.

    Rows with a missing (NaN) label are left out of that task's metrics. AUC is NaN when the split holds a
    single class. ``loss`` is the unweighted mean of the per-task losses (logloss / MSE).
    """
    out: dict[str, float] = {}
    losses = []
    logits_np = logits.double().numpy()
    labels_np = labels.double().numpy()
    weights_np = None if weights is None else weights.double().numpy()
    for k, task in enumerate(tasks):
        present = ~np.isnan(labels_np[:, k])
        y, z = labels_np[present, k], logits_np[present, k]
        w = None if weights_np is None else weights_np[present]
        if y.size == 0:
            continue
        if task.type == "binary":
            p = 1.0 / (1.0 + np.exp(-z))
            single_class = np.unique(y).size < 2
            out[f"auc/{task.name}"] = math.nan if single_class else float(roc_auc_score(y, p, sample_weight=w))
            out[f"logloss/{task.name}"] = float(log_loss(y, p, sample_weight=w, labels=[0, 1]))
            losses.append(out[f"logloss/{task.name}"])
        else:
            out[f"mse/{task.name}"] = float(mean_squared_error(y, z, sample_weight=w))
            out[f"r2/{task.name}"] = float(r2_score(y, z, sample_weight=w)) if y.size > 1 else math.nan
            losses.append(out[f"mse/{task.name}"])
    out["loss"] = float(np.mean(losses)) if losses else math.nan
    return out


def evaluate(model: torch.nn.Module, data: TensorData, batch_size: int = 8192) -> dict[str, float]:
    """Per-task metrics of ``model`` on a whole split (see :func:`task_metrics`)."""
    logits, _ = predict_batches(model, data, batch_size)
    return task_metrics(model.tasks, logits, data.labels.cpu(), None if data.weights is None else data.weights.cpu())


def higher_is_better(metric: str) -> bool:
    """AUC and R² are maximised; losses, log loss and MSE minimised."""
    return metric.split("/")[0] in ("auc", "r2")
