"""TorchScript export: ``(dense, sparse) -> scores [B, K]`` traced with ``torch.jit.trace`` and frozen.

The trace is batch-size independent: the model has no data-dependent control flow, only branches on its
configuration and on tensor rank. Load the file with ``torch.jit.load``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from mtrank.export.common import random_inputs, scoring_module
from mtrank.model import MultiTaskModel


def trace(module: nn.Module, dense: torch.Tensor, sparse: torch.Tensor) -> torch.jit.ScriptModule:
    """``module`` (``(dense [B, F_dense], sparse [B, F_cat]) -> scores [B, K]``) traced on these inputs and
    frozen (weights folded in as constants), in evaluation mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices
        traced = torch.jit.trace(module.eval(), (dense, sparse), check_trace=False)
        return torch.jit.freeze(traced.eval())


def export_torchscript(model: MultiTaskModel, path: str | Path, batch: int = 8) -> Path:
    """Write ``model``'s scoring module as TorchScript to ``path`` (traced on ``batch`` random rows).

    Example:
        >>> import tempfile
        >>> from mtrank import ModelConfig
        >>> model = MultiTaskModel(ModelConfig(inputs={"num_dense": 3, "vocab_sizes": [5]}))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     traced = load_torchscript(export_torchscript(model, Path(tmp) / "model.pt"))
        >>> traced(*random_inputs(model, batch=4)).shape  # any batch size
        torch.Size([4, 2])
    """
    path = Path(path)
    traced = trace(scoring_module(model), *random_inputs(model, batch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(traced, str(path))
    return path


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """An exported file, ready to call: ``(dense [B, F_dense], sparse [B, F_cat]) -> scores [B, K]``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path))
