"""Expert types: G experts computed together (one batched matmul per layer), registered by name.

The contract of an expert type (what :class:`~mtrank.nn.block.ExtractionLevel` needs), for the built-in ones
and for any registered from outside the package with ``@EXPERTS.register(name, config_class)``:

* ``from_config(groups, in_features, config) -> module``: G experts reading ``in_features``; ``config`` is the
  type's config class (:class:`~mtrank.config.ExpertConfig` or a subclass adding options);
* ``module(x)``: ``x [B, in]`` (one input shared by every expert) or ``[G, B, in]`` (expert g reads ``x[g]``)
  ``-> [G, B, D]``; ``module.output_dim == D``;
* optional ``linear_banks() -> [(layers, reads_block_input)]``: the :class:`~mtrank.nn.stacked.StackedLinear`
  layers that reduced-precision inference may rewrite, and whether the first of them reads the expert's
  input itself (one GEMM for every expert when that input is shared);
* optional ``random_sources() -> [str]``: what it draws at random in training (beyond ``nn.Dropout``).

``mlp``: :class:`MLPExperts`. ``dcn``: :class:`DCNExperts`, DCNv2 cross layers then an MLP (Wang et al.
2021), Pinterest's experts inside MMoE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mtrank.config.base import check, join
from mtrank.config.model import EXPERTS, ExpertConfig
from mtrank.nn.stacked import StackedMLP


@EXPERTS.register("mlp", ExpertConfig)
class MLPExperts(StackedMLP):
    """G MLP experts (``config.hidden`` widths, an activation and dropout after every layer).

    Example:
        >>> experts = MLPExperts.from_config(8, 100, ExpertConfig(hidden=[16]))
        >>> experts(torch.randn(32, 100)).shape
        torch.Size([8, 32, 16])
    """

    @classmethod
    def from_config(cls, groups: int, in_features: int, config: ExpertConfig) -> MLPExperts:
        return cls(groups, in_features, config.hidden, config.activation, config.dropout)

    def linear_banks(self) -> list[tuple[nn.ModuleList, bool]]:
        return [(self.layers, True)]


@dataclass
class DCNExpertConfig(ExpertConfig):
    """``dcn`` experts: ``cross_layers`` DCNv2 cross layers of rank ``cross_rank`` (0 = full ``[d, d]``),
    then the MLP of ``hidden``."""

    type: str = "dcn"
    cross_layers: int = 2
    cross_rank: int = 0

    def check(self, path: str) -> None:
        super().check(path)
        check(self.cross_layers >= 1, join(path, "cross_layers"), f"must be >= 1, got {self.cross_layers}")
        check(self.cross_rank >= 0, join(path, "cross_rank"), f"must be >= 0, got {self.cross_rank}")


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
                assert u is not None and v is not None  # TorchScript: narrows the Optional
                proj = torch.baddbmm(self.b[i], torch.bmm(x, u[i]), v[i])  # (G, B, r) -> (G, B, d)
            x = x0 * proj + x
        return x


@EXPERTS.register("dcn", DCNExpertConfig)
class DCNExperts(nn.Module):
    """G DCNv2 experts: cross network then MLP ("stacked" DCNv2). ``[B, in]`` or ``[G, B, in]`` -> ``[G, B, D]``.

    Args:
        cross: the G cross networks.
        deep: the G MLPs on the cross networks' outputs.

    Example:
        >>> experts = DCNExperts.from_config(4, 10, DCNExpertConfig(hidden=[8], cross_rank=2))
        >>> experts(torch.randn(3, 10)).shape
        torch.Size([4, 3, 8])
    """

    def __init__(self, cross: StackedCross, deep: StackedMLP) -> None:
        super().__init__()
        self.cross, self.deep = cross, deep
        self.groups = deep.groups
        self.output_dim = deep.output_dim

    @classmethod
    def from_config(cls, groups: int, in_features: int, config: DCNExpertConfig) -> DCNExperts:
        cross = StackedCross(groups, in_features, config.cross_layers, config.cross_rank)
        return cls(cross, StackedMLP(groups, in_features, config.hidden, config.activation, config.dropout))

    def linear_banks(self) -> list[tuple[nn.ModuleList, bool]]:
        return [(self.deep.layers, False)]  # the MLP reads the cross network's per-expert output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deep(self.cross(x))  # (G, B, d) -> (G, B, D)
