"""Training checkpoints: the weights, the optimizer, the RNG states and the loop's state, written as one set.

A checkpoint directory (``train.checkpoint_dir``) holds the last ``train.keep_checkpoints`` complete
checkpoints, one folder each, ``step-000000200/``:

===========================  ===================================================================
``weights.safetensors``      the trained weights (stacked ``[R, ...]`` for an ensemble of R runs)
``best.safetensors``         the best-on-validation weights so far (when a run has improved)
``optimizer.safetensors``    the optimizer's tensors and the CPU / GPU generator states
``trainer_state.json``       step, epoch position, every run's history and best step, the source's
                             position, the optimizer's plain state, and the fingerprint
``manifest.json``            written last: the size and SHA-256 of every file above, the format, the
                             mtrank and torch versions (:func:`mtrank.artifacts.write_manifest`)
===========================  ===================================================================

A write (:meth:`Checkpoints.save`) goes through these states; a kill between any two leaves the directory in
one of them:

1. ``step-N.partial/`` is created and each file written and fsynced into it, then ``manifest.json``, then the
   folder is fsynced: until it is renamed, the previous checkpoints are the newest complete ones;
2. ``step-N.partial`` is renamed ``step-N`` (one atomic rename) and the checkpoint directory fsynced;
3. checkpoints beyond the newest ``keep`` are renamed ``*.removing`` (atomic), then deleted.

The resume (:meth:`Checkpoints.load`) deletes what an interrupted write left (``*.partial``, ``*.removing``:
never read) and loads the newest ``step-N`` folder whose manifest verifies.

A folder named ``step-N`` whose files do not match its manifest (a disk error, a hand edit, a crash of the
machine that lost unsynced data) is skipped with a warning, renamed ``step-N.corrupt`` for inspection, and
the previous complete checkpoint resumed: the files of two checkpoints are never mixed. Never pickle.
:func:`mtrank.artifacts.fault_point` marks every boundary between two of these file-system operations
(``checkpoint.mkdir``, ``checkpoint.file.<name>``, ``checkpoint.manifest``, ``checkpoint.rename``, ...):
``tests/test_faults_checkpoint.py`` kills a run at each of them and checks that the resume ends with the
weights of an uninterrupted run.

The fingerprint is a hash of what fixes the run's trajectory: the model config, the optimiser and its
settings, batch size, seeds, precision, clipping, distillation, the task-balancing method and its options, the
monitored metric, the data's size (and the total steps when a schedule depends on them). A checkpoint of another
configuration is refused with a message naming what changed; ``train.resume: overwrite`` (``--overwrite``) starts
afresh, ``require`` (``--resume``) insists on resuming. More epochs or steps with a constant schedule continue the
same run.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtrank.artifacts import (
    ModelDirError,
    fault_point,
    file_digest,
    fsync_dir,
    verify_manifest,
    write_manifest,
)
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
        balancing = config.balancing.to_dict()
        balancing.pop("conflict_every", None)  # a measurement, not the trajectory
        train["balancing"] = balancing
    if config.sparse.enabled:  # (absent for a dense table: older checkpoints keep their fingerprint)
        train["sparse"] = config.sparse.to_dict()
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


STEP_DIR = re.compile(r"step-(\d+)")
LEGACY_DIRS = ("last", "last.new", "last.old")  # mtrank 0.2: one set swapped by renames, no manifest


class Checkpoints:
    """The checkpoint directory of one run (or ensemble of runs) and its fingerprint.

    Args:
        directory: ``train.checkpoint_dir``.
        identity: :func:`fingerprint_data` of this run.
        resume: ``auto``, ``overwrite`` or ``require`` (see the module docstring).
        keep: how many complete checkpoints to keep (``train.keep_checkpoints``).
        writer: whether this process writes (rank 0); the others only read.
    """

    def __init__(
        self, directory: str | Path, identity: dict, resume: str = "auto", keep: int = 2, writer: bool = True
    ) -> None:
        self.directory = Path(directory)
        self.identity, self.resume, self.keep, self.writer = identity, resume, keep, writer
        self.fingerprint = fingerprint(identity)

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every ``step-N`` folder, newest first (complete unless damaged later)."""
        found = []
        for path in self.directory.glob("step-*"):
            match = STEP_DIR.fullmatch(path.name)
            if match and path.is_dir():
                found.append((int(match[1]), path))
        return sorted(found, reverse=True)

    def load(self) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict] | None:
        """``(trainer_state, weights, best_weights, optimizer_tensors)`` of the newest checkpoint whose
        manifest verifies, or None.

        Raises :class:`ConfigError` when the checkpoint was written by another configuration (``auto``), or
        when there is none to resume (``require``)."""
        if self.resume == "overwrite":
            if self.directory.exists() and self.writer:
                for path in self.directory.iterdir():
                    if path.name.startswith("step-") or path.name in LEGACY_DIRS:
                        shutil.rmtree(path, ignore_errors=True)
            return None
        if self.writer:  # what an interrupted write left: never read
            for path in self.directory.glob("step-*"):
                if path.name.endswith((".partial", ".removing")):
                    shutil.rmtree(path)
                    fault_point("checkpoint.sweep")
        found = self._newest_verified()
        if found is None:
            if any((self.directory / name).is_dir() for name in LEGACY_DIRS):
                raise ConfigError(
                    f"train.checkpoint_dir: {self.directory} holds a checkpoint of mtrank 0.2 (last/, no manifest to "
                    "verify it by); finish that run with mtrank 0.2, or start afresh with --overwrite"
                )
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

    def _newest_verified(self) -> Path | None:
        """The newest ``step-N`` folder that matches its manifest; newer damaged ones are set aside, warned of."""
        for _, path in self.complete():
            try:
                verify_manifest(path, "checkpoint")
                return path
            except ModelDirError as err:
                aside = path.with_name(path.name + ".corrupt")
                warnings.warn(
                    f"train.checkpoint_dir: {err}; resuming from the previous complete checkpoint instead"
                    + (f" (the damaged one is kept as {aside})" if self.writer else ""),
                    stacklevel=3,
                )
                if self.writer:
                    shutil.rmtree(aside, ignore_errors=True)
                    path.rename(aside)
        return None

    def save(
        self,
        state: dict,
        weights: dict[str, torch.Tensor],
        best: dict[str, torch.Tensor] | None,
        optimizer: torch.optim.Optimizer,
    ) -> Path:
        """Write one complete checkpoint, make it the newest, drop the oldest (see the module docstring)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step-{state['step']:09d}"
        partial = final.with_name(final.name + ".partial")
        partial.mkdir()  # 1.
        fault_point("checkpoint.mkdir")
        tensors, optimizer_meta = optimizer_to_tensors(optimizer)
        tensors["rng_state"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["cuda_rng_state"] = torch.cuda.get_rng_state()  # dropout masks drawn on the GPU
        full = {**state, "optimizer": optimizer_meta, "fingerprint": self.fingerprint, "identity": self.identity}
        parts: dict[str, Any] = {"weights.safetensors": weights, "optimizer.safetensors": tensors}
        if best is not None:
            parts["best.safetensors"] = best
        parts["trainer_state.json"] = json.dumps(full, default=float)
        files = {}
        for name, content in parts.items():
            if isinstance(content, str):
                (partial / name).write_text(content)
            else:
                save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, str(partial / name))
            files[name] = file_digest(partial / name, sync=True)
            fault_point(f"checkpoint.file.{name}")
        write_manifest(partial, "checkpoint", files, step=state["step"])  # fsyncs the folder too
        fault_point("checkpoint.manifest")
        partial.rename(final)  # 2. (no step-N can exist: the resume set aside every step-N newer than its own)
        fault_point("checkpoint.rename")
        fsync_dir(self.directory)
        fault_point("checkpoint.publish")
        for _, old in self.complete()[self.keep :]:  # 3.
            removing = old.with_name(old.name + ".removing")
            old.rename(removing)
            fault_point("checkpoint.prune")
            shutil.rmtree(removing)
            fault_point("checkpoint.pruned")
        return final


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Set the CPU (and GPU) generators from a checkpoint's tensors (removing them from ``tensors``)."""
    torch.set_rng_state(tensors.pop("rng_state"))
    cuda_rng = tensors.pop("cuda_rng_state", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
