"""An impression simulator with known true relevance and a position-based examination model (for the
position / selection bias study, :mod:`mtrank.experiments.studies.position_bias`).

For each query, ``list_size`` candidates with features ``x ~ N(0, I_d)``:

1. true relevance ``r(x) = sigmoid(w . x + 0.5 sin(v . x) - 1)`` (``w``, ``v`` fixed by ``world_seed``; the last
   feature, ``x_boost``, has weight 0 in ``w`` and ``v``: it has nothing to do with relevance);
2. a logging policy orders the list by ``w . x + policy_boost * x_boost + N(0, policy_noise^2)``: the items it
   shows on top are more relevant (selection bias) and have a larger ``x_boost`` (a feature the old ranker
   promoted: a model that learns clicks without position learns to promote it too);
3. the item at position ``p`` (0 = top) is examined with probability ``(1 / (p + 1)) ** severity``
   (``severity`` 0: no position bias) and clicked with probability ``examined * r(x)``.

Rows: ``dense = x [N, d]``, ``sparse = position [N, 1]``, ``labels = click [N, 1]``; with ``relevance [N]``,
``query [N]`` and ``position [N]`` beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mtrank.data.tensors import TensorData


@dataclass
class ImpressionConfig:
    """Parameters of the simulator (see the module docstring)."""

    queries: int = 2000
    list_size: int = 10
    num_dense: int = 8
    severity: float = 1.0
    policy_boost: float = 1.0
    policy_noise: float = 1.0
    world_seed: int = 0  # fixes w, v: the same world for every draw
    seed: int = 0  # draws the queries, the logging noise and the clicks


@dataclass
class Impressions:
    """Logged impressions: the rows a model trains on, and the ground truth beside them."""

    rows: TensorData
    relevance: np.ndarray  # [N] true click probability if examined
    query: np.ndarray  # [N] query id (rows of one query are consecutive, in logged order)
    position: np.ndarray  # [N] logged position, 0 = top
    list_size: int

    def by_query(self, values: np.ndarray) -> np.ndarray:
        """``[N] -> [queries, list_size]`` (rows of one query are consecutive)."""
        return np.asarray(values).reshape(-1, self.list_size)


def make_impressions(config: ImpressionConfig) -> Impressions:
    """Simulate ``queries x list_size`` impressions.

    Example:
        >>> imp = make_impressions(ImpressionConfig(queries=50, list_size=5))
        >>> imp.rows.dense.shape, imp.rows.sparse.shape, imp.by_query(imp.position)[0].tolist()
        (torch.Size([250, 8]), torch.Size([250, 1]), [0, 1, 2, 3, 4])
    """
    if config.severity < 0 or config.list_size < 2 or config.num_dense < 2:
        raise ValueError(
            f"impressions: need severity >= 0, list_size >= 2, num_dense >= 2; got {config.severity}, "
            f"{config.list_size}, {config.num_dense}"
        )
    world = np.random.default_rng([config.world_seed, 7])
    w = world.normal(0, 1, config.num_dense) / np.sqrt(config.num_dense - 1)
    v = world.normal(0, 1, config.num_dense)
    w[-1], v[-1] = 0.0, 0.0  # x_boost: no part of relevance
    rng = np.random.default_rng([config.seed, 11])
    q, n = config.queries, config.list_size
    x = rng.normal(0, 1, (q, n, config.num_dense))
    true_logit = x @ w + 0.5 * np.sin(x @ v) - 1.0  # (Q, L)
    relevance = 1 / (1 + np.exp(-true_logit))
    policy = x @ w + config.policy_boost * x[..., -1] + config.policy_noise * rng.normal(0, 1, (q, n))
    order = np.argsort(-policy, axis=1)  # (Q, L) item at each position
    x, relevance = np.take_along_axis(x, order[..., None], 1), np.take_along_axis(relevance, order, 1)
    position = np.broadcast_to(np.arange(n), (q, n))
    examined = rng.random((q, n)) < (1.0 / (position + 1)) ** config.severity
    clicks = examined & (rng.random((q, n)) < relevance)
    rows = TensorData(
        dense=torch.from_numpy(x.reshape(q * n, -1).astype(np.float32)),
        sparse=torch.from_numpy(position.reshape(-1, 1).astype(np.int64)),
        labels=torch.from_numpy(clicks.reshape(-1, 1).astype(np.float32)),
    )
    return Impressions(rows, relevance.reshape(-1), np.repeat(np.arange(q), n), position.reshape(-1).copy(), n)
