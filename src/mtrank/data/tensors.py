"""TensorData: a dataset that is a few tensors in memory; a batch is a slice of them (no per-row Python)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TensorData:
    """Rows of a multi-task dataset as tensors.

    Attributes:
        dense: ``[N, F_dense]`` float32 numeric features.
        sparse: ``[N, F_cat]`` int64 categorical ids (already offset-free, ``[0, vocab_f)`` per feature).
        labels: ``[N, K]`` float32 task labels; NaN marks a missing label (that task is masked for that row).
        weights: optional ``[N]`` float32 sample weights.
    """

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        for name in ("dense", "sparse", "weights"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"TensorData.{name} has {value.shape[0]} rows, labels have {n}")
        if self.sparse.dtype != torch.long:
            raise ValueError(f"TensorData.sparse must be int64 ids, got {self.sparse.dtype}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_tasks(self) -> int:
        return self.labels.shape[1]

    def __getitem__(self, index: torch.Tensor | slice) -> TensorData:
        return TensorData(
            self.dense[index],
            self.sparse[index],
            self.labels[index],
            None if self.weights is None else self.weights[index],
        )

    def to(self, device: torch.device | str) -> TensorData:
        return TensorData(
            self.dense.to(device),
            self.sparse.to(device),
            self.labels.to(device),
            None if self.weights is None else self.weights.to(device),
        )

    @staticmethod
    def concat(parts: list[TensorData]) -> TensorData:
        weights = None if parts[0].weights is None else torch.cat([p.weights for p in parts])
        return TensorData(
            torch.cat([p.dense for p in parts]),
            torch.cat([p.sparse for p in parts]),
            torch.cat([p.labels for p in parts]),
            weights,
        )

    def split(self, fractions: tuple[float, ...], seed: int = 0) -> tuple[TensorData, ...]:
        """Random split into parts of the given fractions (they must sum to 1)."""
        if abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {fractions}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        sizes = [int(round(f * len(self))) for f in fractions[:-1]]
        sizes.append(len(self) - sum(sizes))
        return tuple(self[idx] for idx in torch.split(order, sizes))
