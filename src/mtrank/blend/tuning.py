"""Tuning blend weights on labelled validation data against a stated objective.

* ``auc``: ``sum_k a_k AUC(s, y_k)``, how well the one blended score ``s`` ranks for each task (``a_k`` =
  the objective's task weights, default 1 per task);
* ``reward@k``: mean over requests of ``sum_k a_k y_k`` summed over the ``k`` best-blended candidates of each
  request (needs request ids): the value of what the ranking would show. ``row_value`` replaces ``sum_k a_k y_k``
  by a value logged per row (e.g. the engagement reward of an impression) where that is what the blend serves.

Only the weights' direction matters for the ranking (both blends of :mod:`mtrank.blend.rules` are invariant to
scaling all ``w``), so the search runs over weights that sum to 1: a grid over the simplex, or optuna's TPE
sampler.

Transforms computed over a request's candidates (``rank``, ``standardize``) are computed within each request of
the tuning rows, as the service computes them for each request it blends: tuning needs the rows' request ids
then, and the blend it picks ranks every request as the service will.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from mtrank.blend.rules import PER_REQUEST, Blend

OBJECTIVES = ("auc", "reward@k")
SEARCHES = ("grid", "optuna")


@dataclass(frozen=True)
class Objective:
    """What a blend is tuned for: the value of blended scores on labelled rows (higher is better).

    Args:
        name: ``auc`` or ``reward@k`` (see the module docstring).
        weights: ``a_k`` by task name (default 1 for every task).
        request_ids: ``[N]`` request of each row (``reward@k``).
        top_k: candidates shown per request (``reward@k``).
        row_value: ``[N]`` value of each row for ``reward@k`` (e.g. the logged reward); default ``labels @ a``.

    Example:
        >>> labels = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (N, K): click, like
        >>> Objective("auc", weights={"like": 0.0})(np.array([0.9, 0.1, 0.5]), labels, ["click", "like"])
        1.0
        >>> Objective("reward@k", request_ids=np.array([0, 0, 1]))(np.array([0.9, 0.1, 0.5]), labels, ["click", "like"])
        1.5
    """

    name: str = "auc"
    weights: dict[str, float] | None = None
    request_ids: np.ndarray | None = None
    top_k: int = 1
    row_value: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective: unknown {self.name!r}; expected one of {OBJECTIVES}")
        if self.name == "reward@k" and self.request_ids is None:
            raise ValueError("objective reward@k: request_ids are required (which request each row belongs to)")
        if self.top_k < 1:
            raise ValueError(f"objective top_k: must be >= 1, got {self.top_k}")
        if self.row_value is not None and self.name != "reward@k":
            raise ValueError(f"objective {self.name}: row_value is only for reward@k")

    def __call__(self, blended: np.ndarray, labels: np.ndarray, task_names: list[str]) -> float:
        """The value of ``blended [N]`` on ``labels [N, K]`` (NaN = missing; those rows are left out of that
        task's AUC; columns in ``task_names`` order)."""
        task_weights = np.array([(self.weights or {}).get(n, 1.0) for n in task_names], dtype=np.float64)
        labels = np.asarray(labels, dtype=np.float64)
        if self.name == "reward@k":
            value = np.nan_to_num(labels) @ task_weights if self.row_value is None else np.asarray(self.row_value)
            if value.shape != blended.shape:
                raise ValueError(f"objective reward@k: row_value has shape {value.shape}, expected {blended.shape}")
            return mean_top_k(blended, value, np.asarray(self.request_ids), self.top_k)
        total = 0.0
        for k, name in enumerate(task_names):
            if task_weights[k] == 0:
                continue
            present = ~np.isnan(labels[:, k])
            y = labels[present, k]
            if np.unique(y).size < 2:
                raise ValueError(f"objective auc: task {name!r} has a single class in the labels")
            total += task_weights[k] * roc_auc_score(y, blended[present])
        return float(total)


def mean_top_k(blended: np.ndarray, value: np.ndarray, request_ids: np.ndarray, top_k: int) -> float:
    """Mean over requests of the summed ``value [N]`` of the ``top_k`` rows with the highest ``blended [N]``.

    Example:
        >>> mean_top_k(np.array([0.9, 0.1, 0.8, 0.3]), np.array([1.0, 10.0, 2.0, 3.0]), np.array([0, 0, 1, 1]), 1)
        1.5
    """
    order = np.lexsort((-blended, request_ids))  # by request, best first within a request
    ids = request_ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    position = np.arange(len(ids)) - np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
    keep = position < top_k
    return float(value[order][keep].sum() / len(starts))


def simplex_grid(num_tasks: int, step: float) -> list[np.ndarray]:
    """Every weight vector ``[num_tasks]`` with entries in ``{0, step, 2 step, ...}`` that sums to 1.

    Example:
        >>> [w.tolist() for w in simplex_grid(2, 0.5)]
        [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    """
    units = int(round(1 / step))
    points = []
    for combo in itertools.product(range(units + 1), repeat=num_tasks - 1):
        if sum(combo) <= units:
            points.append(np.array([*combo, units - sum(combo)], dtype=np.float64) / units)
    return points


@dataclass
class TuneResult:
    """Best blend found, its objective value, the default (equal weights) blend's value, and every trial."""

    blend: Blend
    value: float
    default_value: float
    trials: list[dict[str, Any]]


def tune_blend(
    scores: np.ndarray,
    labels: np.ndarray,
    task_names: list[str],
    objective: Objective | None = None,
    method: str = "weighted_sum",
    transforms: dict[str, str] | None = None,
    search: str = "grid",
    step: float = 0.05,
    trials: int = 100,
    seed: int = 0,
    request_ids: np.ndarray | None = None,
) -> TuneResult:
    """Search blend weights (summing to 1) that maximise ``objective`` on validation ``scores`` / ``labels``.

    Args:
        scores: ``[N, K]`` task scores, columns in ``task_names`` order.
        labels: ``[N, K]`` task labels.
        objective: what to maximise (default: the sum of the tasks' AUCs).
        method / transforms: of the blends tried (see :class:`~mtrank.blend.rules.Blend`).
        search: ``grid`` (every point of the simplex at ``step``) or ``optuna`` (``trials`` TPE trials,
            sampler seed ``seed``).
        request_ids: ``[N]`` request of each row (default: the objective's); required with a ``rank`` or
            ``standardize`` transform, which is computed within each request as the service computes it.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> scores = rng.uniform(size=(400, 2))
        >>> labels = np.stack([rng.uniform(size=400) < 0.5, rng.uniform(size=400) < scores[:, 1]], 1)
        >>> result = tune_blend(scores, labels, ["click", "like"], Objective("auc", {"click": 0.0}), step=0.25)
        >>> result.blend.weights, result.value > result.default_value
        ({'click': 0.0, 'like': 1.0}, True)
    """
    objective = objective or Objective()
    transforms = dict(transforms or {})
    request_ids = objective.request_ids if request_ids is None else request_ids
    for name, kind in transforms.items():
        if kind in PER_REQUEST and request_ids is None:
            raise ValueError(
                f"transforms.{name}: {kind!r} is computed over each request's candidates, as the service computes "
                "it: give request_ids (the tuning file's request id column, --request-id)"
            )
    equal = Blend(method, dict.fromkeys(task_names, 1.0), transforms).validate(task_names)
    transformed = equal.transformed(scores, task_names, request_ids)  # (N, K): the weights do not change it

    def blend_of(weights: np.ndarray) -> Blend:
        return Blend(method, dict(zip(task_names, weights.tolist())), transforms)

    def evaluate(weights: np.ndarray) -> float:
        return objective(blend_of(weights).combine(transformed, task_names), labels, task_names)

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
        raise ValueError(f"search: unknown {search!r}; expected one of {SEARCHES}")
    best = max(history, key=lambda t: t["value"])
    default = evaluate(np.full(len(task_names), 1 / len(task_names)))
    return TuneResult(blend_of(np.array(best["weights"])), best["value"], default, history)
