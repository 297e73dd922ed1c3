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

from mtrank.config import ModelConfig
from mtrank.nn.funnel import log1mexp
from mtrank.nn.gates import load_balance_loss

__all__ = [
    "multitask_loss",
    "distillation_loss",
    "batch_losses",
    "task_presence",
    "BatchLosses",
    "funnel_loss",
    "funnel_terms",
    "FunnelSpec",
    "FunnelLosses",
    "label_loss_weights",
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
    funnel: FunnelSpec | None = None,
) -> BatchLosses:
    """The training objective of one batch: task losses + the gates' auxiliary loss (+ distillation, + a funnel's
    regularisers).

    ``L_k`` is task k's masked mean label loss (:func:`multitask_loss`); with a ``funnel``, a dependent task's
    ``L_k`` is its entire-space loss instead (ESMM's CTCVR loss, :func:`funnel_terms`) and the funnel's
    regularisers (ESCM2's counterfactual risk, AITM's calibrator) join ``extra`` with their own weights.
    ``total = sum_k w_k L_k + extra``, ``extra = aux_loss + distill_weight * distillation_loss + regularisers``;
    ``task_weights`` are the tasks' configured weights ``w_k``.
    Shapes: ``task_logits [..., B, K (+ J funnel training columns)]``, ``labels, teacher [..., B, K]``,
    ``aux_loss [...]`` -> :class:`BatchLosses`.
    """
    num_tasks = labels.shape[-1]
    logits = task_logits[..., :num_tasks]
    _, per_task = multitask_loss(logits, labels, binary_mask, task_weights, sample_weights)
    present = task_presence(labels, sample_weights)
    extra = aux_loss.float().expand(per_task.shape[:-1])
    if funnel is not None:
        terms = funnel_terms(task_logits, labels, funnel, sample_weights)
        dependent = torch.tensor([parent >= 0 for parent in funnel.parents], device=per_task.device)
        per_task = torch.where(dependent, terms.per_task, per_task)
        present = torch.where(dependent, terms.present, present)
        extra = extra + terms.extra
    if distill != "none" and teacher_logits is not None:
        extra = extra + distill_weight * distillation_loss(logits, teacher_logits, binary_mask, distill)
    total = (per_task * task_weights).sum(-1) + extra
    return BatchLosses(total, per_task, extra, present)


class FunnelSpec(NamedTuple):
    """What :func:`funnel_loss` needs of a model's ``funnel`` section and task dependencies (static Python values,
    so that a CUDA graph records one fixed computation)."""

    parents: list[int]
    kind: str
    doubly_robust: bool
    weights: list[float]
    counterfactual_weight: float
    ips_clip: float
    calibrator_weight: float

    @classmethod
    def from_config(cls, config: ModelConfig) -> FunnelSpec | None:
        """None when no task depends on another, or with ``funnel: none`` (the naive model: a dependent task is
        an ordinary task whose label is missing where its parent's is 0)."""
        funnel = config.funnel
        if funnel.type == "none" or not config.dependents:
            return None
        return cls(
            config.parents,
            funnel.type,
            funnel.counterfactual == "dr",
            [t.weight for t in config.tasks],
            funnel.counterfactual_weight,
            funnel.ips_clip,
            funnel.calibrator_weight,
        )

    def in_eval(self, task_logits: torch.Tensor, num_tasks: int) -> FunnelSpec | None:
        """The spec for an evaluation forward's logits (conflict measurements): itself, or None when the funnel
        needs training columns the evaluation forward lacks (AITM, ESCM2-DR), so the dependent tasks' own
        clicked-rows losses are measured instead (docs/balancing.md says so)."""
        needs_columns = self.kind == "aitm" or (self.kind == "escm2" and self.doubly_robust)
        return None if needs_columns and task_logits.shape[-1] == num_tasks else self

    def label_weights(self) -> list[float]:
        """The weights of :func:`multitask_loss` beside the funnel: a dependent task's own (clicked-rows) loss
        is replaced by its entire-space loss, so it gets weight 0 there."""
        return [0.0 if parent >= 0 else weight for parent, weight in zip(self.parents, self.weights)]


class FunnelLosses(NamedTuple):
    """:func:`funnel_terms`: ``per_task [..., K]`` entire-space losses of the dependent tasks (0 for a root),
    ``extra [...]`` the weighted regularisers, ``present [..., K]`` bool (the dependent task has a row with a
    parent label)."""

    per_task: torch.Tensor
    extra: torch.Tensor
    present: torch.Tensor


def label_loss_weights(config: ModelConfig) -> list[float]:
    """The task weights of :func:`multitask_loss` for ``config``: its tasks' weights, a dependent task's at 0
    when a funnel trains it (its entire-space loss in :func:`funnel_loss` replaces its clicked-rows loss)."""
    spec = FunnelSpec.from_config(config)
    return spec.label_weights() if spec is not None else [t.weight for t in config.tasks]


def _masked_mean(values: torch.Tensor, present: torch.Tensor, sample_weights: torch.Tensor | None) -> torch.Tensor:
    """``sum_b m_b s_b v_b / sum_b m_b s_b`` over the batch (-1), 0 without rows. ``[..., B] -> [...]``."""
    mask = present.float() if sample_weights is None else present.float() * sample_weights.float()
    total = torch.where(present, values, torch.zeros_like(values))
    return (total * mask).sum(-1) / mask.sum(-1).clamp_min(1e-12)


def funnel_terms(
    task_logits: torch.Tensor,
    labels: torch.Tensor,
    spec: FunnelSpec,
    sample_weights: torch.Tensor | None = None,
) -> FunnelLosses:
    """The entire-space losses of the tasks that depend on others (added to :func:`multitask_loss` run with
    :meth:`FunnelSpec.label_weights`, so the parents' own losses, e.g. L_CTR, stay there).

    Labels follow the funnel: ``y_t`` (conversion) exists where the parent's label ``o = y_parent`` is 1
    (NaN elsewhere); the entire-space label is ``y_t`` there and 0 where ``o = 0``. With ``p_t`` the dependent
    task's conditional probability and ``P_t = p_t P_parent`` the entire-space one (``P = p`` for a root):

    * ``esmm``: ``w_t BCE(P_t, o y_t)`` over every row with a parent label (Ma et al. 2018, eq. 3-4).
    * ``escm2``: ESMM + ``lambda_c R_t``, ``e = BCE(p_t, y_t)`` on clicked rows, ``1/o_hat = min(1/sg(P_parent),
      ips_clip)`` (Wang et al. 2022, eq. 9 and 12; PaddleRec's clip and stop-gradient):
      IPS ``R = mean_rows(o e / o_hat)``; DR ``R = mean_rows(e_hat + o (e - e_hat) / o_hat) +
      mean_rows(o (e - e_hat)^2 / o_hat)`` with ``e_hat = softplus(imputation logit)`` (error and imputation
      losses, as PaddleRec's ``counterfact_dr``).
    * ``aitm``: ``P_t`` is the tower's own entire-space output (the training columns after K); ``w_t BCE(P_t, o
      y_t) + alpha mean_rows max(P_t - P_parent, 0)`` (Xi et al. 2021, eq. 9-11).

    Returns :class:`FunnelLosses`: ``per_task`` holds each dependent task's entire-space loss ``L_t`` (the
    ``BCE`` above, unweighted; 0 for a root), ``extra`` the regularisers with their own weights (ESCM2's
    ``lambda_c R_t``, AITM's calibrator), which a balancing method does not reweight.
    Shapes: ``task_logits [..., B, K + J]`` (a training forward), ``labels [..., B, K]``, ``sample_weights
    [..., B]`` -> ``per_task [..., K]``, ``extra [...]``, float32. Rows without a parent label add nothing.
    """
    num_tasks = labels.shape[-1]
    logits = task_logits.float()
    columns = logits[..., num_tasks:]  # (..., B, J) a funnel's training columns
    ys = [labels[..., k].float() for k in range(num_tasks)]  # (..., B) each
    log_p: list[torch.Tensor] = []  # log of each task's entire-space probability
    joint_y: list[torch.Tensor] = []  # each task's entire-space label (NaN: none)
    per_task = [logits.new_zeros(logits.shape[:-2]) for _ in spec.parents]
    present = [torch.zeros(logits.shape[:-2], dtype=torch.bool, device=logits.device) for _ in spec.parents]
    extra = logits.new_zeros(logits.shape[:-2])
    j = 0
    for k, parent in enumerate(spec.parents):
        if parent < 0:
            log_p.append(F.logsigmoid(logits[..., k]))
            joint_y.append(ys[k])
            continue
        o = joint_y[parent]
        y = torch.where(o == 0, torch.zeros_like(ys[k]), ys[k])  # 0 where the parent event did not happen
        if spec.kind == "aitm":
            log_p.append(F.logsigmoid(columns[..., j]))
        else:
            log_p.append(F.logsigmoid(logits[..., k]) + log_p[parent])
        joint_y.append(y)
        has_label = ~torch.isnan(y)
        target = torch.nan_to_num(y)
        log_not = log1mexp(log_p[k].clamp_max(-1e-7))
        bce = -(target * log_p[k] + (1 - target) * log_not)
        per_task[k] = _masked_mean(bce, has_label, sample_weights)
        present[k] = _any_weighted(has_label, sample_weights)
        if spec.kind == "aitm":
            violation = torch.relu(log_p[k].exp() - log_p[parent].exp())
            extra = extra + spec.calibrator_weight * violation.mean(-1)
        elif spec.kind == "escm2":
            extra = extra + spec.counterfactual_weight * _counterfactual_risk(
                logits[..., k], ys[k], o, log_p[parent], columns[..., j] if spec.doubly_robust else None, spec.ips_clip,
                sample_weights,
            )  # fmt: skip
        j += 1
    return FunnelLosses(torch.stack(per_task, -1), extra, torch.stack(present, -1))


def funnel_loss(
    task_logits: torch.Tensor,
    labels: torch.Tensor,
    spec: FunnelSpec,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The funnel's part of the fixed-weight objective: ``sum_t w_t L_t + regularisers`` over the dependent
    tasks (:func:`funnel_terms`), added to :func:`multitask_loss` run with :meth:`FunnelSpec.label_weights`.
    ``[..., B, K + J]`` -> ``[...]``."""
    terms = funnel_terms(task_logits, labels, spec, sample_weights)
    weights = terms.per_task.new_tensor(spec.weights)
    return (terms.per_task * weights).sum(-1) + terms.extra


def _any_weighted(present: torch.Tensor, sample_weights: torch.Tensor | None) -> torch.Tensor:
    """``[..., B]`` -> ``[...]``: a row is present with positive weight."""
    mask = present.float() if sample_weights is None else present.float() * sample_weights.float()
    return mask.sum(-1) > 0


def _counterfactual_risk(
    cvr_logit: torch.Tensor,
    cvr_label: torch.Tensor,
    clicked: torch.Tensor,
    log_propensity: torch.Tensor,
    imputation_logit: torch.Tensor | None,
    ips_clip: float,
    sample_weights: torch.Tensor | None,
) -> torch.Tensor:
    """ESCM2's counterfactual CVR risk over the rows with a parent label (see :func:`funnel_loss`). ``[..., B]``."""
    present = ~torch.isnan(clicked)
    o = torch.nan_to_num(clicked)
    error = F.binary_cross_entropy_with_logits(cvr_logit, torch.nan_to_num(cvr_label), reduction="none")
    error = torch.where(o > 0, error, torch.zeros_like(error))  # e_i is only observed on clicked rows
    inverse = torch.exp(-log_propensity.detach())  # 1 / o_hat, no gradient into the CTR tower
    if ips_clip > 0:
        inverse = inverse.clamp_max(ips_clip)
    if imputation_logit is None:
        return _masked_mean(o * error * inverse, present, sample_weights)
    imputed = F.softplus(imputation_logit)  # e_hat >= 0, like the error it imputes
    residual = error - imputed
    doubly_robust = imputed + o * residual * inverse
    imputation = o * residual**2 * inverse
    return _masked_mean(doubly_robust + imputation, present, sample_weights)
