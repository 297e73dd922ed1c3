"""Training checkpoints: a model directory plus optimizer state and the training loop's state.

``DIR/model.safetensors`` + ``config.json`` (a model directory, :mod:`mtrank.artifacts`),
``optimizer.safetensors`` (optimizer tensors and the RNG states) and ``trainer_state.json`` (written last, so a
checkpoint whose ``trainer_state.json`` exists is complete). Never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mtrank.artifacts import atomic_save_tensors, atomic_write_text, save_model
from mtrank.model import MultiTaskModel


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
    atomic_save_tensors(tensors, directory / "optimizer.safetensors")
    atomic_write_text(directory / "trainer_state.json", json.dumps({**trainer_state, "optimizer": opt_meta}))


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
