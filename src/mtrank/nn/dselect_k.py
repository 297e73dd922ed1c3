"""DSelect-k gates (Hazimeh et al., NeurIPS 2021): differentiable k-sparse selection of experts (``dselect_k``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtrank.config.base import check, join
from mtrank.config.model import GATES, GateConfig, ModelConfig
from mtrank.nn.gates import SoftmaxGates, softmax


@dataclass
class DSelectKGateConfig(GateConfig):
    """``dselect_k`` gates: each gate mixes at most ``k`` experts, chosen by ``k`` differentiable selectors.

    Args:
        k: selectors per gate (at most k experts get a nonzero weight once the selectors have converged).
        gamma: width of the smooth-step's polynomial region (the reference's default, 1).
        entropy_weight: weight of the selectors' entropy, the regulariser that drives each selector to one
            expert; averaged over rows (the reference sums over the batch: its 1e-6 is ours 1e-6 x batch).
    """

    type: str = "dselect_k"
    k: int = 2
    gamma: float = 1.0
    entropy_weight: float = 1e-3

    def check(self, path: str) -> None:
        super().check(path)
        check(self.k >= 1, join(path, "k"), f"must be >= 1, got {self.k}")
        check(self.gamma > 0, join(path, "gamma"), f"must be > 0, got {self.gamma}")
        check(self.entropy_weight >= 0, join(path, "entropy_weight"), f"must be >= 0, got {self.entropy_weight}")
        check(self.temperature == 1.0, join(path, "temperature"), "DSelect-k gates have no temperature; remove it")
        check(self.dropout == 0.0, join(path, "dropout"), "gate dropout is for softmax gates; remove it (DSelect-k)")

    def check_in(self, model: ModelConfig, path: str) -> None:
        experts = model.experts_per_gate()
        check(self.k <= experts, join(path, "k"), f"k={self.k} exceeds the {experts} experts a gate chooses among")


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """``S(t) = 0`` for ``t <= -gamma/2``, ``1`` for ``t >= gamma/2``, else ``-2 t^3 / gamma^3 + 3 t / (2 gamma)
    + 1/2`` (Hazimeh et al. 2020). The cubic meets 0 and 1 at the ends with zero slope, so ``S`` is the cubic
    of ``t`` clamped to ``[-gamma/2, gamma/2]``: one expression, no branches."""
    t = t.clamp(-gamma / 2, gamma / 2)
    return (-2.0 / gamma**3) * t**3 + (3.0 / (2.0 * gamma)) * t + 0.5


@GATES.register("dselect_k", DSelectKGateConfig)
class DSelectKGates(SoftmaxGates):
    """DSelect-k gates (Hazimeh et al., "DSelect-k: Differentiable Selection in the Mixture of Experts with
    Applications to Multi-Task Learning", NeurIPS 2021), example-conditioned, one per task.

    Gate g over its ``n`` allowed experts uses ``m = ceil(log2 n)`` bits. Each of ``k`` single-expert selectors
    ``i`` has logits ``z_i = Z_i h(x)`` in ``R^m``, and gives expert ``j`` (the j-th allowed one, binary code
    ``b(j)``, most significant bit first) the weight

        ``r_i(x)_j = prod_l ( S(z_il) if b(j)_l = 1 else 1 - S(z_il) )``,

    a product of smooth steps that is exactly one-hot once every ``|z_il| >= gamma/2``. The gate is
    ``w(x) = sum_i softmax(A h(x))_i r_i(x)``: at most k nonzero weights at convergence, differentiable
    throughout. All gates' selectors come from one stacked projection (``k m + k`` outputs per gate).

    Auxiliary loss (float32): ``entropy_weight * mean_rows sum_{g,i} H(r_gi)`` with ``H(r) = -sum_j r_j
    log(r_j + 1e-6)`` (the reference's entropy regulariser), plus, for a gate whose ``n`` is not a power of two,
    ``mean_rows sum_i (1 / sum_j r_ij - 1)`` (the reference's term that keeps selectors off the unreachable codes
    ``n .. 2^m - 1``; minus 1, so it is 0 once they are). Until then a gate's weights sum to less than 1.

    Initialisation as the reference: selector logits' weights and bias uniform in ``+-gamma/100`` (every
    ``S`` near 1/2: all experts near ``1/2^m``), selector-weight logits uniform in ``+-0.05``.

    Shapes: ``x [B, in]`` or ``[G, B, in]`` -> ``weights [B, G, E]`` (float32), ``aux_loss []``.

    Example:
        >>> gates = DSelectKGates(16, torch.ones(2, 8, dtype=torch.bool), k=2)
        >>> w, aux = gates(torch.randn(4, 16))
        >>> w.shape, bool(torch.allclose(w.sum(-1), torch.ones(4, 2))), aux.shape
        (torch.Size([4, 2, 8]), True, torch.Size([]))
    """

    def __init__(
        self,
        in_features: int,
        allowed: torch.Tensor,
        k: int = 2,
        gamma: float = 1.0,
        entropy_weight: float = 1e-3,
        hidden: int = 0,
    ) -> None:
        counts = allowed.sum(1)  # (G,) experts each gate chooses among
        gate_bits = torch.tensor([math.ceil(math.log2(n)) if n > 1 else 0 for n in counts.tolist()])
        bits = max(int(gate_bits.max()), 1)
        super().__init__(in_features, allowed, hidden=hidden, proj_out=k * bits + k)
        self.k, self.bits, self.gamma, self.entropy_weight = int(k), bits, float(gamma), float(entropy_weight)
        # codes[g, e, l]: bit l (most significant first, of gate g's m_g bits) of expert e's rank among the
        # experts gate g may use; bits beyond m_g are unused (their factor is 1)
        rank = allowed.long().cumsum(1) - 1  # (G, E)
        shift = (gate_bits.view(-1, 1, 1) - 1 - torch.arange(bits).view(1, 1, -1)).clamp_min(0)  # (G, 1, M)
        codes = ((rank.unsqueeze(-1) >> shift) & 1).bool()  # (G, E, M)
        self.register_buffer("codes", codes.unsqueeze(1))  # (G, 1, E, M)
        used = torch.arange(bits).view(1, -1) < gate_bits.view(-1, 1)  # (G, M)
        self.register_buffer("used_bits", used.view(-1, 1, 1, bits))  # (G, 1, 1, M)
        self.register_buffer("allowed_weights", allowed.float().unsqueeze(1))  # (G, 1, E)
        unreachable = (counts > 1) & (counts != 2**gate_bits)  # (G,): 2^m codes, fewer experts
        self.register_buffer("unreachable", unreachable.float())  # (G,)
        if self.proj is not None:
            z_width = self.k * bits
            with torch.no_grad():
                self.proj.weight[..., :z_width].uniform_(-gamma / 100, gamma / 100)
                self.proj.bias[..., :z_width].uniform_(-gamma / 100, gamma / 100)
                self.proj.weight[..., z_width:].uniform_(-0.05, 0.05)
                self.proj.bias[..., z_width:].uniform_(-0.05, 0.05)

    @classmethod
    def from_config(cls, in_features: int, allowed: torch.Tensor, config: DSelectKGateConfig) -> DSelectKGates:
        return cls(in_features, allowed, config.k, config.gamma, config.entropy_weight, config.hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fixed:
            return self.fixed_weights(x)
        weights, selectors = self.selectors(x)
        aux_loss = self.entropy_weight * entropy(selectors).sum(-1).mean(0).sum()
        reach = selectors.sum(-1).clamp_min(1e-6)  # (B, G, k): weight the selector puts on real experts
        aux_loss = aux_loss + ((1.0 / reach - 1.0).sum(-1).mean(0) * self.unreachable).sum()
        return weights, aux_loss

    def selectors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate weights ``[B, G, E]`` and every single-expert selector's weights ``r [B, G, k, E]``."""
        proj = self.proj
        assert proj is not None  # TorchScript: fixed gates return before this
        out = proj(self.features(x)).float().transpose(0, 1)  # (G, B, k*M + k) -> (B, G, k*M + k)
        batch, gates = out.shape[0], out.shape[1]
        z_width = self.k * self.bits
        step = smooth_step(out[..., :z_width], self.gamma).reshape(batch, gates, self.k, 1, self.bits)  # (B,G,k,1,M)
        factors = torch.where(self.codes, step, 1.0 - step)  # (B, G, k, E, M)
        factors = torch.where(self.used_bits, factors, torch.ones_like(factors))
        # a product of the M factors by multiplication: prod()'s backward looks for zeros on the host (a sync
        # that a CUDA graph capture cannot hold), and a selector's factors are exactly 0 once it has converged
        selectors = factors[..., 0]
        for bit in range(1, self.bits):
            selectors = selectors * factors[..., bit]
        selectors = selectors * self.allowed_weights  # (B, G, k, E)
        selector_weights = softmax(out[..., z_width:])  # (B, G, k)
        weights = (selector_weights.unsqueeze(-1) * selectors).sum(2)  # (B, G, E)
        return weights, selectors


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """``-sum_j w_j log(w_j + 1e-6)`` over the last dim (DSelect-k's regulariser; 0 for a one-hot row)."""
    return -(weights * torch.log(weights + 1e-6)).sum(-1)
