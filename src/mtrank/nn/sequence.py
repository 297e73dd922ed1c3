"""User action sequences: a row's recent items (and the action on each) -> one token, by a small transformer
encoder and/or target attention from the candidate item (DIN, Zhou et al., KDD 2018; BST, Chen et al., 2019)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mtrank.config.model import SequenceConfig


class SequenceLayer(nn.Module):
    """One pre-norm transformer layer over a padded sequence (padded keys masked out):

        h = x + MHA(LN(x), mask),   out = h + W2 relu(W1 LN(h))

    Written out (not ``nn.TransformerEncoderLayer``), so that the masked path is the one that is traced,
    scripted and exported: the built-in layer switches to a fused kernel in evaluation mode.

    Shapes: ``x [B, L, D]``, ``valid [B, L]`` (bool) -> ``[B, L, D]``.

    Example:
        >>> layer = SequenceLayer(8, heads=2)
        >>> layer(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (3,B,H,L,d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)  # (B, H, L, L)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        mixed = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, length, dim)  # (B, L, D)
        h = x + self.out(mixed)
        return h + self.ffn(self.norm2(h))


class SequenceEncoder(nn.Module):
    """A user action sequence -> one ``D``-wide token.

    Item ``i`` of the row (ids left-padded, the most recent last) is ``e_i = E[item_i] + A[action_i] +
    T[age_i] + P[r_i]`` with ``r_i`` its recency (0 = most recent) and ``age_i`` the log2 bucket of its age (the
    action and age terms when the sequence has them). A learned null token ``n`` is put first and is always valid,
    so an empty history is defined and no softmax runs over nothing. ``layers`` transformer layers
    (:class:`SequenceLayer`) encode ``[n, e_1..e_L]``; padded positions are masked as keys and never pooled.
    Pooling:

    * ``mean``: ``(h_n + sum_valid h_i) / (1 + #valid)``;
    * ``target`` (DIN): the candidate's item embedding ``c = E[target]`` (same table, same ids) scores each
      position ``s_i = MLP([c, h_i, c - h_i, c * h_i])``, and the token is ``sum softmax(s)_i h_i`` over the null
      token and the valid positions (DIN leaves the weights unnormalised; a softmax keeps the scale fixed).

    A padded position changes nothing: its recency embedding is not read, its attention weight is exactly 0.

    Shapes: ``sparse [B, F_cat]`` (the sequence's columns from ``start``; the target column) -> ``[B, D]``.

    Args:
        config: the sequence (:class:`~mtrank.config.model.SequenceConfig`).
        start: its first column in ``sparse``.
        dim: D.

    Example:
        >>> from mtrank.config.model import SequenceConfig
        >>> enc = SequenceEncoder(SequenceConfig(length=4, vocab_size=11, target=0, pooling="target"), 1, dim=8)
        >>> sparse = torch.tensor([[3, 10, 10, 5, 7], [9, 10, 10, 10, 10]])  # target, then 4 items (10 = padding)
        >>> enc(sparse).shape
        torch.Size([2, 8])
    """

    def __init__(self, config: SequenceConfig, start: int, dim: int) -> None:
        super().__init__()
        self.start, self.length, self.target = start, config.length, config.target
        self.pad = config.vocab_size - 1
        self.items = nn.Embedding(config.vocab_size, dim)
        nn.init.normal_(self.items.weight, std=0.05)
        self.actions = self.times = None  # tables only for what the sequence has
        if config.actions:
            self.actions = nn.Embedding(config.actions, dim)
            nn.init.normal_(self.actions.weight, std=0.05)
        if config.times:
            self.times = nn.Embedding(config.times, dim)
            nn.init.normal_(self.times.weight, std=0.05)
        self.recency = nn.Parameter(torch.zeros(config.length, dim))
        self.null = nn.Parameter(torch.randn(1, 1, dim) * 0.05)
        self.layers = nn.ModuleList(SequenceLayer(dim, config.heads) for _ in range(config.layers))
        self.target_pooling = config.pooling == "target"
        self.attention = nn.Sequential(nn.Linear(4 * dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        length = self.length
        items = sparse[:, self.start : self.start + length]  # (B, L)
        x = self.items(items)  # (B, L, D)
        column = self.start + length
        actions, times = self.actions, self.times
        if actions is not None:
            x = x + actions(sparse[:, column : column + length])
            column += length
        if times is not None:
            x = x + times(sparse[:, column : column + length])
        x = x + self.recency.flip(0).to(x.dtype)  # column j has recency L - 1 - j
        return self.pool(x, items != self.pad, sparse)

    def pool(self, x: torch.Tensor, valid: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Encode and pool embedded items ``x [B, L, D]`` (``valid [B, L]``) -> ``[B, D]``."""
        batch = x.shape[0]
        x = torch.cat([self.null.to(x.dtype).expand(batch, -1, -1), x], 1)  # (B, 1 + L, D)
        valid = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)  # (B, 1 + L)
        for layer in self.layers:
            x = layer(x, valid)
        if self.target_pooling:
            candidate = self.items(sparse[:, self.target]).unsqueeze(1).expand_as(x)  # (B, 1 + L, D)
            scores = self.attention(torch.cat([candidate, x, candidate - x, candidate * x], -1)).squeeze(-1)
            weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), -1)  # (B, 1 + L)
        else:
            weights = valid.to(x.dtype) / valid.sum(1, keepdim=True).to(x.dtype)
        return (weights.unsqueeze(-1) * x).sum(1)  # (B, D)


def sequence_encoders(configs: list[SequenceConfig], first_column: int, dim: int) -> nn.ModuleList:
    """One :class:`SequenceEncoder` per sequence, their columns one after the other from ``first_column``."""
    encoders, start = nn.ModuleList(), first_column
    for config in configs:
        encoders.append(SequenceEncoder(config, start, dim))
        start += config.columns
    return encoders
