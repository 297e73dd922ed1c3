"""Blending per-task scores into one ranking score, and the ranking it gives.

Each task's score ``p_k`` first goes through a transform ``t_k``; then

* ``weighted_sum``:     ``s = sum_k w_k t_k(p_k)``
* ``weighted_product``: ``s = prod_k t_k(p_k) ^ w_k`` (YouTube's multiplicative blend; needs ``t_k(p_k) > 0``,
  values are clipped at ``1e-12``; computed as ``exp(sum_k w_k log t_k(p_k))``)

Transforms: ``identity``, ``log`` (``log(max(p, 1e-12))``), ``logit``, ``sigmoid`` (for regression outputs),
``log1p`` (``log(1 + max(p, 0))``, e.g. watch time), ``rank`` (the percentile of the score in the request).

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
TRANSFORMS = ("identity", "log", "logit", "sigmoid", "log1p", "rank")
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
    """One of :data:`TRANSFORMS` applied to a column of scores, ``[N] -> [N]`` (float64)."""
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
    """Candidate indices of ``blended [N]``, best first (ties keep the request's order)."""
    return np.argsort(-np.asarray(blended), kind="stable").tolist()
