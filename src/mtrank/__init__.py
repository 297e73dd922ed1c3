"""mtrank: multi-task ranking with Multi-gate Mixture-of-Experts (MMoE) in PyTorch."""

__version__ = "0.1.0"

from mtrank.config import (  # noqa: E402
    BiasConfig,
    BlockConfig,
    ExpertConfig,
    GateConfig,
    InputsConfig,
    MixerConfig,
    ModelConfig,
    TaskConfig,
    TowerConfig,
    TrainConfig,
)
from mtrank.model import MultiTaskModel, MultiTaskOutput, count_parameters, size_shared_bottom  # noqa: E402

__all__ = [
    "BiasConfig",
    "BlockConfig",
    "ExpertConfig",
    "InputsConfig",
    "MixerConfig",
    "TowerConfig",
    "GateConfig",
    "ModelConfig",
    "TaskConfig",
    "TrainConfig",
    "MultiTaskModel",
    "MultiTaskOutput",
    "count_parameters",
    "size_shared_bottom",
    "fit",
]


def __getattr__(name: str):
    """``mtrank.fit`` (the data pipeline) is imported on first use, so ``import mtrank`` stays light."""
    if name == "fit":
        from mtrank.pipeline import fit

        return fit
    raise AttributeError(f"module 'mtrank' has no attribute {name!r}")
