"""Gate types: each task's softmax over the experts it may use, all tasks from one projection, registered by name.

The contract of a gate type (what :class:`~mtrank.nn.block.ExtractionLevel` needs), for the built-in ones and
for any registered from outside the package with ``@GATES.register(name, config_class)``:

* ``from_config(in_features, allowed, config) -> module``: G gates over E experts, ``allowed [G, E]`` bool
  saying which experts each gate may use; ``config`` is the type's config class;
* ``module(x)``: ``x [B, in]`` (every gate reads the same input) or ``[G, B, in]`` (gate g reads ``x[g]``)
  ``-> (weights [B, G, E] float32, each row summing to 1 over its allowed experts; aux_loss [] float32)``;
  ``module.num_gates == G``;
* optional ``random_sources() -> [str]``: what it draws at random in training.

``softmax``: :class:`SoftmaxGates` (Ma et al. 2018; temperature, gate dropout, MLP gates).
``topk``: :class:`TopKGates`, noisy top-k gating with its load-balancing loss (Shazeer et al. 2017).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtrank.config.base import check, join
from mtrank.config.model import GATES, GateConfig, ModelConfig
from mtrank.nn.stacked import StackedLinear, StackedMLP


@GATES.register("softmax", GateConfig)
class SoftmaxGates(nn.Module):
    """G softmax gates over E experts, all computed by one stacked projection ``[G, in, E]``.

    ``g_k(x) = softmax((W_k h(x) + b_k) / temperature)`` restricted to the experts in ``allowed[k]`` (others get
    weight 0), with ``h`` the identity or a hidden layer (``hidden`` units). A gate with a single allowed expert
    is fixed at weight 1 and has no parameters, which is how Shared-Bottom and Single-task are expressed as
    gated blocks. In training, gate dropout drops each allowed expert's weight with probability ``dropout`` and
    renormalises the rest (as -inf logits before the softmax; a row whose allowed experts are all dropped keeps
    them all). The softmax runs in float32 (also under bf16 autocast).

    Shapes: ``x [B, in]`` or ``[G, B, in]`` -> ``weights [B, G, E]`` (float32), ``aux_loss []`` (0 here).

    Example:
        >>> gates = SoftmaxGates(100, torch.ones(2, 8, dtype=torch.bool))
        >>> w, aux = gates(torch.randn(4, 100))
        >>> w.shape, bool(torch.allclose(w.sum(-1), torch.ones(4, 2)))
        (torch.Size([4, 2, 8]), True)
    """

    def __init__(
        self,
        in_features: int,
        allowed: torch.Tensor,
        temperature: float = 1.0,
        dropout: float = 0.0,
        hidden: int = 0,
        proj_out: int = 0,
    ) -> None:
        super().__init__()
        self.num_gates, self.num_experts = allowed.shape
        self.register_buffer("allowed", allowed.clone())
        self.fixed = bool((allowed.sum(1) == 1).all())
        self.all_allowed = bool(allowed.all())  # OMoE / MMoE: no -inf mask needed (saves two ops per step)
        self.temperature = float(temperature)
        self.dropout = float(dropout)
        g = self.num_gates
        # a fixed gate (one allowed expert per gate) has no parameters at all
        self.hidden = StackedMLP(g, in_features, [hidden]) if hidden and not self.fixed else None
        self.proj_in = hidden or in_features
        # the projection's width: E logits, or what a subclass's gate computes from (DSelect-k's selectors)
        self.proj = None if self.fixed else StackedLinear(g, self.proj_in, proj_out or self.num_experts)
        if self.proj is not None:  # near-uniform gates at init: small weights, zero bias
            nn.init.normal_(self.proj.weight, std=0.01)
            nn.init.zeros_(self.proj.bias)

    @classmethod
    def from_config(cls, in_features: int, allowed: torch.Tensor, config: GateConfig) -> SoftmaxGates:
        return cls(in_features, allowed, config.temperature, config.dropout, config.hidden)

    def random_sources(self) -> list[str]:
        return ["gate dropout"] if self.dropout > 0 and not self.fixed else []

    def fixed_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each gate's one allowed expert at weight 1: ``[B, G, E]``, and no auxiliary loss."""
        weights = self.allowed.to(torch.float32).unsqueeze(0).expand(x.shape[-2], -1, -1)  # (B, G, E)
        return weights, torch.zeros((), dtype=torch.float32, device=x.device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The gate network's input to its projection, ``h(x)``."""
        hidden = self.hidden
        return hidden(x) if hidden is not None else x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Clean gate logits ``(W h + b) / temperature`` as ``[B, G, E]`` float32."""
        proj = self.proj
        assert proj is not None  # TorchScript: fixed gates return before this
        logits = proj(h).float().transpose(0, 1)  # (G, B, E) -> (B, G, E)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf where a gate may not use an expert."""
        return logits if self.all_allowed else logits.masked_fill(~self.allowed, float("-inf"))

    def drop(self, logits: torch.Tensor) -> torch.Tensor:
        """Gate dropout in training: -inf logits for dropped experts (at least one kept per row)."""
        if self.dropout > 0 and self.training:
            drop = (torch.rand_like(logits) < self.dropout) & torch.isfinite(logits)
            all_dropped = (drop | ~torch.isfinite(logits)).all(-1, keepdim=True)  # (B, G, 1)
            logits = logits.masked_fill(drop & ~all_dropped, float("-inf"))
        return logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fixed:
            return self.fixed_weights(x)
        logits = self.drop(self.mask(self.logits(self.features(x))))
        return softmax(logits), torch.zeros((), dtype=torch.float32, device=x.device)


@dataclass
class TopKGateConfig(GateConfig):
    """``topk`` gates: only the ``k`` largest gate logits enter the softmax (noisy top-k, Shazeer et al. 2017).

    Args:
        k: experts kept per row and gate.
        noisy: add learned, input-dependent Gaussian noise to the logits in training.
        load_balance_weight: weight of the importance + load balancing loss (:func:`load_balance_loss`).
    """

    type: str = "topk"
    k: int = 2
    noisy: bool = True
    load_balance_weight: float = 0.01

    def check(self, path: str) -> None:
        super().check(path)
        check(self.k >= 1, join(path, "k"), f"must be >= 1, got {self.k}")
        check(self.load_balance_weight >= 0, join(path, "load_balance_weight"), "must be >= 0")

    def check_in(self, model: ModelConfig, path: str) -> None:
        experts = model.experts_per_gate()
        check(self.k <= experts, join(path, "k"), f"k={self.k} exceeds the {experts} experts a gate chooses among")


@GATES.register("topk", TopKGateConfig)
class TopKGates(SoftmaxGates):
    """Noisy top-k gates (Shazeer et al. 2017): ``H = W h + eps * softplus(W_noise h)`` in training (``eps ~
    N(0, 1)``), only each row's ``k`` largest ``H`` enter the softmax. The auxiliary loss balances the experts:
    :func:`load_balance_loss` with noise, else ``weight * cv^2(importance)``. With ``k`` >= the number of
    experts it is a plain softmax gate.

    Example:
        >>> gates = TopKGates(16, torch.ones(2, 8, dtype=torch.bool), k=2)
        >>> w, aux = gates(torch.randn(4, 16))
        >>> int((w > 0).sum(-1).max()), aux.shape
        (2, torch.Size([]))
    """

    def __init__(
        self,
        in_features: int,
        allowed: torch.Tensor,
        k: int = 2,
        noisy: bool = True,
        load_balance_weight: float = 0.01,
        temperature: float = 1.0,
        dropout: float = 0.0,
        hidden: int = 0,
    ) -> None:
        super().__init__(in_features, allowed, temperature, dropout, hidden)
        self.top_k = int(k) if 0 < k < self.num_experts else 0
        self.noisy = bool(noisy) and self.top_k > 0
        self.load_balance_weight = float(load_balance_weight) if self.top_k else 0.0
        self.noise_proj = None
        if self.noisy and not self.fixed:  # zero at init: the noise starts at softplus(0) + 0.01
            self.noise_proj = StackedLinear(self.num_gates, self.proj_in, self.num_experts)
            nn.init.zeros_(self.noise_proj.weight)
            nn.init.zeros_(self.noise_proj.bias)

    @classmethod
    def from_config(cls, in_features: int, allowed: torch.Tensor, config: TopKGateConfig) -> TopKGates:
        return cls(
            in_features,
            allowed,
            config.k,
            config.noisy,
            config.load_balance_weight,
            config.temperature,
            config.dropout,
            config.hidden,
        )

    def random_sources(self) -> list[str]:
        return super().random_sources() + (["noisy top-k gates"] if self.noise_proj is not None else [])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fixed:
            return self.fixed_weights(x)
        h = self.features(x)
        clean = self.logits(h)  # (B, G, E)
        logits = clean
        noise_std: torch.Tensor | None = None
        noise_proj = self.noise_proj
        if noise_proj is not None and self.training:
            noise_std = F.softplus(noise_proj(h).float().transpose(0, 1)) + 1e-2  # (B, G, E)
            logits = clean + torch.randn_like(clean) * noise_std
        logits = self.mask(logits)
        aux_loss = torch.zeros((), dtype=torch.float32, device=x.device)
        if self.top_k > 0:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]  # (B, G, 1)
            keep = logits >= kth
            if noise_std is not None:
                aux_loss = self.load_balance_weight * load_balance_loss(
                    clean, logits, noise_std, keep, self.top_k, self.allowed
                )
            logits = logits.masked_fill(~keep, float("-inf"))
        weights = softmax(self.drop(logits))
        if self.top_k > 0 and noise_std is None:
            aux_loss = self.load_balance_weight * cv_squared(weights.sum(0)).sum()
        return weights, aux_loss


def load_balance_loss(
    clean: torch.Tensor,
    noisy: torch.Tensor,
    noise_std: torch.Tensor,
    keep: torch.Tensor,
    top_k: int,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Importance + load loss of noisy top-k gating (Shazeer et al. 2017, Appendix A), summed over gates.

    Per gate: ``Importance_e = sum_b softmax(topk(H_b))_e`` and ``Load_e = sum_b P(expert e kept for row b)``
    where ``P = Phi((clean_be - threshold_be) / noise_std_be)``; the threshold is the (k+1)-th largest noisy
    logit of the row for an expert in the top k, else the k-th (the value it must beat under fresh noise).
    Returns ``sum_gates cv^2(Importance) + cv^2(Load)`` (``cv^2 = var / mean^2``).

    Shapes: ``clean, noisy, noise_std [B, G, E]`` float, ``keep [B, G, E]`` bool (the top k), ``allowed [G, E]``
    -> ``[]``.
    """
    importance = torch.softmax(noisy.masked_fill(~keep, float("-inf")), -1).sum(0)  # (G, E)
    top = noisy.topk(min(top_k + 1, noisy.shape[-1]), dim=-1).values  # (B, G, k+1)
    threshold_in = top[..., -1:]  # if the expert is in the top-k, it must stay above the (k+1)-th value
    threshold_out = top[..., top_k - 1 : top_k]  # else it must beat the k-th value
    threshold = torch.where(keep, threshold_in, threshold_out)
    z = (clean - threshold) / noise_std
    prob = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))  # (B, G, E): Phi(z)
    load = (prob * allowed).sum(0)  # (G, E)
    return (cv_squared(importance) + cv_squared(load)).sum()


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, written out: on CPU, ``torch.softmax`` over a last dim of a few experts is
    ~3x slower (forward + backward). The max is a constant shift (softmax is shift-invariant), so detached."""
    shifted = (logits - logits.detach().amax(-1, keepdim=True)).exp()
    return shifted / shifted.sum(-1, keepdim=True)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation along the last dim: var / mean^2 (0 for a single expert)."""
    if x.shape[-1] <= 1:
        return x.new_zeros(x.shape[:-1])
    return x.var(-1) / (x.mean(-1) ** 2 + 1e-10)
