"""Blending per-task scores into one ranking score, and tuning the blend weights on validation data.

Each task's score ``p_k`` first goes through a transform ``t_k``; then

* ``weighted_sum``:     ``s = sum_k w_k t_k(p_k)``
* ``weighted_product``: ``s = prod_k t_k(p_k) ^ w_k`` (YouTube's multiplicative blend; needs ``t_k(p_k) > 0``,
  values are clipped at ``1e-12``; computed as ``exp(sum_k w_k log t_k(p_k))``)

Transforms: ``identity``, ``log`` (``log(max(p, 1e-12))``), ``logit``, ``sigmoid`` (for regression outputs),
``log1p`` (``log(1 + max(p, 0))``, e.g. watch time), ``rank`` (the percentile of the score in the request).

Tuning (:func:`tune_blend`) searches weights against a stated objective on labelled validation data:

* ``auc``: ``sum_k a_k AUC(s, y_k)``, how well the one blended score ranks for each task (``a_k`` =
  ``objective_weights``, default 1 per binary task);
* ``reward@k``: mean over requests of ``sum_k a_k y_k`` summed over the ``k`` best-blended candidates of each
  request (needs request ids): the value of what the ranking would show.

Only the weights' direction matters for the ranking (both blends are invariant to scaling all ``w``), so the
search runs over weights that sum to 1: a grid over the simplex, or optuna's TPE sampler.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

METHODS = ("weighted_sum", "weighted_product")
TRANSFORMS = ("identity", "log", "logit", "sigmoid", "log1p", "rank")
OBJECTIVES = ("auc", "reward@k")
BLEND_FILE = "blend.json"
_EPS = 1e-12


@dataclass
class Blend:
    """How task scores become one ranking score.

    Args:
        method: ``weighted_sum`` or ``weighted_product``.
        weights: weight of each task, by task name (tasks left out get weight 0).
        transforms: transform of each task's score, by task name (default ``identity``).
    """

    method: str = "weighted_sum"
    weights: dict[str, float] = field(default_factory=dict)
    transforms: dict[str, str] = field(default_factory=dict)

    def validate(self, task_names: list[str]) -> Blend:
        """Check against the model's tasks; errors name the field and the fix."""
        if self.method not in METHODS:
            raise ValueError(f"blend.method: unknown {self.method!r}; expected one of {METHODS}")
        for part in ("weights", "transforms"):
            for name in getattr(self, part):
                if name not in task_names:
                    raise ValueError(f"blend.{part}.{name}: unknown task; the model's tasks are {task_names}")
        for name, weight in self.weights.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ValueError(f"blend.weights.{name}: expected a finite number, got {weight!r}")
        for name, transform in self.transforms.items():
            if transform not in TRANSFORMS:
                raise ValueError(f"blend.transforms.{name}: unknown {transform!r}; expected one of {TRANSFORMS}")
        if not any(self.weights.get(name, 0.0) != 0 for name in task_names):
            raise ValueError(f"blend.weights: every weight is 0; give at least one task of {task_names} a weight")
        return self

    @classmethod
    def default(cls, task_names: list[str]) -> Blend:
        """Equal weights, weighted sum, no transforms."""
        return cls("weighted_sum", {name: 1.0 for name in task_names}, {})

    @classmethod
    def from_dict(cls, data: Any, task_names: list[str]) -> Blend:
        if not isinstance(data, dict):
            raise ValueError(f"blend: expected an object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"method", "weights", "transforms"})
        if unknown:
            raise ValueError(f"blend.{unknown[0]}: unknown field; expected method, weights, transforms")
        for part in ("weights", "transforms"):
            if part in data and not isinstance(data[part], dict):
                raise ValueError(f"blend.{part}: expected an object {{task: value}}, got {data[part]!r}")
        blend = cls(
            data.get("method", "weighted_sum"),
            dict(data.get("weights", {})),
            dict(data.get("transforms", {})),
        )
        return blend.validate(task_names)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "weights": dict(self.weights), "transforms": dict(self.transforms)}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / BLEND_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def apply(self, scores: np.ndarray, task_names: list[str]) -> np.ndarray:
        """``scores [N, K]`` (columns in ``task_names`` order) -> blended ``[N]`` (float64)."""
        scores = np.asarray(scores, dtype=np.float64)
        total = np.zeros(scores.shape[0])
        for k, name in enumerate(task_names):
            weight = float(self.weights.get(name, 0.0))
            if weight == 0:
                continue
            value = transform(scores[:, k], self.transforms.get(name, "identity"))
            if self.method == "weighted_sum":
                total += weight * value
            else:
                total += weight * np.log(np.maximum(value, _EPS))
        return np.exp(total) if self.method == "weighted_product" else total


def transform(values: np.ndarray, name: str) -> np.ndarray:
    """One of :data:`TRANSFORMS` applied to a column of scores."""
    if name == "identity":
        return values
    if name == "log":
        return np.log(np.maximum(values, _EPS))
    if name == "logit":
        p = np.clip(values, _EPS, 1 - 1e-7)
        return np.log(p) - np.log1p(-p)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-values))
    if name == "log1p":
        return np.log1p(np.maximum(values, 0.0))
    if name == "rank":
        order = values.argsort(kind="stable")
        ranks = np.empty(len(values))
        ranks[order] = np.arange(1, len(values) + 1)
        return ranks / max(len(values), 1)
    raise ValueError(f"transform: unknown {name!r}; expected one of {TRANSFORMS}")


def ranking(blended: np.ndarray) -> list[int]:
    """Candidate indices, best first (ties keep the request's order)."""
    return np.argsort(-np.asarray(blended), kind="stable").tolist()


# ----------------------------------------------------------------------------------------- objectives


def blend_objective(
    blended: np.ndarray,
    labels: np.ndarray,
    task_names: list[str],
    objective: str = "auc",
    objective_weights: dict[str, float] | None = None,
    request_ids: np.ndarray | None = None,
    top_k: int = 1,
) -> float:
    """Value of a blended score on labelled data (higher is better); see the module docstring.

    Args:
        blended: ``[N]`` blended scores.
        labels: ``[N, K]`` task labels (NaN = missing; those rows are left out of that task's AUC).
        objective: ``auc`` or ``reward@k``.
        objective_weights: ``a_k`` by task name (default 1 for every task).
        request_ids: ``[N]`` request of each row (``reward@k``).
        top_k: candidates shown per request (``reward@k``).
    """
    weights = np.array([(objective_weights or {}).get(n, 1.0) for n in task_names], dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if objective == "auc":
        total = 0.0
        for k in range(len(task_names)):
            if weights[k] == 0:
                continue
            present = ~np.isnan(labels[:, k])
            y = labels[present, k]
            if np.unique(y).size < 2:
                raise ValueError(f"objective auc: task {task_names[k]!r} has a single class in the labels")
            total += weights[k] * roc_auc_score(y, blended[present])
        return float(total)
    if objective == "reward@k":
        if request_ids is None:
            raise ValueError("objective reward@k: request_ids are required (which request each row belongs to)")
        value = np.nan_to_num(labels) @ weights  # (N,) reward of each row
        return float(mean_top_k(blended, value, np.asarray(request_ids), top_k))
    raise ValueError(f"objective: unknown {objective!r}; expected one of {OBJECTIVES}")


def mean_top_k(blended: np.ndarray, value: np.ndarray, request_ids: np.ndarray, top_k: int) -> float:
    """Mean over requests of the summed ``value`` of the ``top_k`` rows with the highest ``blended``."""
    order = np.lexsort((-blended, request_ids))  # by request, best first within a request
    ids = request_ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    position = np.arange(len(ids)) - np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
    keep = position < top_k
    return float(value[order][keep].sum() / len(starts))


# ----------------------------------------------------------------------------------------- tuning


@dataclass
class TuneResult:
    """Best blend found, its objective value, the default blend's value, and every trial."""

    blend: Blend
    value: float
    default_value: float
    trials: list[dict[str, Any]]


def simplex_grid(num_tasks: int, step: float) -> list[np.ndarray]:
    """Every weight vector with entries in ``{0, step, 2 step, ...}`` that sums to 1."""
    units = int(round(1 / step))
    points = []
    for combo in itertools.product(range(units + 1), repeat=num_tasks - 1):
        if sum(combo) <= units:
            points.append(np.array([*combo, units - sum(combo)], dtype=np.float64) / units)
    return points


def tune_blend(
    scores: np.ndarray,
    labels: np.ndarray,
    task_names: list[str],
    method: str = "weighted_sum",
    transforms: dict[str, str] | None = None,
    objective: str = "auc",
    objective_weights: dict[str, float] | None = None,
    request_ids: np.ndarray | None = None,
    top_k: int = 1,
    search: str = "grid",
    step: float = 0.05,
    trials: int = 100,
    seed: int = 0,
) -> TuneResult:
    """Search blend weights (summing to 1) that maximise ``objective`` on validation ``scores`` / ``labels``.

    Args:
        scores: ``[N, K]`` task scores; labels: ``[N, K]`` task labels.
        search: ``grid`` (every point of the simplex at ``step``) or ``optuna`` (``trials`` TPE trials,
            sampler seed ``seed``).
    """
    transforms = dict(transforms or {})

    def evaluate(weights: np.ndarray) -> float:
        blend = Blend(method, dict(zip(task_names, weights.tolist())), transforms)
        blended = blend.apply(scores, task_names)
        return blend_objective(blended, labels, task_names, objective, objective_weights, request_ids, top_k)

    history: list[dict[str, Any]] = []
    if search == "grid":
        for weights in simplex_grid(len(task_names), step):
            history.append({"weights": weights.tolist(), "value": evaluate(weights)})
    elif search == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)

        def objective_fn(trial: optuna.Trial) -> float:
            raw = np.array([trial.suggest_float(f"w_{n}", 0.0, 1.0) for n in task_names])
            weights = raw / raw.sum() if raw.sum() > 0 else np.full(len(raw), 1 / len(raw))
            value = evaluate(weights)
            history.append({"weights": weights.tolist(), "value": value})
            return value

        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        study.optimize(objective_fn, n_trials=trials)
    else:
        raise ValueError(f"search: unknown {search!r}; expected grid or optuna")
    best = max(history, key=lambda t: t["value"])
    default = evaluate(np.full(len(task_names), 1 / len(task_names)))
    blend = Blend(method, dict(zip(task_names, best["weights"])), transforms)
    return TuneResult(blend, best["value"], default, history)
