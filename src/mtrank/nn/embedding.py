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

    Multi-valued features (bags) are the last ``sum(bag_lengths)`` columns: bag b's ``bag_lengths[b]`` columns
    hold its values' ids, padded with the bag's last id; they share one slice of the table, and their
    embeddings are pooled (mean or sum over the non-padding ones) into one ``[B, D]`` token per bag, as
    ``nn.EmbeddingBag`` would, but inside the same single lookup.

    Args:
        num_dense: number of dense features.
        vocab_sizes: vocabulary size of each categorical column (a bag's columns: the bag's size, padding
            included).
        embedding_dim: D, the embedding width.
        bag_lengths / bag_pooling: columns and ``"mean"`` / ``"sum"`` of each bag (see ``ModelConfig``).

    Example:
        >>> emb = FeatureEmbedding(num_dense=2, vocab_sizes=[10, 5], embedding_dim=4)
        >>> emb(torch.randn(3, 2), torch.tensor([[1, 0], [9, 4], [0, 2]])).shape
        torch.Size([3, 10])
    """

    __constants__ = ["bags"]  # TorchScript unrolls the loop over this tuple

    def __init__(
        self,
        num_dense: int,
        vocab_sizes: list[int],
        embedding_dim: int,
        bag_lengths: list[int] | None = None,
        bag_pooling: list[str] | None = None,
    ) -> None:
        super().__init__()
        bag_lengths, bag_pooling = list(bag_lengths or []), list(bag_pooling or [])
        self.num_dense = num_dense
        self.num_sparse = len(vocab_sizes)
        self.num_single = len(vocab_sizes) - sum(bag_lengths)
        self.num_tokens = self.num_single + len(bag_lengths)
        self.embedding_dim = embedding_dim
        self.output_dim = num_dense + self.num_tokens * embedding_dim
        # table offset of each column: singles one slice each; a bag's columns all point at the bag's slice
        column_offsets, rows = [], 0
        for size in vocab_sizes[: self.num_single]:
            column_offsets.append(rows)
            rows += int(size)
        bags = []  # (first column, columns, padding id, mean) of each bag
        start = self.num_single
        for length, pooling in zip(bag_lengths, bag_pooling):
            size = int(vocab_sizes[start])
            column_offsets += [rows] * length
            bags.append((start, length, size - 1, pooling == "mean"))
            rows += size
            start += length
        self.bags = tuple(bags)
        self.register_buffer("offsets", torch.tensor(column_offsets, dtype=torch.long))
        self.table = nn.Embedding(rows, embedding_dim) if vocab_sizes else None
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
        """Per-feature embeddings ``[B, F] -> [B, tokens, D]`` (one lookup for all features; bags pooled)."""
        table = self.table
        if table is None:
            return torch.zeros(sparse.shape[0], 0, self.embedding_dim, device=sparse.device)
        emb = table(sparse + self.offsets)  # (B, F, D)
        if len(self.bags) == 0:
            return emb
        tokens = [emb[:, : self.num_single]]
        for start, length, pad, mean in self.bags:
            keep = (sparse[:, start : start + length] != pad).to(emb.dtype).unsqueeze(-1)  # (B, L, 1)
            pooled = (emb[:, start : start + length] * keep).sum(1, keepdim=True)  # (B, 1, D)
            if mean:
                pooled = pooled / keep.sum(1, keepdim=True).clamp_min(1.0)
            tokens.append(pooled)
        return torch.cat(tokens, 1)
