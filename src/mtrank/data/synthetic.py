"""The synthetic two-task data of Ma et al. (KDD 2018, section 3.2), with controlled task correlation; and a
click -> conversion funnel with a known CVR on every impression (:func:`make_funnel`).

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


@dataclass
class SyntheticFunnelConfig:
    """A click -> conversion funnel with a known conversion probability on every impression.

    ``x ~ N(0, I_d)``; unit vectors ``u_c, u_v`` with ``cos = correlation``; ``s_c = x . u_c``, ``s_v = x . u_v``:

    * click: ``o ~ Bernoulli(sigmoid(click_scale s_c + click_bias))`` (``click_bias`` sets the CTR);
    * conversion had the item been clicked (every impression): ``r ~ Bernoulli(cvr)``, with the true CVR
      ``cvr = sigmoid(s_v + curvature (s_c^2 - 1) + cvr_bias)``;
    * observed: the click, and the conversion on clicked rows only (NaN elsewhere).

    Clicks are drawn from ``x`` alone (missing at random given x), so ``cvr`` is the CVR over every impression
    and the one a model trained on clicked rows should also learn; with ``correlation > 0`` and a curvature in
    ``s_c``, clicked rows cover the impression space unevenly (sample selection bias).
    """

    n: int = 20_000
    d: int = 16
    correlation: float = 0.5
    click_scale: float = 2.0
    click_bias: float = -2.0
    curvature: float = 0.5
    cvr_bias: float = -1.0
    seed: int = 0


def make_funnel(config: SyntheticFunnelConfig | None = None, **overrides) -> tuple[TensorData, torch.Tensor]:
    """``n`` impressions of :class:`SyntheticFunnelConfig`: ``dense = x [n, d]``, ``labels = [click, conversion]
    [n, 2]`` (conversion NaN where not clicked), and the true CVR of every impression ``[n]`` (float32).

    Example:
        >>> data, true_cvr = make_funnel(n=2000, seed=1)
        >>> data.labels.shape, true_cvr.shape, bool(data.labels[:, 1].isnan().any())
        (torch.Size([2000, 2]), torch.Size([2000]), True)
    """
    config = config or SyntheticFunnelConfig()
    if overrides:
        config = SyntheticFunnelConfig(**{**config.__dict__, **overrides})
    if not -1.0 <= config.correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {config.correlation}")
    gen = torch.Generator().manual_seed(config.seed)
    u_click, u_cvr = task_weights(SyntheticConfig(d=config.d, correlation=config.correlation, c=1.0), gen)
    x = torch.randn(config.n, config.d, generator=gen, dtype=torch.float64)
    s_click, s_cvr = x @ u_click, x @ u_cvr  # (n,)
    ctr = torch.sigmoid(config.click_scale * s_click + config.click_bias)
    cvr = torch.sigmoid(s_cvr + config.curvature * (s_click**2 - 1) + config.cvr_bias)
    click = torch.bernoulli(ctr, generator=gen)
    conversion = torch.bernoulli(cvr, generator=gen)
    conversion = torch.where(click == 1, conversion, torch.full_like(conversion, math.nan))
    data = TensorData(
        dense=x.float(),
        sparse=torch.zeros(config.n, 0, dtype=torch.long),
        labels=torch.stack([click, conversion], 1).float(),
    )
    return data, cvr.float()
