"""A drifting-time simulator: rows arrive in periods, and the relation between features and the label drifts
from one period to the next (for the distillation-under-short-retention study,
:mod:`mtrank.experiments.studies.distill_retention`).

Period ``t`` has ``rows_per_period`` rows ``x ~ N(0, I_d)`` and one binary label with
``P(y = 1 | x, t) = sigmoid(scale * (w_t . x + 0.5 sin(v . x)) + offset)``, where ``w_t = cos(drift t) u1 +
sin(drift t) u2`` turns by ``drift`` radians per period in the plane of two orthonormal directions (``drift``
0: no drift). ``u1, u2, v`` are fixed by ``world_seed``; ``seed`` draws the rows and labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mtrank.data.tensors import TensorData


@dataclass
class DriftConfig:
    """Parameters of the simulator (see the module docstring)."""

    periods: int = 8
    rows_per_period: int = 4000
    num_dense: int = 16
    drift: float = 0.15
    scale: float = 2.0
    offset: float = -1.0
    world_seed: int = 0
    seed: int = 0


def make_drifting_periods(config: DriftConfig) -> list[TensorData]:
    """One :class:`TensorData` per period, oldest first (``dense [n, d]``, ``labels [n, 1]``, no categoricals).

    Example:
        >>> periods = make_drifting_periods(DriftConfig(periods=3, rows_per_period=100))
        >>> len(periods), periods[0].dense.shape, periods[2].labels.shape
        (3, torch.Size([100, 16]), torch.Size([100, 1]))
    """
    if config.periods < 2 or config.rows_per_period < 1 or config.num_dense < 2:
        raise ValueError(
            f"drift: need periods >= 2, rows_per_period >= 1, num_dense >= 2; got {config.periods}, "
            f"{config.rows_per_period}, {config.num_dense}"
        )
    world = np.random.default_rng([config.world_seed, 13])
    q, _ = np.linalg.qr(world.normal(0, 1, (config.num_dense, 2)))
    v = world.normal(0, 1, config.num_dense) / math.sqrt(config.num_dense)
    rng = np.random.default_rng([config.seed, 17])
    periods = []
    for t in range(config.periods):
        w = math.cos(config.drift * t) * q[:, 0] + math.sin(config.drift * t) * q[:, 1]
        x = rng.normal(0, 1, (config.rows_per_period, config.num_dense))
        logit = config.scale * (x @ w + 0.5 * np.sin(x @ v)) + config.offset
        y = rng.random(config.rows_per_period) < 1 / (1 + np.exp(-logit))
        periods.append(
            TensorData(
                dense=torch.from_numpy(x.astype(np.float32)),
                sparse=torch.zeros(config.rows_per_period, 0, dtype=torch.long),
                labels=torch.from_numpy(y.astype(np.float32)[:, None]),
            )
        )
    return periods
