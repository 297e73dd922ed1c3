"""Summarization layer (Pinterest Closeup): each group of feature tokens summarized into one token."""

from __future__ import annotations

import math

import torch
from torch import nn


class GroupSummary(nn.Module):
    """Summarizes each group of feature tokens (e.g. user, item, context) into one token, so a transformer
    mixer after it costs ``O(G^2)`` in the number of groups, not ``O(T^2)`` in the number of tokens.

    Group ``g`` holds the tokens ``x_i, i in S_g`` (``[B, D]`` each). Two summaries:

    * ``attention`` (attention pooling with one learned query ``q_g`` per group)::

        a_gi = softmax_{i in S_g}( q_g . W_k x_i / sqrt(D) ),   s_g = sum_{i in S_g} a_gi W_v x_i

    * ``mlp`` (a small MLP per group over its concatenated tokens, zero-padded to the largest group)::

        s_g = W2_g relu( W1_g [x_i for i in S_g] + b1_g ) + b2_g

    Groups are given as lists of token indices; they are padded to the largest group with a masked index, and a
    padded slot never changes a summary (its attention weight is exactly 0; its MLP input is exactly 0).

    Shapes: ``tokens [B, T, D]`` -> ``[B, G, D]``.

    The base class holds the groups; :class:`AttentionSummary` and :class:`MLPSummary` summarize.

    Example:
        >>> summary = AttentionSummary([[0, 1], [2]], dim=4)
        >>> summary(torch.randn(3, 3, 4)).shape
        torch.Size([3, 2, 4])
    """

    def __init__(self, groups: list[list[int]], dim: int) -> None:
        super().__init__()
        width = max(len(g) for g in groups)
        index = torch.tensor([g + [0] * (width - len(g)) for g in groups], dtype=torch.long)  # (G, N)
        valid = torch.tensor([[True] * len(g) + [False] * (width - len(g)) for g in groups])  # (G, N)
        self.register_buffer("index", index)
        self.register_buffer("valid", valid)
        self.num_groups, self.width, self.dim = len(groups), width, dim


class AttentionSummary(GroupSummary):
    """Attention pooling with one learned query per group (see :class:`GroupSummary`)."""

    def __init__(self, groups: list[list[int]], dim: int) -> None:
        super().__init__(groups, dim)
        self.query = nn.Parameter(torch.randn(len(groups), dim) / math.sqrt(dim))  # (G, D)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        grouped = tokens[:, self.index]  # (B, G, N, D)
        scores = torch.einsum("bgnd,gd->bgn", self.key(grouped), self.query.to(tokens.dtype)) / math.sqrt(self.dim)
        weights = torch.softmax(scores.masked_fill(~self.valid.unsqueeze(0), float("-inf")), dim=-1)  # (B, G, N)
        return torch.einsum("bgn,bgnd->bgd", weights, self.value(grouped))  # (B, G, D)


class MLPSummary(GroupSummary):
    """A small MLP per group over its concatenated (zero-padded) tokens (see :class:`GroupSummary`)."""

    def __init__(self, groups: list[list[int]], dim: int) -> None:
        super().__init__(groups, dim)
        count = len(groups)
        self.w1 = nn.Parameter(torch.randn(count, self.width * dim, dim) / math.sqrt(self.width * dim))  # (G, N*D, D)
        self.b1 = nn.Parameter(torch.zeros(count, dim))
        self.w2 = nn.Parameter(torch.randn(count, dim, dim) / math.sqrt(dim))  # (G, D, D)
        self.b2 = nn.Parameter(torch.zeros(count, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = self.valid.unsqueeze(0).unsqueeze(-1).to(tokens.dtype)  # (1, G, N, 1)
        flat = (tokens[:, self.index] * keep).reshape(tokens.shape[0], self.num_groups, -1)  # (B, G, N*D)
        dtype = tokens.dtype
        hidden = torch.relu(torch.einsum("bgi,gio->bgo", flat, self.w1.to(dtype)) + self.b1.to(dtype))
        return torch.einsum("bgi,gio->bgo", hidden, self.w2.to(dtype)) + self.b2.to(dtype)  # (B, G, D)


SUMMARIES = {"attention": AttentionSummary, "mlp": MLPSummary}
