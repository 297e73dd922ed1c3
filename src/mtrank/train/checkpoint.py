"""Training checkpoints: the weights, the optimizer, the RNG states and the loop's state, written as one set.

A checkpoint directory (``train.checkpoint_dir``) holds ``last/``:

===========================  ===================================================================
``weights.safetensors``      the trained weights (stacked ``[R, ...]`` for an ensemble of R runs)
``best.safetensors``         the best-on-validation weights so far (when a run has improved)
``optimizer.safetensors``    the optimizer's tensors and the CPU / GPU generator states
``trainer_state.json``       step, epoch position, every run's history and best step, the source's
                             position, the optimizer's plain state, and the fingerprint (written last)
===========================  ===================================================================

The set is written into ``last.new/`` and swapped in by renames, so a kill at any moment leaves one complete
checkpoint (``last/``, else ``last.old/`` or a complete ``last.new/``). Never pickle.

The fingerprint is a hash of what fixes the run's trajectory: the model config, the optimiser and its
settings, batch size, seeds, precision, clipping, distillation, the task-balancing method and its options, the
monitored metric, the data's size (and the total steps when a schedule depends on them). A checkpoint of another configuration is refused with a
message naming what changed; ``train.resume: overwrite`` (``--overwrite``) starts afresh, ``require``
(``--resume``) insists on resuming. More epochs or steps with a constant schedule continue the same run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mtrank.artifacts import atomic_save_tensors, atomic_write_text
from mtrank.config import ConfigError, TrainConfig

# TrainConfig fields that change the trajectory (the rest, e.g. epochs with a constant schedule, progress,
# logging, checkpointing, device, only decide how long, how it is shown, or where it runs)
TRAJECTORY_FIELDS = (
    "optimizer",
    "lr",
    "weight_decay",
    "batch_size",
    "schedule",
    "warmup_steps",
    "monitor",
    "precision",
    "seed",
    "grad_clip",
    "distill",
    "distill_weight",
)


def fingerprint_data(runs: dict, config: TrainConfig, source: dict, total_steps: int) -> dict:
    """What a checkpoint must agree with to be resumed (plain JSON data)."""
    train = {name: getattr(config, name) for name in TRAJECTORY_FIELDS}
    if config.schedule != "constant":
        train["total_steps"] = total_steps  # a decaying schedule depends on the run's length
    if config.balancing.type != "fixed":  # (absent for fixed weights: older checkpoints keep their fingerprint)
        train["balancing"] = config.balancing.to_dict()
    return {"runs": runs, "train": train, "data": source}


def fingerprint(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [f"{path} {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}"]


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
    """Load what :func:`optimizer_to_tensors` split, keeping tensor hyper-parameters the same tensor objects."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    # a captured CUDA graph and the lr schedule both hold the lr tensor; load_state_dict would put plain floats
    # in its place
    held = [{k: v for k, v in group.items() if torch.is_tensor(v)} for group in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group, tensors_of_group in zip(optimizer.param_groups, held):
        for key, tensor in tensors_of_group.items():
            tensor.fill_(float(group[key]))
            group[key] = tensor


class Checkpoints:
    """The checkpoint directory of one run (or ensemble of runs) and its fingerprint.

    Args:
        directory: ``train.checkpoint_dir``.
        identity: :func:`fingerprint_data` of this run.
        resume: ``auto``, ``overwrite`` or ``require`` (see the module docstring).
    """

    def __init__(self, directory: str | Path, identity: dict, resume: str = "auto") -> None:
        self.directory = Path(directory)
        self.identity, self.resume = identity, resume
        self.fingerprint = fingerprint(identity)

    def _complete(self) -> Path | None:
        for name in ("last.new", "last", "last.old"):  # newest first; see the module docstring
            if (self.directory / name / "trainer_state.json").is_file():
                return self.directory / name
        return None

    def load(self) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict] | None:
        """``(trainer_state, weights, best_weights, optimizer_tensors)`` to resume from, or None.

        Raises :class:`ConfigError` when the checkpoint was written by another configuration (``auto``), or
        when there is none to resume (``require``)."""
        if self.resume == "overwrite":
            if self.directory.exists():
                for name in ("last.new", "last", "last.old", "best", "best.new"):
                    shutil.rmtree(self.directory / name, ignore_errors=True)
            return None
        found = self._complete()
        if found is None:
            if self.resume == "require":
                raise ConfigError(
                    f"train.resume: require, but {self.directory} holds no checkpoint to resume "
                    "(drop --resume to start a new run)"
                )
            return None
        state = json.loads((found / "trainer_state.json").read_text())
        if state.get("fingerprint") != self.fingerprint:
            changed = _differences(state.get("identity", {}), self.identity) or ["(a checkpoint of an older format)"]
            raise ConfigError(
                f"train.checkpoint_dir: {self.directory} holds a checkpoint of another configuration "
                f"({'; '.join(changed[:4])}); start afresh with --overwrite (train.resume: overwrite) or use "
                "another checkpoint directory"
            )
        try:
            weights = load_file(str(found / "weights.safetensors"))
            optimizer = load_file(str(found / "optimizer.safetensors"))
            best_path = found / "best.safetensors"
            best = load_file(str(best_path)) if best_path.is_file() else None
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"train.checkpoint_dir: {found} cannot be read ({err}); use --overwrite") from None
        return state, weights, best, optimizer

    def save(
        self,
        state: dict,
        weights: dict[str, torch.Tensor],
        best: dict[str, torch.Tensor] | None,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Write one complete checkpoint set and swap it in (see the module docstring)."""
        new, last, old = (self.directory / name for name in ("last.new", "last", "last.old"))
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(parents=True)
        atomic_save_tensors(weights, new / "weights.safetensors")
        if best is not None:
            atomic_save_tensors(best, new / "best.safetensors")
        tensors, optimizer_meta = optimizer_to_tensors(optimizer)
        tensors["rng_state"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["cuda_rng_state"] = torch.cuda.get_rng_state()  # dropout masks drawn on the GPU
        atomic_save_tensors(tensors, new / "optimizer.safetensors")
        full = {**state, "optimizer": optimizer_meta, "fingerprint": self.fingerprint, "identity": self.identity}
        atomic_write_text(new / "trainer_state.json", json.dumps(full, default=float))
        shutil.rmtree(old, ignore_errors=True)
        if last.exists():
            last.rename(old)
        new.rename(last)
        shutil.rmtree(old, ignore_errors=True)


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Set the CPU (and GPU) generators from a checkpoint's tensors (removing them from ``tensors``)."""
    torch.set_rng_state(tensors.pop("rng_state"))
    cuda_rng = tensors.pop("cuda_rng_state", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
