"""Stacked MLPs: G independent MLPs computed together from ``[G, in, out]`` weights.

The same module serves as the expert bank (G = experts, all reading the same input) and as the task towers
(G = tasks, each reading its own input): one batched matmul per layer, no Python loop over experts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


class StackedLinear(nn.Module):
    """G linear layers in one op: ``y[g] = x[g] @ W[g] + b[g]``.

    Shapes: ``x [B, in]`` (shared input, every group reads it) or ``[G, B, in]`` -> ``[G, B, out]``.
    A shared input is one GEMM against the ``[in, G*out]`` view of the weights; a per-group input is one ``bmm``.

    Initialisation: each group is drawn independently, uniform(+-1/sqrt(in)) (PyTorch's Linear default), so
    experts differ from each other at init.

    Example:
        >>> layer = StackedLinear(groups=8, in_features=100, out_features=16)
        >>> layer(torch.randn(32, 100)).shape
        torch.Size([8, 32, 16])
    """

    def __init__(self, groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            # one GEMM for all groups: (B, in) @ (in, G*out)
            weight = self.weight.permute(1, 0, 2).reshape(self.in_features, -1)  # (in, G*out)
            y = (x @ weight).view(x.shape[0], self.groups, self.out_features)  # (B, G, out)
            # contiguous (G, B, out): the next layer's bmm and its backward read it without copies; the bias
            # is added in the compute dtype, so bf16 autocast keeps activations bf16 (2x faster on CPU)
            y = y.transpose(0, 1).contiguous()  # (G, B, out)
            return y + self.bias.to(y.dtype)
        return torch.baddbmm(self.bias.to(x.dtype), x, self.weight)  # (G, B, out)


class StackedMLP(nn.Module):
    """G independent MLPs, layer widths ``hidden``, computed together.

    ``y[g] = act(... act(x[g] W1[g] + b1[g]) ... ) `` with an activation (and optional dropout) after every
    layer, or after all but the last when ``final_activation`` is False (towers end in a plain linear layer).

    Shapes: ``[B, in]`` or ``[G, B, in]`` -> ``[G, B, hidden[-1]]``.

    Example:
        >>> experts = StackedMLP(groups=8, in_features=100, hidden=[16])
        >>> experts(torch.randn(32, 100)).shape
        torch.Size([8, 32, 16])
    """

    def __init__(
        self,
        groups: int,
        in_features: int,
        hidden: list[int],
        activation_name: str = "relu",
        dropout: float = 0.0,
        final_activation: bool = True,
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        self.layers = nn.ModuleList(StackedLinear(groups, a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = activation(activation_name)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.final_activation = final_activation
        self.groups = groups
        self.output_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last or self.final_activation:
                x = self.dropout(self.act(x))
        return x


class MLP(nn.Module):
    """A plain MLP (used for shared hidden layers and gate networks). ``[B, in] -> [B, hidden[-1]]``."""

    def __init__(self, in_features: int, hidden: list[int], activation_name: str = "relu", dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, width), activation(activation_name)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = width
        self.net = nn.Sequential(*layers)
        self.output_dim = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
