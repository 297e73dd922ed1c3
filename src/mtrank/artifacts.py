"""The model directory: one format, one place that writes and reads it (training, export, the service).

A model directory holds ``model.safetensors`` and ``config.json`` (``{"format": "mtrank-model",
"format_version": 1, "model": ModelConfig, ...extra}``), and, when written by ``mtrank train``,
``encoders.json``, ``metrics.json`` and ``report.md``. Weights are safetensors, everything else JSON: nothing
is unpickled. Training checkpoints (:mod:`mtrank.train.checkpoint`) are model directories plus optimizer state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtrank.config import ConfigError, model_config_from_dict, to_dict
from mtrank.config.experiment import ExperimentConfig, experiment_from_dict
from mtrank.data.encoders import FeatureEncoder
from mtrank.model import MultiTaskModel

FORMAT = "mtrank-model"
FORMAT_VERSION = 1


class ModelDirError(ValueError):
    """A model directory is missing, corrupt, or of an unsupported format version."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def save_model(model: MultiTaskModel, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` (created if needed); ``extra`` is stored in ``config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(model.state_dict(), directory / "model.safetensors")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": to_dict(model.config),
        **(extra or {}),
    }
    atomic_write_text(directory / "config.json", json.dumps(meta, indent=2, sort_keys=True))
    return directory


def read_model_meta(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a model directory, with its format checked."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ModelDirError(f"{directory}: not a model directory (no config.json)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path}: corrupt JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise ModelDirError(f"{path}: not an mtrank model (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported by this mtrank "
            f"(expects {FORMAT_VERSION}); re-export the model with a matching mtrank version"
        )
    return meta


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> MultiTaskModel:
    """Rebuild the model of a directory written by :func:`save_model`, in evaluation mode."""
    meta = read_model_meta(directory)
    model = MultiTaskModel(model_config_from_dict(meta["model"]))
    weights_path = Path(directory) / "model.safetensors"
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, FileNotFoundError, OSError) as err:
        raise ModelDirError(f"{weights_path}: cannot read weights ({err})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelDirError(f"{weights_path}: weights do not match config (missing={missing}, unexpected={unexpected})")
    return model.to(device).eval()


def load_model_dir(model_dir: str | Path) -> tuple[MultiTaskModel, FeatureEncoder, ExperimentConfig]:
    """Model, encoder and experiment config of a directory written by :func:`fit`."""
    meta = read_model_meta(model_dir)
    if "experiment" not in meta:
        raise ConfigError(
            f"{model_dir}: this model directory was not written by `mtrank train` (no experiment "
            "config in config.json); evaluate it with the Python API instead"
        )
    config = experiment_from_dict(meta["experiment"], source=f"{model_dir}/config.json")
    return load_model(model_dir), FeatureEncoder.load(model_dir), config
