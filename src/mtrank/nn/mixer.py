"""Transformer feature mixer (Pinterest Closeup): self-attention across feature tokens."""

from __future__ import annotations

import torch
from torch import nn

from mtrank.nn.summarize import SUMMARIES


class FeatureMixer(nn.Module):
    """Self-attention across the feature tokens of a row; the mixed tokens are flattened.

    Tokens: each categorical feature's embedding ``[B, F, D]`` plus one token projected from the dense features
    (``[B, F_dense] -> [B, 1, D]``), with a learned position (feature-identity) embedding. A pre-norm transformer
    encoder mixes them; the output ``[B, (F+1) * D]`` is concatenated to the block input by the model.

    Shapes: ``dense [B, F_dense]``, ``embeddings [B, F, D]`` -> ``[B, T * D]`` with ``T = F + (F_dense > 0)``.

    With ``groups`` (lists of token indices, the dense token first when there is one), a summarization layer
    (:mod:`mtrank.nn.summarize`, ``summary`` = ``attention`` or ``mlp``) first turns each group into one token,
    so the encoder mixes ``G`` group tokens (cost ``O(G^2 D + G D^2)`` per row, not ``O(T^2 D + T D^2)``) and the
    output is ``[B, G * D]``.

    Example:
        >>> mixer = FeatureMixer(num_dense=3, num_tokens=4, dim=8, layers=1, heads=2)
        >>> mixer(torch.randn(2, 3), torch.randn(2, 4, 8)).shape
        torch.Size([2, 40])
    """

    def __init__(
        self,
        num_dense: int,
        num_tokens: int,
        dim: int,
        layers: int,
        heads: int,
        groups: list[list[int]] | None = None,
        summary: str = "attention",
    ) -> None:
        super().__init__()
        self.dense_token = nn.Linear(num_dense, dim) if num_dense else None
        self.num_tokens = num_tokens + (1 if num_dense else 0)
        self.summary = SUMMARIES[summary](groups, dim) if groups else None
        mixed_tokens = len(groups) if groups else self.num_tokens
        self.position = nn.Parameter(torch.zeros(1, mixed_tokens, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.output_dim = mixed_tokens * dim

    def tokens(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """The tokens the mixer reads, before any summary: the dense-features token (when there are dense
        features), then the embeddings, ``[B, T, D]``."""
        if self.dense_token is None:
            return embeddings
        dense_token = self.dense_token(dense.to(embeddings.dtype)).unsqueeze(1)  # (B, 1, D)
        return torch.cat([dense_token, embeddings], dim=1)  # (B, T, D)

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(dense, embeddings)  # (B, T, D)
        summary = self.summary
        if summary is not None:
            tokens = summary(tokens)  # (B, G, D)
        mixed = self.encoder(tokens + self.position)  # (B, T, D)
        return mixed.flatten(1)  # (B, T*D)
