"""MultiTaskModel: composes the nn parts from a :class:`~mtrank.config.ModelConfig`."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import nn

from mtrank.config import ModelConfig, TaskConfig
from mtrank.nn import FeatureEmbedding, MultiTaskBlock
from mtrank.nn.bias import BiasTower
from mtrank.nn.mixer import FeatureMixer


class MultiTaskOutput(NamedTuple):
    """What a forward pass returns, so analysis and regularisers need no hooks.

    Attributes:
        task_logits: ``[B, K]`` logits (binary tasks) or predictions (regression tasks).
        gate_weights: ``[B, K, E]`` each task's weight on each expert (float32).
        aux_loss: ``[]`` auxiliary gate loss (load balancing for top-k gates; 0 otherwise).
    """

    task_logits: torch.Tensor
    gate_weights: torch.Tensor
    aux_loss: torch.Tensor


class MultiTaskModel(nn.Module):
    """A multi-task ranker: input representation (-> feature mixer) -> multi-task block -> one output per task.

    Bias features (YouTube's position / device) skip the main model and feed a shallow tower whose logit is added
    to the task logits in training only; evaluation and serving scores are debiased.

    Shapes: ``dense [B, F_dense]`` float, ``sparse [B, F_cat]`` int64 -> :class:`MultiTaskOutput`.

    Example:
        >>> from mtrank.config import ModelConfig
        >>> model = MultiTaskModel(ModelConfig(num_dense=100, block="mmoe"))
        >>> out = model(torch.randn(4, 100), torch.zeros(4, 0, dtype=torch.long))
        >>> out.task_logits.shape, out.gate_weights.shape
        (torch.Size([4, 2]), torch.Size([4, 2, 8]))
    """

    __jit_unused_properties__ = ["tasks"]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config.validate()
        main = config.main_features
        self.embedding = FeatureEmbedding(
            config.num_dense,
            [config.vocab_sizes[i] for i in main],
            config.embedding_dim,
            config.bag_lengths,
            config.bag_pooling,
        )
        self.select_main = len(main) != len(config.vocab_sizes)
        self.register_buffer("main_features", torch.tensor(main, dtype=torch.long))
        self.mixer = None
        block_in = self.embedding.output_dim
        if config.mixer_layers:
            self.mixer = FeatureMixer(
                config.num_dense,
                self.embedding.num_tokens,
                config.embedding_dim,
                config.mixer_layers,
                config.mixer_heads,
            )
            block_in += self.mixer.output_dim
        self.block = MultiTaskBlock(config, block_in)
        binary = [task.type == "binary" for task in config.tasks]
        self.register_buffer("binary_mask", torch.tensor(binary, dtype=torch.bool))
        self.bias_tower = None
        self.register_buffer("bias_features", torch.tensor(config.bias_features, dtype=torch.long))
        if config.bias_features:
            names = config.bias_tasks or [t.name for t in config.tasks if t.type == "binary"]
            task_mask = torch.tensor([t.name in names for t in config.tasks])
            self.bias_tower = BiasTower(
                [config.vocab_sizes[i] for i in config.bias_features],
                config.embedding_dim,
                list(config.bias_hidden),
                task_mask,
                config.bias_dropout,
            )

    @property
    def tasks(self) -> list[TaskConfig]:
        return self.config.tasks

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> MultiTaskOutput:
        main_sparse = sparse.index_select(1, self.main_features) if self.select_main else sparse
        if self.mixer is None:
            x = self.embedding(dense, main_sparse)  # (B, in)
        else:
            tokens = self.embedding.embed(main_sparse)  # (B, F, D)
            x = torch.cat([dense.to(tokens.dtype), tokens.flatten(1), self.mixer(dense, tokens)], 1)  # (B, in)
        task_logits, gate_weights, aux_loss = self.block(x)
        if self.bias_tower is not None and self.training:
            task_logits = task_logits + self.bias_tower(sparse.index_select(1, self.bias_features))
        return MultiTaskOutput(task_logits, gate_weights, aux_loss)

    def scores(self, task_logits: torch.Tensor) -> torch.Tensor:
        """Logits -> scores: sigmoid for binary tasks, identity for regression. ``[B, K] -> [B, K]``."""
        return torch.where(self.binary_mask, torch.sigmoid(task_logits), task_logits)

    @torch.no_grad()
    def predict(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """Scores for every task, ``[B, K]``, in evaluation mode."""
        was_training = self.training
        self.eval()
        try:
            return self.scores(self(dense, sparse).task_logits.float())
        finally:
            self.train(was_training)


class ScoringModule(nn.Module):
    """Export wrapper: ``(dense, sparse) -> scores [B, K]`` (probabilities for binary tasks)."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.model.scores(self.model(dense, sparse).task_logits)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def size_shared_bottom(config: ModelConfig) -> ModelConfig:
    """A Shared-Bottom config whose bottom width gives the parameter count closest to ``config``'s model.

    The paper compares MMoE with 8 experts of 16 units against a Shared-Bottom of 113 units "with the same
    number of parameters"; this helper does that sizing for any config (one-layer bottom, same towers).
    """
    target = count_parameters(MultiTaskModel(config))

    def params(width: int) -> int:
        trial = dataclasses.replace(config, block="shared_bottom", expert_hidden=[width])
        return count_parameters(MultiTaskModel(trial))

    lo, hi = 1, 1
    while params(hi) < target:
        hi *= 2
    while lo < hi:  # smallest width with params >= target
        mid = (lo + hi) // 2
        if params(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    best = min((w for w in (lo - 1, lo) if w >= 1), key=lambda w: abs(params(w) - target))
    return dataclasses.replace(config, block="shared_bottom", expert_hidden=[best])
