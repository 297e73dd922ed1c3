"""Per-task metrics computed over the whole split (never averaged per batch), with scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import log_loss, mean_squared_error, r2_score, roc_auc_score

from mtrank.config import TaskConfig
from mtrank.data.tensors import TensorData
from mtrank.evaluate.gates import gate_entropy


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
    out.update(entire_space_metrics(tasks, logits_np, labels_np, weights_np))
    return out


def entire_space_metrics(
    tasks: list[TaskConfig], logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, float]:
    """For each task with ``depends_on`` (cvr after ctr): ``auc/<task>_entire`` and ``logloss/<task>_entire``
    of the entire-space probability ``prod`` of the chain's scores (pCTCVR = pCTR x pCVR) against the
    entire-space label (the task's label where the parent's is 1, 0 where it is 0), over every row with a
    parent label: ESMM's CTCVR metrics. (The task's own metrics cover the rows where its parent's label is 1.)
    """
    names = [t.name for t in tasks]
    prob: list[np.ndarray] = []
    label: list[np.ndarray] = []
    out: dict[str, float] = {}
    for k, task in enumerate(tasks):
        p = 1.0 / (1.0 + np.exp(-logits[:, k]))
        if task.depends_on not in names:
            prob.append(p)
            label.append(labels[:, k])
            continue
        parent = names.index(task.depends_on)
        prob.append(p * prob[parent])
        label.append(np.where(label[parent] == 0, 0.0, labels[:, k]))
        present = ~np.isnan(label[k])
        y, q = label[k][present], prob[k][present]
        w = None if weights is None else weights[present]
        if y.size == 0:
            continue
        single_class = np.unique(y).size < 2
        out[f"auc/{task.name}_entire"] = math.nan if single_class else float(roc_auc_score(y, q, sample_weight=w))
        out[f"logloss/{task.name}_entire"] = float(log_loss(y, q, sample_weight=w, labels=[0, 1]))
    return out


def stacked_task_metrics(tasks: list[TaskConfig], logits: torch.Tensor, labels: torch.Tensor) -> list[dict[str, float]]:
    """:func:`task_metrics` of R members at once: ``logits [R, N, K]``, labels ``[R, N, K]`` or shared ``[N, K]``.

    Returns one dict per member, the same keys and values as ``task_metrics(tasks, logits[r], labels[r])``
    (to float64 rounding): MSE, R² and log loss are computed for all members in a few array operations; AUC
    (binary tasks) is scikit-learn's, member by member. An ensemble of 200 small runs evaluated every 100
    steps would otherwise spend most of its time in 800 scikit-learn calls per evaluation.
    """
    z_all = logits.double().numpy()
    y_all = labels.double().numpy()
    if y_all.ndim == 2:
        y_all = np.broadcast_to(y_all, z_all.shape)
    members = z_all.shape[0]
    out: list[dict[str, float]] = [{} for _ in range(members)]
    losses = np.zeros((members, 0))
    for k, task in enumerate(tasks):
        y, z = y_all[:, :, k], z_all[:, :, k]
        present = ~np.isnan(y)
        count = present.sum(1)
        has = count > 0  # a member without labels for this task gets no metrics for it (as task_metrics)
        y0 = np.where(present, y, 0.0)
        n = np.maximum(count, 1)
        if task.type == "binary":
            p = 1.0 / (1.0 + np.exp(-z))
            eps = np.finfo(np.float64).eps
            pos, neg = np.clip(p, eps, 1 - eps), np.clip(1 - p, eps, 1 - eps)
            nll = -(y0 * np.log(pos) + (1 - y0) * np.log(neg))
            loss = np.where(present, nll, 0.0).sum(1) / n
            for r in np.flatnonzero(has):
                yr, pr = y[r, present[r]], p[r, present[r]]
                single = np.unique(yr).size < 2
                out[r][f"auc/{task.name}"] = math.nan if single else float(roc_auc_score(yr, pr))
                out[r][f"logloss/{task.name}"] = float(loss[r])
        else:
            loss = np.where(present, (y0 - z) ** 2, 0.0).sum(1) / n
            mean = y0.sum(1, keepdims=True) / n[:, None]
            total = np.where(present, (y0 - mean) ** 2, 0.0).sum(1)
            residual = loss * count
            with np.errstate(divide="ignore", invalid="ignore"):
                # scikit-learn's r2_score (force_finite): a constant target scores 1 if fit exactly, else 0
                r2 = np.where(total > 0, 1.0 - residual / total, np.where(residual == 0, 1.0, 0.0))
            r2 = np.where(count > 1, r2, math.nan)
            for r in np.flatnonzero(has):
                out[r][f"mse/{task.name}"] = float(loss[r])
                out[r][f"r2/{task.name}"] = float(r2[r])
        losses = np.concatenate([losses, np.where(has, loss, np.nan)[:, None]], 1)
    for r in range(members):
        present_losses = losses[r][~np.isnan(losses[r])]
        out[r]["loss"] = float(present_losses.mean()) if present_losses.size else math.nan
    return out


def evaluate(
    model: torch.nn.Module, data: TensorData, batch_size: int = 8192, with_gates: bool = False
) -> dict[str, float]:
    """Per-task metrics of ``model`` on a whole split (see :func:`task_metrics`); with ``with_gates``, also each
    task's mean gate entropy, ``gate_entropy/<task>`` (:func:`mtrank.evaluate.gates.gate_entropy`)."""
    logits, gates = predict_batches(model, data, batch_size, with_gates=with_gates)
    weights = None if data.weights is None else data.weights.cpu()
    metrics = task_metrics(model.tasks, logits, data.labels.cpu(), weights)
    if gates is not None:
        for task, value in zip(model.tasks, gate_entropy(gates).tolist()):
            metrics[f"gate_entropy/{task.name}"] = value
    return metrics


def higher_is_better(metric: str) -> bool:
    """AUC and R² are maximised; losses, log loss and MSE minimised."""
    return metric.split("/")[0] in ("auc", "r2")
