"""mtrank: multi-task ranking with Multi-gate Mixture-of-Experts (MMoE) in PyTorch.

The model's config sections (``InputsConfig``, ``BlockConfig``, ``ExpertConfig``, ...) are in
:mod:`mtrank.config`; training in :mod:`mtrank.train`; ``mtrank.fit`` runs an experiment config end to end.
"""

__version__ = "0.2.0"

from mtrank.config import ModelConfig, TaskConfig, TrainConfig  # noqa: E402
from mtrank.model import MultiTaskModel, MultiTaskOutput, count_parameters, size_shared_bottom  # noqa: E402

__all__ = [
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
