"""Learned grouping for Closeup's summarization layer (``model.mixer.groups: auto``).

1. Warm-up: the same model with the mixer over every token (no summary) trains ``group_warmup_epochs`` epochs
   on the training rows (same seed).
2. Its mixer tokens ``[B, T, D]`` on up to ``sample_rows`` training rows -> linear CKA between every two tokens
   (:func:`mtrank.nn.summarize.token_similarity`): how much two features carry the same information about a row.
3. Average-linkage clustering on ``1 - CKA`` into ``num_groups`` groups (:func:`~mtrank.nn.summarize.cluster_tokens`).

The groups are then fixed: the returned :class:`~mtrank.config.ModelConfig` holds them as lists, the model is built
from it and its model directory's ``config.json`` records them, so export and serving never recompute them.
"""

from __future__ import annotations

import dataclasses

import torch

from mtrank.config import ModelConfig, TrainConfig
from mtrank.data.tensors import TensorData
from mtrank.model import MultiTaskModel
from mtrank.nn.summarize import cluster_tokens, token_similarity
from mtrank.train.trainer import Trainer


def learn_mixer_groups(
    config: ModelConfig, train: TensorData, train_config: TrainConfig, seed: int = 0, sample_rows: int = 4096
) -> tuple[list[list[int]], torch.Tensor]:
    """The learned groups of ``config`` (``mixer.groups: auto``) and the token similarity they cut ``[T, T]``."""
    mixer = config.mixer
    if mixer.groups != "auto":
        raise ValueError(f"model.mixer.groups: learned grouping needs groups: auto, got {mixer.groups!r}")
    warmup_mixer = dataclasses.replace(mixer, groups=[], num_groups=0)
    model = MultiTaskModel(dataclasses.replace(config, mixer=warmup_mixer), seed=seed)
    warmup = dataclasses.replace(train_config, epochs=mixer.group_warmup_epochs, log_dir="", checkpoint_dir="")
    Trainer(model, warmup, callbacks=[]).fit(train)
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:sample_rows]
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        tokens = model.mixer_tokens(train.dense[rows].to(device), train.sparse[rows].to(device)).float().cpu()
    similarity = token_similarity(tokens)  # (T, T)
    return cluster_tokens(similarity, mixer.num_groups), similarity


def resolve_mixer_groups(
    config: ModelConfig, train: TensorData, train_config: TrainConfig, seed: int = 0
) -> ModelConfig:
    """``config`` with ``mixer.groups: auto`` replaced by the learned groups (unchanged otherwise)."""
    if config.mixer.layers == 0 or config.mixer.groups != "auto":
        return config
    groups, _ = learn_mixer_groups(config, train, train_config, seed)
    return dataclasses.replace(config, mixer=dataclasses.replace(config.mixer, groups=groups, num_groups=0))
