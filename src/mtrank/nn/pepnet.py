"""PEPNet (Chang et al., KDD 2023): gates that personalise the embedding layer (EPNet) and the towers (PPNet)."""

from __future__ import annotations

import torch
from torch import nn


class GateNU(nn.Module):
    """PEPNet's gate neural unit: ``delta = gamma * sigmoid(W' relu(W x + b) + b')``, in ``(0, gamma)``.

    With ``gamma = 2`` a gate can halve or double what it scales and starts near 1 (the identity).

    Shapes: ``[B, in] -> [B, out]``.

    Example:
        >>> delta = GateNU(6, hidden=4, out_features=3)(torch.randn(5, 6))
        >>> delta.shape, bool(((delta > 0) & (delta < 2)).all())
        (torch.Size([5, 3]), True)
    """

    def __init__(self, in_features: int, hidden: int, out_features: int, scale: float = 2.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid(self.net(x))


class EPNet(nn.Module):
    """Embedding personalisation: ``O_ep = delta_domain * E`` with ``delta_domain = GateNU(E(F_d) ++ sg(E))``.

    ``E`` is the general input (the block input: dense features and every embedding), ``E(F_d)`` the
    embeddings of the chosen domain-side features (e.g. scenario id), ``sg`` a stop-gradient: the gate learns
    from the domain features without pulling on the general embeddings through its own input.

    Shapes: ``tokens [B, F, D]`` (every feature's embedding; ``domain_tokens`` picks ``F_d`` of them),
    ``general [B, in]`` -> ``[B, in]``.
    """

    def __init__(self, domain_tokens: torch.Tensor, dim: int, general_features: int, hidden: int, scale: float):
        super().__init__()
        self.register_buffer("domain_tokens", domain_tokens.clone())
        self.gate = GateNU(domain_tokens.numel() * dim + general_features, hidden, general_features, scale)

    def forward(self, tokens: torch.Tensor, general: torch.Tensor) -> torch.Tensor:
        domain = tokens.index_select(1, self.domain_tokens).flatten(1)  # (B, F_d * D)
        return self.gate(torch.cat([domain, general.detach()], 1)) * general


class PPNet(nn.Module):
    """Parameter personalisation: every task tower's layer l reads ``delta_l^k * H_l^k``, with
    ``[delta_l^1 .. delta_l^K] = GateNU_l(E(F_prior) ++ sg(O_ep))`` (one gate unit per layer, split per task).

    ``E(F_prior)`` are the embeddings of the chosen personal features (e.g. user, item, author ids), ``O_ep``
    the general input (after EPNet, if any). The towers apply the scales
    (:meth:`mtrank.nn.stacked.StackedMLP.forward`'s ``scales``).

    Shapes: ``tokens [B, F, D]`` (``prior_tokens`` picks ``F_p`` of them), ``general [B, in]`` -> one
    ``[K, B, in_l]`` per tower layer.
    """

    def __init__(
        self,
        prior_tokens: torch.Tensor,
        dim: int,
        general_features: int,
        layer_inputs: list[int],
        num_tasks: int,
        hidden: int,
        scale: float,
    ) -> None:
        super().__init__()
        self.register_buffer("prior_tokens", prior_tokens.clone())
        width = prior_tokens.numel() * dim + general_features
        self.gates = nn.ModuleList(GateNU(width, hidden, num_tasks * n, scale) for n in layer_inputs)
        self.num_tasks = num_tasks

    def forward(self, tokens: torch.Tensor, general: torch.Tensor) -> list[torch.Tensor]:
        prior = tokens.index_select(1, self.prior_tokens).flatten(1)  # (B, F_p * D)
        gate_input = torch.cat([prior, general.detach()], 1)  # (B, F_p * D + in)
        scales: list[torch.Tensor] = []
        for gate in self.gates:
            delta = gate(gate_input)  # (B, K * in_l)
            scales.append(delta.view(delta.shape[0], self.num_tasks, -1).transpose(0, 1))  # (K, B, in_l)
        return scales
