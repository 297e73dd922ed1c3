"""Task gates: each task's softmax over the experts it may use, all tasks from one projection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtrank.config import GateConfig
from mtrank.nn.experts import StackedLinear, StackedMLP


class TaskGates(nn.Module):
    """G softmax gates over E experts, all computed by one stacked projection ``[G, in, E]``.

    ``g_k(x) = softmax((W_k x + b_k) / temperature)`` restricted to the experts in ``allowed[k]``
    (others get weight 0). A gate with a single allowed expert is fixed at weight 1 and has no parameters, which
    is how Shared-Bottom and Single-task are expressed as gated blocks.

    Training-time options (all off at evaluation):
      * gate dropout: each allowed expert's weight is dropped with probability ``dropout`` and the rest
        renormalised (done as -inf logits before the softmax; a row whose allowed experts are all dropped keeps
        them all);
      * noisy top-k (Shazeer et al. 2017): ``H = Wx + eps * softplus(W_noise x)``, only the k largest ``H`` enter
        the softmax; the auxiliary importance + load loss is returned for balancing.

    Softmax and the balancing loss run in float32 (also under bf16 autocast).

    Shapes: ``x [B, in]`` (every gate reads the same input: one GEMM) or ``[G, B, in]`` (gate g reads ``x[g]``,
    as in PLE's upper levels) -> ``weights [B, G, E]`` (float32), ``aux_loss []``.

    Args:
        in_features: input width.
        allowed: bool ``[G, E]``, which experts each gate may use.
        config: temperature, dropout, top-k settings, see :class:`mtrank.config.GateConfig`.

    Example:
        >>> gates = TaskGates(100, torch.ones(2, 8, dtype=torch.bool), GateConfig())
        >>> w, aux = gates(torch.randn(4, 100))
        >>> w.shape, bool(torch.allclose(w.sum(-1), torch.ones(4, 2)))
        (torch.Size([4, 2, 8]), True)
    """

    def __init__(self, in_features: int, allowed: torch.Tensor, config: GateConfig) -> None:
        super().__init__()
        self.num_gates, self.num_experts = allowed.shape
        self.register_buffer("allowed", allowed.clone())
        self.fixed = bool((allowed.sum(1) == 1).all())
        self.all_allowed = bool(allowed.all())  # OMoE / MMoE: no -inf mask needed (saves two ops per step)
        self.temperature = float(config.temperature)
        self.dropout = float(config.dropout)
        self.top_k = int(config.top_k) if 0 < config.top_k < self.num_experts else 0
        self.noisy = bool(config.noisy) and self.top_k > 0
        self.load_balance_weight = float(config.load_balance_weight) if self.top_k else 0.0
        g = self.num_gates
        proj_in = config.hidden or in_features
        # a fixed gate (one allowed expert per gate) has no parameters at all
        self.hidden = StackedMLP(g, in_features, [config.hidden]) if config.hidden and not self.fixed else None
        self.proj = None if self.fixed else StackedLinear(g, proj_in, self.num_experts)
        self.noise_proj = StackedLinear(g, proj_in, self.num_experts) if self.noisy and not self.fixed else None
        if self.proj is not None:  # near-uniform gates at init: small weights, zero bias
            nn.init.normal_(self.proj.weight, std=0.01)
            nn.init.zeros_(self.proj.bias)
        if self.noise_proj is not None:
            nn.init.zeros_(self.noise_proj.weight)
            nn.init.zeros_(self.noise_proj.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[-2]
        proj = self.proj
        if proj is None:
            weights = self.allowed.to(torch.float32).unsqueeze(0).expand(batch, -1, -1)  # (B, G, E)
            return weights, torch.zeros((), dtype=torch.float32, device=x.device)
        hidden = self.hidden
        h = hidden(x) if hidden is not None else x
        logits = proj(h).float().transpose(0, 1)  # (G, B, E) -> (B, G, E)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        aux_loss = torch.zeros((), dtype=torch.float32, device=x.device)
        noise_std: torch.Tensor | None = None
        clean = logits
        noise_proj = self.noise_proj
        if noise_proj is not None and self.training:
            std = F.softplus(noise_proj(h).float().transpose(0, 1)) + 1e-2
            logits = logits + torch.randn_like(logits) * std
            noise_std = std
        if not self.all_allowed:
            logits = logits.masked_fill(~self.allowed, float("-inf"))  # (B, G, E)
        if self.top_k > 0:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]  # (B, G, 1)
            keep = logits >= kth
            if noise_std is not None:
                aux_loss = self._load_balance_loss(clean, logits, noise_std, keep)
            logits = logits.masked_fill(~keep, float("-inf"))
        if self.dropout > 0 and self.training:
            drop = (torch.rand_like(logits) < self.dropout) & torch.isfinite(logits)
            all_dropped = (drop | ~torch.isfinite(logits)).all(-1, keepdim=True)  # (B, G, 1)
            logits = logits.masked_fill(drop & ~all_dropped, float("-inf"))
        weights = _softmax(logits)
        if self.top_k > 0 and noise_std is None:
            aux_loss = self.load_balance_weight * _cv_squared(weights.sum(0)).sum()
        return weights, aux_loss

    def _load_balance_loss(
        self, clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Importance + load loss of Shazeer et al. (2017), per gate, summed over gates."""
        importance = torch.softmax(noisy.masked_fill(~keep, float("-inf")), -1).sum(0)  # (G, E)
        top = noisy.topk(min(self.top_k + 1, self.num_experts), dim=-1).values  # (B, G, k+1)
        threshold_in = top[..., -1:]  # if expert is in the top-k, it must stay above the (k+1)-th value
        threshold_out = top[..., self.top_k - 1 : self.top_k]  # else it must beat the k-th value
        threshold = torch.where(keep, threshold_in, threshold_out)
        z = (clean - threshold) / noise_std
        prob = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))  # (B, G, E): Phi(z), P(expert kept under new noise)
        load = (prob * self.allowed).sum(0)  # (G, E)
        return self.load_balance_weight * (_cv_squared(importance) + _cv_squared(load)).sum()


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, written out: on CPU, ``torch.softmax`` over a last dim of a few experts is
    ~3x slower (forward + backward). The max is a constant shift (softmax is shift-invariant), so detached."""
    shifted = (logits - logits.detach().amax(-1, keepdim=True)).exp()
    return shifted / shifted.sum(-1, keepdim=True)


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation along the last dim: var / mean^2 (0 for a single expert)."""
    if x.shape[-1] <= 1:
        return x.new_zeros(x.shape[:-1])
    return x.var(-1) / (x.mean(-1) ** 2 + 1e-10)
