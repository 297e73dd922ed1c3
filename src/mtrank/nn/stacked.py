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


def bmm_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ weight + bias`` per group: ``[G, B, in] x [G, in, out] + [G, 1, out] -> [G, B, out]``, in the GEMM's
    output dtype (bf16 under autocast).

    ``bmm`` then the bias added, not ``baddbmm``: a ``baddbmm`` first copies the broadcast bias into its
    ``[G, B, out]`` output with a generic strided copy, which a compiled step keeps (three such copies were 2.7 ms
    of W3's 31.8 ms step on an H200: docs/results/scale-h200/explore2/) while it fuses a separate add into the next
    elementwise kernel. Eager on CPU the separate add costs W2's fp32 step a median 6% (5 interleaved pairs,
    noisy: docs/results/scale-cpu/bmm-bias/); one form for eager and compiled steps keeps their numbers equal."""
    y = torch.bmm(x, weight)
    return y + bias.to(y.dtype)


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
        return bmm_bias(x, self.weight, self.bias)  # (G, B, out)


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

    def forward(self, x: torch.Tensor, scales: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``scales``: optional ``[G, B, in_l]`` factors on each layer's input (PEPNet's PPNet gates)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if scales is not None:
                x = x * scales[i].to(x.dtype)
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


class StackedNorm(nn.Module):
    """G independent normalisations of ``[G, B, D]`` activations, each expert with its own affine ``[D]``.

    ``batch``: BatchNorm per expert and unit over the rows of the batch (``nn.BatchNorm1d`` per expert:
    momentum 0.1, eps 1e-5, running mean and unbiased running variance used in evaluation). ``layer``:
    LayerNorm over each expert's D units. Statistics in float32 (also under bf16 autocast); running
    statistics are updated in place on the device, so a CUDA-graphed step replays them.

    Example:
        >>> norm = StackedNorm(groups=3, width=4, kind="batch")
        >>> y = norm(torch.randn(3, 32, 4) * 5 + 2)
        >>> bool(y.mean(1).abs().max() < 1e-5), y.shape
        (True, torch.Size([3, 32, 4]))
    """

    def __init__(self, groups: int, width: int, kind: str = "batch", momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if kind not in ("batch", "layer"):
            raise ValueError(f"norm kind must be 'batch' or 'layer', got {kind!r}")
        self.batch, self.momentum, self.eps = kind == "batch", momentum, eps
        self.weight = nn.Parameter(torch.ones(groups, 1, width))
        self.bias = nn.Parameter(torch.zeros(groups, 1, width))
        self.register_buffer("running_mean", torch.zeros(groups, 1, width))
        self.register_buffer("running_var", torch.ones(groups, 1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if not self.batch:
            mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)  # (G, B, 1)
        elif self.training:
            mean, var = h.mean(1, keepdim=True), h.var(1, unbiased=False, keepdim=True)  # (G, 1, D)
            with torch.no_grad():
                rows = h.shape[1]
                unbiased = var * (rows / max(rows - 1, 1))
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased)
        else:
            mean, var = self.running_mean, self.running_var
        y = (h - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return y.to(x.dtype)
