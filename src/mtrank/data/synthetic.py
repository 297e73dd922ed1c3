"""The synthetic two-task data of Ma et al. (KDD 2018, section 3.2), with controlled task correlation.

1. Orthonormal ``u1, u2`` in R^d; ``w1 = c u1``, ``w2 = c (p u1 + sqrt(1 - p^2) u2)``, so ``cos(w1, w2) = p``.
2. ``x ~ N(0, I_d)``; ``y_t = w_t . x + sum_{i=1..m} sin(alpha_i w_t . x + beta_i) + e_t``, ``e_t ~ N(0, noise^2)``;
   the same ``alpha, beta`` for both tasks.

The paper gives d = 100 only. Our defaults, c = 1, m = 10, alpha, beta ~ N(0, 1), follow PLE (Tang et al., 2020),
which re-ran this setting; the noise std 0.1 gives the paper's ``N(0, 0.01)`` (variance 0.01). See docs/synthetic.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtrank.data.tensors import TensorData


@dataclass
class SyntheticConfig:
    """Parameters of the generator (defaults as documented in the module docstring)."""

    n: int = 10_000
    correlation: float = 0.5
    d: int = 100
    c: float = 1.0
    m: int = 10
    noise_std: float = 0.1
    seed: int = 0


def task_weights(config: SyntheticConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``w1, w2`` in R^d with ``cos(w1, w2) = p`` (float64)."""
    p = config.correlation
    if not -1.0 <= p <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {p}")
    # orthonormal u1, u2 from the QR decomposition of a random d x 2 matrix
    q, _ = torch.linalg.qr(torch.randn(config.d, 2, generator=generator, dtype=torch.float64))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = config.c * u1
    w2 = config.c * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)
    return w1, w2


def make_synthetic(config: SyntheticConfig | None = None, **overrides) -> TensorData:
    """Generate ``n`` rows: ``dense = x [n, d]``, ``labels = [y1, y2] [n, 2]`` (float32), no categorical features.

    Example:
        >>> data = make_synthetic(n=1000, correlation=0.9, seed=1)
        >>> data.dense.shape, data.labels.shape
        (torch.Size([1000, 100]), torch.Size([1000, 2]))
    """
    config = config or SyntheticConfig()
    if overrides:
        config = SyntheticConfig(**{**config.__dict__, **overrides})
    gen = torch.Generator().manual_seed(config.seed)
    w1, w2 = task_weights(config, gen)
    alpha = torch.randn(config.m, generator=gen, dtype=torch.float64)
    beta = torch.randn(config.m, generator=gen, dtype=torch.float64)
    x = torch.randn(config.n, config.d, generator=gen, dtype=torch.float64)
    labels = []
    for w in (w1, w2):
        z = x @ w  # (n,)
        y = z + torch.sin(alpha * z[:, None] + beta).sum(1)  # (n,)
        y = y + config.noise_std * torch.randn(config.n, generator=gen, dtype=torch.float64)
        labels.append(y)
    return TensorData(
        dense=x.float(),
        sparse=torch.zeros(config.n, 0, dtype=torch.long),
        labels=torch.stack(labels, 1).float(),
    )
