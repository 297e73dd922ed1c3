"""Typed, nested configuration: the model, its training, and a whole experiment, built by one builder.

* :mod:`mtrank.config.base`: :class:`Config`, the builder (types checked, did-you-mean hints), registries.
* :mod:`mtrank.config.model`: :class:`ModelConfig` and its sections (inputs, tasks, block, experts, gate,
  towers, mixer, bias).
* :mod:`mtrank.config.train`: :class:`TrainConfig` and its ``balancing`` section (registered methods).
* :mod:`mtrank.config.experiment`: :class:`ExperimentConfig` (data, features, tasks, model, train) from YAML.
"""

from mtrank.config.base import Config, ConfigError, Registry, build
from mtrank.config.model import (
    BLOCKS,
    EXPERTS,
    GATES,
    BagConfig,
    BiasConfig,
    BlockConfig,
    ExpertConfig,
    FunnelConfig,
    GateConfig,
    InputsConfig,
    MixerConfig,
    ModelConfig,
    TaskConfig,
    TowerConfig,
)
from mtrank.config.train import BALANCERS, BalancingConfig, CompileConfig, SparseConfig, TrainConfig

__all__ = [
    "BALANCERS",
    "BLOCKS",
    "EXPERTS",
    "GATES",
    "BagConfig",
    "BalancingConfig",
    "BiasConfig",
    "CompileConfig",
    "BlockConfig",
    "Config",
    "ConfigError",
    "ExpertConfig",
    "FunnelConfig",
    "GateConfig",
    "InputsConfig",
    "MixerConfig",
    "ModelConfig",
    "Registry",
    "SparseConfig",
    "TaskConfig",
    "TowerConfig",
    "TrainConfig",
    "build",
]
