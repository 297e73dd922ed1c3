"""Simulated ranking logs whose best blend of task scores differs by user group (for learned blending).

Each request has a user in group ``g`` (uniform over ``groups``) and context features
``x = [one_hot(g) * signal, noise]`` (``noise`` dims ~ N(0, 1) carry nothing). It has ``candidates`` items,
each with K task scores ``r in (0, 1)^K`` (what a multi-task ranker predicts), drawn as ``sigmoid(z)`` with
``z`` Gaussian, tasks correlated ``task_correlation`` (negative = a trade-off, e.g. clicks vs saves).

The user's group decides what they value: showing item ``r`` to a user of group ``g`` leads to a positive
engagement with probability ``sigmoid(bias + sharpness * (a_g . r))``, worth ``v ~ LogNormal(0, 0.5)``
(e.g. dwell). ``a_g`` (``preference[g]``) differs between groups, so no single weight vector ranks well for
everyone, while ranking by ``a_g . r`` is optimal for each group.

Logging policy (the randomised-weights traffic of Pinterest's learned utility): for each request, blend
weights ``w ~ Dirichlet(1)`` are drawn, items are ranked by ``w . r`` and the top ``shown`` are shown; the
logs hold those impressions only: ``(x, r, engaged, reward = engaged * v)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PreferenceConfig:
    """Parameters of :func:`make_preference_logs` (see the module docstring)."""

    requests: int = 4000
    candidates: int = 20
    shown: int = 3
    preference: list[list[float]] = field(default_factory=lambda: [[1.0, 0.1], [0.1, 1.0]])
    context_noise: int = 6
    signal: float = 1.0
    task_correlation: float = -0.3
    sharpness: float = 4.0
    bias: float = -2.5
    seed: int = 0

    @property
    def groups(self) -> int:
        return len(self.preference)

    @property
    def num_tasks(self) -> int:
        return len(self.preference[0])

    def validate(self) -> PreferenceConfig:
        if not self.preference or any(len(row) != self.num_tasks for row in self.preference):
            raise ValueError("preference: give one row of K task weights per user group, all of length K")
        if not 1 <= self.shown <= self.candidates:
            raise ValueError(f"shown: must be in [1, candidates={self.candidates}], got {self.shown}")
        if not -1 < self.task_correlation < 1:
            raise ValueError(f"task_correlation: must be in (-1, 1), got {self.task_correlation}")
        return self


@dataclass
class PreferenceData:
    """Requests with their candidates, and the logged impressions.

    Attributes:
        context: ``[R, F]`` request features; group: ``[R]`` user group; scores: ``[R, C, K]`` task scores.
        preference: ``[G, K]`` true per-group weights ``a_g``.
        shown: ``[R, S]`` indices of the logged (shown) candidates of each request.
        engaged: ``[R, S]`` 1 if the shown item got a positive engagement.
        reward: ``[R, S]`` its value (0 if not engaged).
    """

    context: torch.Tensor
    group: torch.Tensor
    scores: torch.Tensor
    preference: torch.Tensor
    shown: torch.Tensor
    engaged: torch.Tensor
    reward: torch.Tensor
    sharpness: float
    bias: float

    def impressions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat logs: ``context [N, F]``, ``task scores [N, K]``, ``engaged [N]``, ``reward [N]``."""
        r, s = self.shown.shape
        scores = torch.gather(self.scores, 1, self.shown.unsqueeze(-1).expand(-1, -1, self.scores.shape[-1]))
        context = self.context.unsqueeze(1).expand(-1, s, -1)  # (R, S, F)
        flat = (context.reshape(r * s, -1), scores.reshape(r * s, -1))
        return (*flat, self.engaged.reshape(-1), self.reward.reshape(-1))

    def expected_reward(self, blended: torch.Tensor, top_k: int = 1) -> float:
        """Mean over requests of the expected reward of the ``top_k`` candidates by ``blended [R, C]``."""
        value = self.engagement_probability()  # (R, C); E[v] is the same constant for every item
        top = blended.topk(top_k, dim=1).indices  # (R, top_k)
        return float(torch.gather(value, 1, top).sum(1).mean() * _MEAN_VALUE)

    def engagement_probability(self) -> torch.Tensor:
        """``[R, C]`` probability of a positive engagement for every candidate (the simulator's truth)."""
        weights = self.preference[self.group]  # (R, K)
        utility = (self.scores * weights.unsqueeze(1)).sum(-1)  # (R, C)
        return torch.sigmoid(self.bias + self.sharpness * utility)


_VALUE_SIGMA = 0.5
_MEAN_VALUE = float(torch.exp(torch.tensor(_VALUE_SIGMA**2 / 2)))  # E[LogNormal(0, sigma)]


def make_preference_logs(config: PreferenceConfig | None = None, **overrides) -> PreferenceData:
    """Generate requests, candidates and randomised-weight impression logs (see the module docstring).

    Example:
        >>> data = make_preference_logs(requests=100, seed=1)
        >>> data.scores.shape, data.shown.shape, data.context.shape
        (torch.Size([100, 20, 2]), torch.Size([100, 3]), torch.Size([100, 8]))
    """
    config = config or PreferenceConfig()
    if overrides:
        config = PreferenceConfig(**{**config.__dict__, **overrides})
    config.validate()
    gen = torch.Generator().manual_seed(config.seed)
    r, c, k, g = config.requests, config.candidates, config.num_tasks, config.groups
    group = torch.randint(0, g, (r,), generator=gen)
    one_hot = torch.nn.functional.one_hot(group, g).float() * config.signal
    context = torch.cat([one_hot, torch.randn(r, config.context_noise, generator=gen)], dim=1)  # (R, G + noise)
    cov = torch.full((k, k), config.task_correlation) + torch.eye(k) * (1 - config.task_correlation)
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(r, c, k, generator=gen) @ chol.T  # (R, C, K), correlated task logits
    scores = torch.sigmoid(z - 1.0)
    data = PreferenceData(
        context,
        group,
        scores,
        torch.tensor(config.preference, dtype=torch.float32),
        torch.zeros(r, config.shown, dtype=torch.long),
        torch.zeros(r, config.shown),
        torch.zeros(r, config.shown),
        config.sharpness,
        config.bias,
    )
    # logging policy: random Dirichlet(1) blend weights per request, show the top `shown`
    # (torch's Dirichlet takes no generator: normalised exponentials are Dirichlet(1) draws)
    expo = -torch.log(torch.rand(r, k, generator=gen).clamp_min(1e-12))
    logging_weights = expo / expo.sum(1, keepdim=True)  # (R, K) ~ Dirichlet(1)
    shown = (scores * logging_weights.unsqueeze(1)).sum(-1).topk(config.shown, dim=1).indices  # (R, S)
    prob = torch.gather(data.engagement_probability(), 1, shown)  # (R, S)
    engaged = (torch.rand(prob.shape, generator=gen) < prob).float()
    value = torch.exp(_VALUE_SIGMA * torch.randn(prob.shape, generator=gen))
    data.shown, data.engaged, data.reward = shown, engaged, engaged * value
    return data
