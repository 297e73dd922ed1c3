"""YouTube's shallow tower for selection (position) bias."""

from __future__ import annotations

import torch
from torch import nn

from mtrank.nn.embedding import FeatureEmbedding
from mtrank.nn.stacked import MLP


class BiasTower(nn.Module):
    """YouTube's shallow tower for selection (position) bias.

    Reads only bias features (e.g. position, device), embeds them, and outputs one logit per task, added to the
    main tasks' logits in training. In training each row's bias logit is dropped with probability ``dropout`` so
    the main model does not lean on it; at evaluation and serving the bias features are treated as missing and
    the tower adds nothing, so scores are debiased.

    Shapes: ``bias_ids [B, F_bias]`` -> ``[B, K]`` (zero for tasks outside ``task_mask``).
    """

    def __init__(self, vocab_sizes: list[int], dim: int, hidden: list[int], task_mask: torch.Tensor, dropout: float):
        super().__init__()
        self.embedding = FeatureEmbedding(0, vocab_sizes, dim)
        self.mlp = MLP(self.embedding.output_dim, hidden)
        self.out = nn.Linear(self.mlp.output_dim, task_mask.numel())
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("task_mask", task_mask.float())
        self.dropout = dropout

    def random_sources(self) -> list[str]:
        return ["bias-tower dropout"] if self.dropout > 0 else []

    def forward(self, bias_ids: torch.Tensor) -> torch.Tensor:
        empty = bias_ids.new_zeros(bias_ids.shape[0], 0).float()
        logits = self.out(self.mlp(self.embedding(empty, bias_ids))) * self.task_mask  # (B, K)
        if self.training and self.dropout > 0:
            keep = (torch.rand(logits.shape[0], 1, device=logits.device) >= self.dropout).to(logits.dtype)
            logits = logits * keep
        return logits
