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
2021), Pinterest's experts inside MMoE. ``home``: :class:`HoMEExperts`, HoME's normalised Swish experts with
an optional feature gate (Wang et al. 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mtrank.config.base import check, join
from mtrank.config.model import EXPERTS, Activation, ExpertConfig
from mtrank.nn.stacked import StackedLinear, StackedMLP, StackedNorm, activation, bmm_bias


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
                proj = bmm_bias(x, w[i], self.b[i])  # (G, B, d)
            else:
                assert u is not None and v is not None  # TorchScript: narrows the Optional
                proj = bmm_bias(torch.bmm(x, u[i]), v[i], self.b[i])  # (G, B, r) -> (G, B, d)
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


@dataclass
class HoMEExpertConfig(ExpertConfig):
    """``home`` experts: every layer linear -> normalisation -> Swish (HoME's expert normalisation), and an
    optional feature gate per expert.

    Args:
        norm: ``batch`` (the paper's BatchNorm) or ``layer`` (LayerNorm: no batch statistics, for tiny batches).
        feature_gate_rank: rank r of each expert's feature gate ``2 sigmoid(x B_e A_e)`` on its input; 0 = none.
    """

    type: str = "home"
    activation: Activation = "silu"
    norm: Literal["batch", "layer"] = "batch"
    feature_gate_rank: int = 0

    def check(self, path: str) -> None:
        super().check(path)
        rank = self.feature_gate_rank
        check(rank >= 0, join(path, "feature_gate_rank"), f"must be >= 0, got {rank}")


@EXPERTS.register("home", HoMEExpertConfig)
class HoMEExperts(nn.Module):
    """HoME's experts (Wang et al., "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at
    Kuaishou", 2024): ``E_e(x) = Swish(Norm_e(W_e x_e + b_e))`` per layer, so every expert's output has the
    same scale (against expert collapse: ReLU experts with 90% zeros and far smaller outputs than the rest).

    Feature gate (the paper's Fea_Gate, LoRA-shaped): each expert reads its own view of the input,
    ``x_e = x * 2 sigmoid(x B_e A_e)`` with ``B_e [in, r]``, ``A_e [r, in]``; ``A_e`` starts at zero, so every
    gate starts at 1 (the plain input).

    Shapes: ``[B, in]`` or ``[G, B, in]`` -> ``[G, B, D]``.

    Example:
        >>> experts = HoMEExperts.from_config(4, 10, HoMEExpertConfig(hidden=[8], feature_gate_rank=2))
        >>> experts(torch.randn(16, 10)).shape
        torch.Size([4, 16, 8])
    """

    def __init__(
        self,
        groups: int,
        in_features: int,
        hidden: list[int],
        norm: str = "batch",
        activation_name: str = "silu",
        dropout: float = 0.0,
        feature_gate_rank: int = 0,
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        self.layers = nn.ModuleList(StackedLinear(groups, a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(StackedNorm(groups, width, norm) for width in hidden)
        self.act = activation(activation_name)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.groups, self.in_features, self.output_dim = groups, in_features, widths[-1]
        self.gate_down = self.gate_up = None
        if feature_gate_rank:
            bound = 1.0 / math.sqrt(in_features)
            self.gate_down = nn.Parameter(torch.empty(groups, in_features, feature_gate_rank).uniform_(-bound, bound))
            self.gate_up = nn.Parameter(torch.zeros(groups, feature_gate_rank, in_features))

    @classmethod
    def from_config(cls, groups: int, in_features: int, config: HoMEExpertConfig) -> HoMEExperts:
        return cls(
            groups,
            in_features,
            config.hidden,
            config.norm,
            config.activation,
            config.dropout,
            config.feature_gate_rank,
        )

    def linear_banks(self) -> list[tuple[nn.ModuleList, bool]]:
        return [(self.layers, self.gate_down is None)]  # with feature gates, each expert reads its own input

    def feature_gate(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert's gated view of the input: ``[B, in]`` or ``[G, B, in]`` -> ``[G, B, in]``."""
        down, up = self.gate_down, self.gate_up
        assert down is not None and up is not None  # TorchScript: called only with feature gates
        if x.dim() == 2:
            low = (x @ down.permute(1, 0, 2).reshape(self.in_features, -1)).view(x.shape[0], self.groups, -1)
            low = low.transpose(0, 1)  # (G, B, r): one GEMM for every expert's B_e
            x = x.unsqueeze(0)  # (1, B, in)
        else:
            low = torch.bmm(x, down.to(x.dtype))  # (G, B, r)
        return x * (2.0 * torch.sigmoid(torch.bmm(low, up.to(low.dtype))))  # (G, B, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_down is not None:
            x = self.feature_gate(x)
        for layer, norm in zip(self.layers, self.norms):
            x = self.dropout(self.act(norm(layer(x))))
        return x
