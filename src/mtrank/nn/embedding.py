"""Input representation: categorical ids and dense features -> one input vector per row."""

from __future__ import annotations

import torch
from torch import nn


class FeatureEmbedding(nn.Module):
    """Embeds F categorical features with one table and one lookup, and concatenates dense features.

    All features share a single ``[sum(vocab_sizes), D]`` table; feature f's ids are shifted by
    ``offsets[f] = sum(vocab_sizes[:f])``, so the whole batch is embedded by one ``F.embedding`` call
    instead of one lookup per feature.

    Shapes: ``dense [B, F_dense]`` (float), ``sparse [B, F]`` (int64, ids in ``[0, vocab_f)``)
    -> ``[B, F_dense + F * D]``.

    Args:
        num_dense: number of dense features.
        vocab_sizes: vocabulary size of each categorical feature.
        embedding_dim: D, the embedding width.

    Example:
        >>> emb = FeatureEmbedding(num_dense=2, vocab_sizes=[10, 5], embedding_dim=4)
        >>> emb(torch.randn(3, 2), torch.tensor([[1, 0], [9, 4], [0, 2]])).shape
        torch.Size([3, 10])
    """

    def __init__(self, num_dense: int, vocab_sizes: list[int], embedding_dim: int) -> None:
        super().__init__()
        self.num_dense = num_dense
        self.num_sparse = len(vocab_sizes)
        self.embedding_dim = embedding_dim
        self.output_dim = num_dense + len(vocab_sizes) * embedding_dim
        offsets = torch.tensor([0, *vocab_sizes[:-1]], dtype=torch.long).cumsum(0) if vocab_sizes else None
        self.register_buffer("offsets", offsets if offsets is not None else torch.zeros(0, dtype=torch.long))
        self.table = nn.Embedding(int(sum(vocab_sizes)), embedding_dim) if vocab_sizes else None
        if self.table is not None:
            nn.init.normal_(self.table.weight, std=0.05)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return dense
        emb = self.embed(sparse).flatten(1)  # (B, F, D) -> (B, F*D)
        if self.num_dense == 0:
            return emb
        return torch.cat([dense.to(emb.dtype), emb], dim=1)  # (B, F_dense + F*D)

    def embed(self, sparse: torch.Tensor) -> torch.Tensor:
        """Per-feature embeddings ``[B, F] -> [B, F, D]`` (one lookup for all features)."""
        table = self.table
        if table is None:
            return torch.zeros(sparse.shape[0], 0, self.embedding_dim, device=sparse.device)
        return table(sparse + self.offsets)
