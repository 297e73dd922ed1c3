"""The model directory: one format, one place that writes and reads it (training, export, the service).

===================  ========================================================================================
``model.safetensors``  the weights
``config.json``        ``{"format": "mtrank-model", "format_version": 2, "model": ModelConfig, "plugins": [...],
                       "experiment": ExperimentConfig (when written by ``mtrank train``), ...}``
``encoders.json``      the fitted feature encoders (``mtrank train``), :mod:`mtrank.data.encoders`
``metrics.json``       validation / test metrics, history (``mtrank train``)
``report.md``          the same as readable tables
===================  ========================================================================================

Weights are safetensors, everything else JSON: nothing is unpickled. Format 1 (mtrank 0.1: a flat model
config) is read and converted. ``plugins`` names the modules that registered the model's expert or gate types;
loading imports them. Training checkpoints (:mod:`mtrank.train.checkpoint`) are model directories plus the
optimizer and loop state.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtrank.config import ConfigError, ModelConfig
from mtrank.config.experiment import ExperimentConfig, experiment_from_dict, import_plugins
from mtrank.config.model import nest_flat_model
from mtrank.data.encoders import ENCODERS_FILE, FeatureEncoder
from mtrank.model import MultiTaskModel

FORMAT = "mtrank-model"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


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


def save_model(
    model: MultiTaskModel, directory: str | Path, extra: dict[str, Any] | None = None, plugins: list[str] | None = None
) -> Path:
    """Write ``model`` to ``directory`` (created if needed); ``extra`` is stored in ``config.json``.

    ``plugins``: modules that register the model's expert / gate types (imported again when it is loaded).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(model.state_dict(), directory / "model.safetensors")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "plugins": list(plugins or []),
        **(extra or {}),
    }
    atomic_write_text(directory / "config.json", json.dumps(meta, indent=2, sort_keys=True))
    return directory


def read_model_meta(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a model directory, its format checked, in the current format (format 1 converted)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ModelDirError(f"{directory}: not a model directory (no config.json)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path}: corrupt JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelDirError(f"{path}: not an mtrank model (format={found!r})")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelDirError(
            f"{path}: format_version {version!r} is not supported by this mtrank (reads {READABLE_VERSIONS}); "
            "re-export the model with a matching mtrank version"
        )
    if version == 1:  # mtrank 0.1: a flat model config, an experiment whose model section was flat too
        meta["model"] = nest_flat_model(meta["model"])
        experiment = meta.get("experiment")
        if isinstance(experiment, dict) and isinstance(experiment.get("model"), dict):
            flat = experiment["model"]
            nested = nest_flat_model(flat)
            nested.pop("tasks", None)
            nested["inputs"] = {"embedding_dim": flat.get("embedding_dim", 16)}
            experiment["model"] = nested
        meta["format_version"] = FORMAT_VERSION
    return meta


def model_config(meta: dict[str, Any], where: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a model directory's metadata (its plugins imported first)."""
    import_plugins(meta.get("plugins", []), path=f"{where}/config.json: plugins")
    try:
        return ModelConfig.from_dict(meta["model"], "model")
    except ConfigError as err:
        raise ModelDirError(f"{where}/config.json: {err}") from None


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> MultiTaskModel:
    """Rebuild the model of a directory written by :func:`save_model`, in evaluation mode."""
    meta = read_model_meta(directory)
    model = MultiTaskModel(model_config(meta, directory))
    weights_path = Path(directory) / "model.safetensors"
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, FileNotFoundError, OSError) as err:
        raise ModelDirError(f"{weights_path}: cannot read weights ({err})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelDirError(f"{weights_path}: weights do not match config (missing={missing}, unexpected={unexpected})")
    return model.to(device).eval()


@dataclass
class ModelDir:
    """A loaded model directory: the model (evaluation mode), its metadata, and, when ``mtrank train`` wrote
    it, the fitted encoders and the experiment config."""

    path: Path
    model: MultiTaskModel
    meta: dict[str, Any]
    encoder: FeatureEncoder | None
    experiment: ExperimentConfig | None

    def require_experiment(self) -> ExperimentConfig:
        if self.experiment is None or self.encoder is None:
            raise ConfigError(
                f"{self.path}: this model directory was not written by `mtrank train` (no experiment config "
                f"or no {ENCODERS_FILE}); evaluate it with the Python API instead"
            )
        return self.experiment


def open_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> ModelDir:
    """Load everything a model directory holds; the encoders must agree with the model's inputs."""
    path = Path(directory)
    model = load_model(path, device)
    meta = read_model_meta(path)
    encoder = FeatureEncoder.load(path) if (path / ENCODERS_FILE).is_file() else None
    if encoder is not None:
        encoded = (encoder.num_dense, encoder.vocab_sizes)
        if encoded != (model.num_dense, model.vocab_sizes):
            raise ModelDirError(
                f"{path / ENCODERS_FILE}: encoders give {encoded[0]} dense features and vocabularies {encoded[1]}; "
                f"the model expects {model.num_dense} and {model.vocab_sizes}"
            )
        embedded = [(n.column, n.type, n.edges) for n in model.config.inputs.numeric]
        fitted = [(n["column"], n["type"], n.get("edges", [])) for n in encoder.numeric_inputs]
        if embedded != fitted:
            raise ModelDirError(
                f"{path / ENCODERS_FILE}: the encoders' embedded numeric features (column, type, bin edges) "
                f"{fitted} are not the model's {embedded}; the two files come from different trainings"
            )
    experiment = None
    if "experiment" in meta:
        experiment = experiment_from_dict(meta["experiment"], source=f"{path}/config.json")
    return ModelDir(path, model, meta, encoder, experiment)
