"""Blending per-task scores into one ranking score, and the ranking it gives.

Each task's score ``p_k`` first goes through a transform ``t_k``; then

* ``weighted_sum``:     ``s = sum_k w_k t_k(p_k)``
* ``weighted_product``: ``s = prod_k t_k(p_k) ^ w_k`` (YouTube's multiplicative blend; computed as
  ``exp(sum_k w_k log t_k(p_k))``). The factors must be ``>= 0``: transforms that give negative values
  (``log``, ``logit``, ``standardize``) are refused with it (a weighted sum of logs ranks as the weighted product
  of the scores), and a negative factor (``identity`` of a regression output below 0) is an error naming the
  task and candidate; a factor below ``1e-12`` (a probability that underflowed to 0) counts as ``1e-12``, so such
  candidates rank last but still in the order of their other factors.

Transforms: ``identity``, ``log`` (``log(max(p, 1e-12))``), ``logit``, ``sigmoid`` (for regression outputs),
``log1p`` (``log(1 + max(p, 0))``, e.g. watch time), and two computed over the candidates of one request
(:data:`PER_REQUEST`): ``rank`` (the percentile of the score among the request's candidates, ties sharing their
mean rank) and ``standardize`` (``(p - mean) / std`` over the request's candidates; std 0 counts as 1).

A service blends one request at a time; tuning on a file of many requests passes each row's request id
(:meth:`Blend.apply` ``request_ids``), so both compute every transform over the same candidates.

Weights are tuned on labelled validation data by :mod:`mtrank.blend.tuning`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("weighted_sum", "weighted_product")
TRANSFORMS = ("identity", "log", "logit", "sigmoid", "log1p", "rank", "standardize")
PER_REQUEST = ("rank", "standardize")  # computed over the candidates of one request
SIGNED = ("log", "logit", "standardize")  # give negative values: not factors of a weighted_product
BLEND_FILE = "blend.json"
_EPS = 1e-12


@dataclass
class Blend:
    """How task scores become one ranking score.

    Args:
        method: ``weighted_sum`` or ``weighted_product``.
        weights: weight of each task, by task name (tasks left out get weight 0).
        transforms: transform of each task's score, by task name (default ``identity``).

    Example:
        >>> scores = np.array([[0.2, 0.9], [0.6, 0.5]])  # (N, K): click, like
        >>> blend = Blend("weighted_sum", {"click": 2.0, "like": 1.0})
        >>> blend.apply(scores, ["click", "like"]).round(6).tolist(), ranking(blend.apply(scores, ["click", "like"]))
        ([1.3, 1.7], [1, 0])
        >>> Blend.from_dict({"weights": {"clicks": 1.0}}, ["click", "like"])
        Traceback (most recent call last):
        ...
        ValueError: blend.weights.clicks: unknown task; the model's tasks are ['click', 'like']
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
            if self.method == "weighted_product" and transform in SIGNED and self.weights.get(name, 0.0) != 0:
                raise ValueError(
                    f"blend.transforms.{name}: {transform!r} gives negative values, which weighted_product cannot "
                    "raise to a power; use method weighted_sum (a weighted sum of logs ranks as the weighted "
                    "product of the scores) or a transform >= 0 (identity, sigmoid, log1p, rank)"
                )
        if not any(self.weights.get(name, 0.0) != 0 for name in task_names):
            raise ValueError(f"blend.weights: every weight is 0; give at least one task of {task_names} a weight")
        return self

    @classmethod
    def default(cls, task_names: list[str]) -> Blend:
        """Equal weights, weighted sum, no transforms."""
        return cls("weighted_sum", {name: 1.0 for name in task_names}, {})

    @classmethod
    def from_dict(cls, data: Any, task_names: list[str]) -> Blend:
        """A blend from its JSON form (``blend.json``, a request's ``blend``), checked against ``task_names``."""
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
        """The JSON form read by :meth:`from_dict`."""
        return {"method": self.method, "weights": dict(self.weights), "transforms": dict(self.transforms)}

    def save(self, directory: str | Path) -> Path:
        """Write ``blend.json`` into ``directory`` (a model directory: the service's default blend)."""
        from mtrank.artifacts import add_to_manifest  # torch; this module needs only numpy

        path = Path(directory) / BLEND_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        add_to_manifest(directory, [path])  # a sealed model directory records it
        return path

    def apply(self, scores: np.ndarray, task_names: list[str], request_ids: np.ndarray | None = None) -> np.ndarray:
        """``scores [N, K]`` (columns in ``task_names`` order) -> blended ``[N]`` (float64).

        ``request_ids [N]``: the request of each row; :data:`PER_REQUEST` transforms are computed within each
        request. None: the rows are one request (what a service blends).
        """
        return self.combine(self.transformed(scores, task_names, request_ids), task_names)

    def transformed(
        self, scores: np.ndarray, task_names: list[str], request_ids: np.ndarray | None = None
    ) -> np.ndarray:
        """``scores [N, K]`` -> ``t_k(p_k)`` ``[N, K]`` (float64), per request (see :meth:`apply`); independent of
        the weights, so tuning computes it once."""
        scores = np.asarray(scores, dtype=np.float64)
        codes = request_codes(request_ids, scores.shape[0])
        columns = [
            transform(scores[:, k], self.transforms.get(name, "identity"), codes) for k, name in enumerate(task_names)
        ]
        return np.stack(columns, 1) if columns else scores

    def combine(self, transformed: np.ndarray, task_names: list[str]) -> np.ndarray:
        """Transformed scores ``[N, K]`` (:meth:`transformed`) -> blended ``[N]`` with this blend's weights."""
        total = np.zeros(transformed.shape[0])
        for k, name in enumerate(task_names):
            weight = float(self.weights.get(name, 0.0))
            if weight == 0:
                continue
            value = transformed[:, k]
            if self.method == "weighted_sum":
                total += weight * value
                continue
            negative = np.flatnonzero(value < 0)
            if negative.size:
                raise ValueError(
                    f"blend: weighted_product needs task scores >= 0 after the transform, but task {name!r} "
                    f"({self.transforms.get(name, 'identity')}) is {value[negative[0]]:.4g} for candidate "
                    f"{int(negative[0])}; use transform sigmoid, log1p or rank for it, or method weighted_sum"
                )
            total += weight * np.log(np.maximum(value, _EPS))
        return np.exp(total) if self.method == "weighted_product" else total


def request_codes(request_ids: np.ndarray | None, rows: int) -> np.ndarray:
    """``[N]`` int64 request index ``0..G-1`` of each row (all 0 without ids: the rows are one request)."""
    if request_ids is None:
        return np.zeros(rows, dtype=np.int64)
    request_ids = np.asarray(request_ids)
    if request_ids.shape != (rows,):
        raise ValueError(f"request_ids: expected one id per row ({rows}), got shape {request_ids.shape}")
    return np.unique(request_ids, return_inverse=True)[1].reshape(rows).astype(np.int64)


def transform(values: np.ndarray, name: str, codes: np.ndarray | None = None) -> np.ndarray:
    """One of :data:`TRANSFORMS` applied to a column of scores, ``[N] -> [N]`` (float64); :data:`PER_REQUEST`
    transforms within each request of ``codes`` (:func:`request_codes`; None: one request).

    Example:
        >>> transform(np.array([0.2, 0.9, 0.5, 3.0, 1.0]), "rank", np.array([0, 0, 0, 1, 1])).round(3).tolist()
        [0.333, 1.0, 0.667, 1.0, 0.5]
    """
    if name in PER_REQUEST:
        codes = np.zeros(len(values), dtype=np.int64) if codes is None else codes
        return _rank_within(values, codes) if name == "rank" else _standardize_within(values, codes)
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
    raise ValueError(f"transform: unknown {name!r}; expected one of {TRANSFORMS}")


def _rank_within(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The percentile ``rank / n`` of each value among the ``n`` values of its request (1/n lowest .. 1 highest),
    tied values sharing their mean rank; vectorised over requests."""
    n = len(values)
    if n == 0:
        return np.zeros(0)
    order = np.lexsort((values, codes))  # by request, then by value
    code, value = codes[order], values[order]
    sizes = np.bincount(codes)
    starts = np.cumsum(sizes) - sizes
    position = np.arange(1, n + 1) - starts[code]  # 1-based rank within the request
    run = np.cumsum(np.r_[True, (code[1:] != code[:-1]) | (value[1:] != value[:-1])]) - 1  # runs of ties
    mean_position = np.bincount(run, weights=position) / np.bincount(run)
    ranks = np.empty(n)
    ranks[order] = mean_position[run] / sizes[code]
    return ranks


def _standardize_within(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``(p - mean) / std`` over the values of each request (population std; 0 counts as 1)."""
    if len(values) == 0:
        return np.zeros(0)
    sizes = np.bincount(codes)
    deviation = values - (np.bincount(codes, weights=values) / sizes)[codes]
    std = np.sqrt(np.bincount(codes, weights=deviation**2) / sizes)
    return deviation / np.where(std > 0, std, 1.0)[codes]


def ranking(blended: np.ndarray) -> list[int]:
    """Candidate indices of ``blended [N]``, best first (ties keep the request's order)."""
    return np.argsort(-np.asarray(blended), kind="stable").tolist()
