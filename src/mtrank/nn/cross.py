"""DCNv2 experts (Wang et al., 2021), as Pinterest used them inside MMoE: cross layers, then an MLP."""

from __future__ import annotations

import math

import torch
from torch import nn

from mtrank.nn.experts import StackedMLP


class StackedCross(nn.Module):
    """G independent DCNv2 cross networks computed together.

    ``x_{l+1} = x_0 * (x_l W_l + b_l) + x_l`` per group, with ``W_l`` full rank ``[d, d]`` or, with ``rank = r``,
    the low-rank ``U_l V_l`` (``[d, r] @ [r, d]``). Weights are stacked ``[G, d, d]`` (or ``[G, d, r]``,
    ``[G, r, d]``): one batched matmul per layer for all experts.

    Shapes: ``x_0 [B, d]`` or ``[G, B, d]`` -> ``[G, B, d]``.

    Example:
        >>> cross = StackedCross(groups=4, dim=10, layers=2)
        >>> cross(torch.randn(3, 10)).shape
        torch.Size([4, 3, 10])
    """

    def __init__(self, groups: int, dim: int, layers: int, rank: int = 0) -> None:
        super().__init__()
        self.groups, self.dim, self.rank, self.num_layers = groups, dim, rank, layers
        bound = 1.0 / math.sqrt(dim)
        if rank:  # low rank: W_l = U_l V_l
            self.u = nn.Parameter(torch.empty(layers, groups, dim, rank).uniform_(-bound, bound))
            v_bound = 1.0 / math.sqrt(rank)
            self.v = nn.Parameter(torch.empty(layers, groups, rank, dim).uniform_(-v_bound, v_bound))
            self.w = None
        else:
            self.w = nn.Parameter(torch.empty(layers, groups, dim, dim).uniform_(-bound, bound))
            self.u = self.v = None
        self.b = nn.Parameter(torch.zeros(layers, groups, 1, dim))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        if x0.dim() == 2:
            x0 = x0.expand(self.groups, -1, -1)  # (G, B, d)
        x = x0
        w, u, v = self.w, self.u, self.v
        for i in range(self.num_layers):
            if w is not None:
                proj = torch.baddbmm(self.b[i], x, w[i])  # (G, B, d)
            else:
                assert u is not None and v is not None
                proj = torch.baddbmm(self.b[i], torch.bmm(x, u[i]), v[i])  # (G, B, r) -> (G, B, d)
            x = x0 * proj + x
        return x


class StackedDCN(nn.Module):
    """G DCNv2 experts: cross network then MLP ("stacked" DCNv2). ``[B, in]`` or ``[G, B, in]`` -> ``[G, B, D]``."""

    def __init__(
        self,
        groups: int,
        in_features: int,
        hidden: list[int],
        cross_layers: int,
        cross_rank: int = 0,
        activation_name: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.cross = StackedCross(groups, in_features, cross_layers, cross_rank)
        self.deep = StackedMLP(groups, in_features, hidden, activation_name, dropout)
        self.groups = groups
        self.output_dim = self.deep.output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deep(self.cross(x))  # (G, B, d) -> (G, B, D)
