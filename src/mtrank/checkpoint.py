"""Model directories and training checkpoints: safetensors weights + JSON, never pickle.

A model directory holds ``model.safetensors`` and ``config.json`` (``{"format": "mtrank-model",
"format_version": 1, "model": ModelConfig, ...extra}``). A training checkpoint adds ``optimizer.safetensors``
and ``trainer_state.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtrank.config import model_config_from_dict, to_dict
from mtrank.models import MultiTaskModel

FORMAT = "mtrank-model"
FORMAT_VERSION = 1


class ModelDirError(ValueError):
    """A model directory is missing, corrupt, or of an unsupported format version."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def save_model(model: MultiTaskModel, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` (created if needed); ``extra`` is stored in ``config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_save_tensors(model.state_dict(), directory / "model.safetensors")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": to_dict(model.config),
        **(extra or {}),
    }
    _atomic_write_text(directory / "config.json", json.dumps(meta, indent=2, sort_keys=True))
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


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and plain JSON data."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    groups = [  # a tensor hyper-parameter (the lr on CUDA) is stored as its value
        {k: float(v) if torch.is_tensor(v) else v for k, v in group.items()} for group in state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    # keep tensor hyper-parameters (the lr on CUDA) the same tensor objects: a captured CUDA graph and the lr
    # schedule both hold them; load_state_dict would put plain floats in their place
    held = [{k: v for k, v in group.items() if torch.is_tensor(v)} for group in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group, tensors_of_group in zip(optimizer.param_groups, held):
        for key, tensor in tensors_of_group.items():
            tensor.fill_(float(group[key]))
            group[key] = tensor


def save_checkpoint(
    directory: str | Path,
    model: MultiTaskModel,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rng_state: torch.Tensor,
    cuda_rng_state: torch.Tensor | None = None,
) -> None:
    """Write a resumable checkpoint: the trainer state JSON is written last, so a checkpoint whose
    ``trainer_state.json`` exists is complete. ``cuda_rng_state``: the GPU generator's state (dropout masks
    drawn on the GPU), when training runs there."""
    directory = Path(directory)
    save_model(model, directory)
    tensors, opt_meta = optimizer_to_tensors(optimizer)
    tensors["rng_state"] = rng_state
    if cuda_rng_state is not None:
        tensors["cuda_rng_state"] = cuda_rng_state
    _atomic_save_tensors(tensors, directory / "optimizer.safetensors")
    _atomic_write_text(directory / "trainer_state.json", json.dumps({**trainer_state, "optimizer": opt_meta}))


def load_checkpoint(
    directory: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict] | None:
    """``(model_state, optimizer_tensors, trainer_state)`` of a complete checkpoint, or None if there is none."""
    directory = Path(directory)
    if not (directory / "trainer_state.json").is_file():
        return None
    trainer_state = json.loads((directory / "trainer_state.json").read_text())
    return (
        load_file(str(directory / "model.safetensors")),
        load_file(str(directory / "optimizer.safetensors")),
        trainer_state,
    )
