"""The two benchmark workloads and their data (generated once, outside every timing).

W1: the MMoE paper's synthetic setting (Ma et al. 2018): 100 dense inputs, 8 experts of 16 units, towers
    of 8, 2 regression tasks, batch 1024 (data: :func:`mtrank.data.make_synthetic`).
W2: recsys-sized: 26 categorical features (vocab 10,000, dim 16) + 13 numeric, 8 experts [256, 128],
    towers [64], 2 binary tasks, batch 4096. Labels come from a fixed random "teacher" (per-id effects, a
    dense term and a shared nonlinear interaction), so AUC measures something learnable (the bf16 check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtrank.config import ModelConfig, TaskConfig
from mtrank.data import TensorData, make_synthetic


@dataclass(frozen=True)
class Workload:
    name: str
    num_dense: int
    vocab_sizes: tuple[int, ...]
    embedding_dim: int
    num_experts: int
    expert_hidden: tuple[int, ...]
    tower_hidden: tuple[int, ...]
    task_types: tuple[str, ...]
    batch_size: int

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            inputs={
                "num_dense": self.num_dense,
                "vocab_sizes": list(self.vocab_sizes),
                "embedding_dim": self.embedding_dim,
            },
            tasks=[TaskConfig(f"t{k}", t) for k, t in enumerate(self.task_types)],
            block={"type": "mmoe", "num_experts": self.num_experts},
            experts={"hidden": list(self.expert_hidden)},
            towers={"hidden": list(self.tower_hidden)},
        )

    @property
    def input_dim(self) -> int:
        return self.num_dense + len(self.vocab_sizes) * self.embedding_dim

    def forward_matmul_flops(self) -> int:
        """Multiply-add FLOPs (2 per MAC) of one sample's forward matmuls: experts, gates, towers."""
        widths = [self.input_dim, *self.expert_hidden]
        experts = self.num_experts * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        k = len(self.task_types)
        gates = k * self.input_dim * self.num_experts
        mix = k * self.num_experts * self.expert_hidden[-1]
        tw = [self.expert_hidden[-1], *self.tower_hidden, 1]
        towers = k * sum(a * b for a, b in zip(tw[:-1], tw[1:]))
        return 2 * (experts + gates + mix + towers)

    def train_flops(self) -> int:
        """Training FLOPs per sample: forward + backward (input and weight grads) ~ 3x the forward matmuls."""
        return 3 * self.forward_matmul_flops()


W1 = Workload("W1", 100, (), 16, 8, (16,), (8,), ("regression", "regression"), 1024)
W2 = Workload("W2", 13, (10_000,) * 26, 16, 8, (256, 128), (64,), ("binary", "binary"), 4096)
WORKLOADS = {"W1": W1, "W2": W2}


def make_data(workload: Workload, n: int, seed: int = 0) -> TensorData:
    """``n`` rows of the workload's data (float32 dense, int64 ids, float32 labels)."""
    if workload.name == "W1":
        return make_synthetic(n=n, correlation=0.9, seed=seed)
    return _recsys(workload, n, seed)


def _recsys(workload: Workload, n: int, seed: int) -> TensorData:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.Generator().manual_seed(12345)  # the same label function for every seed
    num_cat = len(workload.vocab_sizes)
    vocab = workload.vocab_sizes[0]
    # Zipf-like ids: a few frequent values, a long tail (as in click logs)
    u = torch.rand(n, num_cat, generator=gen)
    sparse = torch.clamp((vocab**u - 1).long(), 0, vocab - 1)
    dense = torch.randn(n, workload.num_dense, generator=gen)
    k = len(workload.task_types)
    id_effect = torch.randn(num_cat, vocab, k, generator=teacher) * 0.5  # (F, V, K)
    dense_w = torch.randn(workload.num_dense, k, generator=teacher) * 0.3
    hidden = torch.randn(num_cat, vocab, 4, generator=teacher)  # a shared nonlinear interaction
    score = id_effect[torch.arange(num_cat), sparse].sum(1) / num_cat**0.5  # (n, K)
    h = hidden[torch.arange(num_cat), sparse].sum(1) / num_cat**0.5  # (n, 4)
    inter = torch.tanh(h[:, :1] * h[:, 1:2]) + torch.relu(h[:, 2:3] + dense[:, :1]) - 0.4
    score = score + dense @ dense_w + torch.cat([inter, -0.5 * inter], 1) - 1.0
    labels = torch.bernoulli(torch.sigmoid(score), generator=gen)
    return TensorData(dense, sparse, labels)
