"""The model directory: one format, one place that writes and reads it (training, export, the service).

=====================  ======================================================================================
``model.safetensors``  the weights
``config.json``        ``{"format": "mtrank-model", "format_version": 3, "model": ModelConfig, "plugins": [...],
                       "experiment": ExperimentConfig (when written by ``mtrank train``), ...}``
``encoders.json``      the fitted feature encoders (``mtrank train``), :mod:`mtrank.data.encoders`
``metrics.json``       validation / test metrics, history (``mtrank train``)
``report.md``          the same as readable tables
``manifest.json``      written last: the size and SHA-256 of every other file, the mtrank and torch versions
=====================  ======================================================================================

Weights are safetensors, everything else JSON: nothing is unpickled. Everything that opens a model directory
(:func:`open_model_dir`, :func:`load_model`) first checks every file against ``manifest.json``: a missing,
extra, truncated or changed file, weights of another shape, a NaN or Inf in a tensor fail with one line naming
the file (:class:`ModelDirError`). Format 1 (mtrank 0.1: a flat model config) is read and converted; formats 1
and 2 carry no manifest and load with a warning until ``mtrank model seal DIR`` adds one. ``plugins`` names the
modules that registered the model's expert or gate types; loading imports them. Files added to a sealed
directory later (a blend, an export) are recorded in its manifest by what writes them (:func:`add_to_manifest`).

Training checkpoints (:mod:`mtrank.train.checkpoint`) use the same manifest, and the same fault points
(:func:`fault_point`): ``MTRANK_FAULT_KILL_AT=LABEL:N`` kills the process the N-th time a write reaches
``LABEL``, which is how ``tests/test_faults_checkpoint.py`` kills a checkpoint write at each of its file
boundaries (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtrank import __version__
from mtrank.config import ConfigError, ModelConfig
from mtrank.config.experiment import ExperimentConfig, experiment_from_dict, import_plugins
from mtrank.config.model import nest_flat_model
from mtrank.data.encoders import ENCODERS_FILE, FeatureEncoder
from mtrank.model import MultiTaskModel

FORMAT = "mtrank-model"
FORMAT_VERSION = 3  # 3: sealed by manifest.json; 2: nested model config; 1: mtrank 0.1's flat model config
READABLE_VERSIONS = (1, 2, 3)
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "mtrank-manifest"
MANIFEST_VERSION = 1
FAULT_ENV = "MTRANK_FAULT_KILL_AT"


class ModelDirError(ValueError):
    """A model directory (or checkpoint) is missing, corrupt, tampered with, or of an unsupported format."""


# ------------------------------------------------------------------------------------------ fault injection

_fault_hits: Counter[str] = Counter()


def fault_point(label: str) -> None:
    """A boundary between two file-system operations of a write, where a test may kill this process.

    With ``MTRANK_FAULT_KILL_AT=LABEL:N`` in the environment, the N-th time ``label`` is reached (counted
    since the process started, or since :func:`reset_fault_hits`) the process sends itself SIGKILL: no
    handler, no ``finally``, no flush, as ``kill -9`` or a lost machine. Unset, it costs a counter update;
    it is called only around checkpoint and model-directory writes, never per step.
    """
    _fault_hits[label] += 1
    target = os.environ.get(FAULT_ENV)
    if not target:
        return
    name, _, nth = target.rpartition(":")
    if not name or not nth.isdigit():
        raise ValueError(f"{FAULT_ENV}={target!r}: expected LABEL:N, e.g. checkpoint.rename:2")
    if name == label and _fault_hits[label] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


def fault_hits() -> dict[str, int]:
    """How often each fault point was reached (what a test enumerates to kill at every boundary)."""
    return dict(_fault_hits)


def reset_fault_hits() -> None:
    _fault_hits.clear()


# ------------------------------------------------------------------------------------------ durable writes


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` (a create, a rename, a delete) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path, sync: bool = False) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file; with ``sync``, its data is made durable first."""
    with open(path, "rb") as handle:
        if sync:
            os.fsync(handle.fileno())
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        return {"bytes": os.fstat(handle.fileno()).st_size, "sha256": digest}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file, fsynced, renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    file_digest(tmp, sync=True)
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------ manifest


def list_files(directory: Path) -> list[str]:
    """Every file under ``directory`` as a relative POSIX path, its own ``manifest.json`` left out."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p != directory / MANIFEST_FILE
    )


def write_manifest(directory: str | Path, kind: str, files: dict[str, dict] | None = None, **facts: Any) -> Path:
    """Write ``manifest.json``: the size and SHA-256 of every file (hashed and fsynced now unless ``files``
    gives them), ``kind`` (``model`` or ``checkpoint``), ``facts``, and the mtrank and torch versions.

    Written last, atomically and fsynced: a directory whose manifest verifies is complete."""
    directory = Path(directory)
    if files is None:
        files = {name: file_digest(directory / name, sync=True) for name in list_files(directory)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "kind": kind,
        "mtrank_version": __version__,
        "torch_version": torch.__version__,
        **facts,
        "files": files,
    }
    path = directory / MANIFEST_FILE
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True))
    return path


def verify_manifest(directory: str | Path, kind: str, hint: str = "", ignore: Iterable[str] = ()) -> dict:
    """Check ``directory`` against its ``manifest.json``: every listed file present with its size and
    SHA-256, no file that is not listed (``ignore``: names not checked). Returns the manifest; raises
    :class:`ModelDirError` naming the first file that differs (``hint``: what to do, appended)."""
    directory = Path(directory)
    path, hint, ignore = directory / MANIFEST_FILE, f"; {hint}" if hint else "", set(ignore)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{path}: missing (an interrupted write, or a deleted file){hint}") from None
    except (OSError, ValueError) as err:
        raise ModelDirError(f"{path}: unreadable ({err}){hint}") from None
    expected = {"format": MANIFEST_FORMAT, "kind": kind, "format_version": MANIFEST_VERSION}
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or any(manifest.get(key) != value for key, value in expected.items())
        or not all(isinstance(entry, dict) and _inside(name) for name, entry in files.items())
    ):
        raise ModelDirError(
            f"{path}: not an mtrank {kind} manifest of format_version {MANIFEST_VERSION} (corrupt?){hint}"
        )
    extra = [name for name in list_files(directory) if name not in files and name not in ignore]
    if extra:
        raise ModelDirError(f"{directory / extra[0]}: not listed in {MANIFEST_FILE} (an extra file){hint}")
    for name, entry in files.items():
        if name in ignore:
            continue
        file = directory / name
        if not file.is_file():
            raise ModelDirError(f"{file}: missing (listed in {MANIFEST_FILE}){hint}")
        found = file_digest(file)
        if found["bytes"] != entry.get("bytes"):
            raise ModelDirError(
                f"{file}: {found['bytes']} bytes, {MANIFEST_FILE} says {entry.get('bytes')} (truncated or "
                f"replaced){hint}"
            )
        if found["sha256"] != entry.get("sha256"):
            raise ModelDirError(f"{file}: SHA-256 differs from {MANIFEST_FILE} (changed or corrupted){hint}")
    return manifest


def _inside(name: Any) -> bool:
    """A manifest entry names a file inside its directory (no absolute path, no ``..``)."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ("..",)
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts


# ------------------------------------------------------------------------------------------ model directory


def _seal_hint(directory: Path) -> str:
    return f"restore the directory from a good copy (after a deliberate change: `mtrank model seal {directory}`)"


def save_model(
    model: MultiTaskModel,
    directory: str | Path,
    extra: dict[str, Any] | None = None,
    plugins: list[str] | None = None,
    seal: bool = True,
) -> Path:
    """Write ``model`` to ``directory`` (created if needed); ``extra`` is stored in ``config.json``.

    ``plugins``: modules that register the model's expert / gate types (imported again when it is loaded).
    ``seal``: write ``manifest.json`` now; a writer that adds more files first (``mtrank train``: encoders,
    metrics) passes False and calls :func:`seal_model_dir` last.
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
    if seal:
        seal_model_dir(directory)
    return directory


def seal_model_dir(directory: str | Path) -> Path:
    """Write the manifest of a model directory over every file it holds now: the last step of writing one."""
    return write_manifest(directory, "model")


def add_to_manifest(directory: str | Path, paths: Iterable[str | Path]) -> None:
    """Record files just written into a sealed model directory (a blend, an export) in its manifest, after
    checking that every other file is as sealed. A directory without a manifest (format 1 / 2) is left as is."""
    directory = Path(directory)
    if not (directory / MANIFEST_FILE).is_file():
        return
    root = directory.resolve()
    names = [Path(p).resolve().relative_to(root).as_posix() for p in paths]
    manifest = verify_manifest(directory, "model", _seal_hint(directory), ignore=names)
    files = {**manifest["files"], **{name: file_digest(directory / name, sync=True) for name in names}}
    write_manifest(directory, "model", files)


def read_model_meta(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """``config.json`` of a model directory, its format checked, in the current format (format 1 converted).

    With ``verify`` (the default), every file is first checked against ``manifest.json``; a directory of
    format 1 or 2 without one loads with a warning, one of format 3 without one is refused."""
    directory = Path(directory)
    path = directory / "config.json"
    sealed = (directory / MANIFEST_FILE).is_file()
    if not (path.is_file() or sealed):
        raise ModelDirError(f"{directory}: not a model directory (no config.json)")
    if verify and sealed:
        verify_manifest(directory, "model", _seal_hint(directory))
    meta = _parse_config(path)
    version = meta["format_version"]
    if verify and not sealed:
        if version >= 3:
            raise ModelDirError(
                f"{directory / MANIFEST_FILE}: missing, and format_version {version} directories are sealed when "
                f"written (an interrupted write, or a deleted file); {_seal_hint(directory)}"
            )
        warnings.warn(
            f"{directory}: no {MANIFEST_FILE} (a format_version {version} model directory): its files are not "
            f"verified; add one with `mtrank model seal {directory}`",
            stacklevel=2,
        )
    if version == 1:  # mtrank 0.1: a flat model config, an experiment whose model section was flat too
        try:
            meta["model"] = nest_flat_model(meta["model"])
            experiment = meta.get("experiment")
            if isinstance(experiment, dict) and isinstance(experiment.get("model"), dict):
                flat = experiment["model"]
                nested = nest_flat_model(flat)
                nested.pop("tasks", None)
                nested["inputs"] = {"embedding_dim": flat.get("embedding_dim", 16)}
                experiment["model"] = nested
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ModelDirError(f"{path}: the format_version 1 model config cannot be read ({err!r})") from None
        meta["format_version"] = FORMAT_VERSION
    return meta


# what config.json's top-level keys must hold (when present; ``model`` always is)
META_TYPES = {"model": (dict, "a mapping"), "plugins": (list, "a list"), "experiment": (dict, "a mapping")}


def _parse_config(path: Path) -> dict[str, Any]:
    """``config.json`` parsed, its format, version and top-level types checked (one line naming it if not)."""
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path}: corrupt JSON ({err})") from None
    except (OSError, ValueError) as err:  # unreadable, not UTF-8
        raise ModelDirError(f"{path}: cannot be read ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelDirError(f"{path}: not an mtrank model (format={found!r})")
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ModelDirError(
            f"{path}: format_version {version!r} is not supported by this mtrank (reads {READABLE_VERSIONS}); "
            "re-export the model with a matching mtrank version"
        )
    if "model" not in meta:
        raise ModelDirError(f"{path}: no 'model' (the model config); the file is incomplete")
    for key, (kind, words) in META_TYPES.items():
        if key in meta and not isinstance(meta[key], kind):
            raise ModelDirError(f"{path}: '{key}' must be {words}, got {type(meta[key]).__name__}")
    if not all(isinstance(name, str) for name in meta.get("plugins", [])):
        raise ModelDirError(f"{path}: 'plugins' must be a list of module names")
    return meta


def model_config(meta: dict[str, Any], where: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a model directory's metadata (its plugins imported first)."""
    import_plugins(meta.get("plugins", []), path=f"{where}/config.json: plugins")
    try:
        return ModelConfig.from_dict(meta["model"], "model")
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # ConfigError, or a value of a wrong shape
        raise ModelDirError(f"{where}/config.json: {err}") from None


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", meta: dict[str, Any] | None = None
) -> MultiTaskModel:
    """Rebuild the model of a directory written by :func:`save_model`, in evaluation mode (its files verified
    by :func:`read_model_meta` unless ``meta`` is given: the metadata it already returned)."""
    directory = Path(directory)
    meta = read_model_meta(directory) if meta is None else meta
    config = model_config(meta, directory)
    try:
        model = MultiTaskModel(config)
    except (ValueError, TypeError, RuntimeError, IndexError) as err:
        raise ModelDirError(f"{directory}/config.json: the model cannot be built from it ({err})") from None
    weights_path = directory / "model.safetensors"
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ModelDirError(f"{weights_path}: cannot read weights ({err})") from None
    check_weights(state, model.state_dict(), weights_path)
    model.load_state_dict(state)
    return model.to(device).eval()


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: Path) -> None:
    """The loaded tensors are the model's (names, shapes, dtypes) and finite; else one line naming the tensor."""
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        raise ModelDirError(
            f"{where}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in state.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise ModelDirError(
                f"{where}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}; the model of config.json expects "
                f"{want.dtype} {list(want.shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelDirError(
                f"{where}: tensor {name!r} holds {bad} NaN/Inf value(s) of {tensor.numel()}; the model cannot score "
                "(a diverged training run, or a corrupted file): retrain it or restore the directory"
            )


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


def open_model_dir(directory: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> ModelDir:
    """Load everything a model directory holds, every file verified first (:func:`read_model_meta`; ``verify``
    False skips only the manifest, for ``mtrank model seal``); the encoders must agree with the model's inputs,
    and must be there when ``config.json`` names them."""
    path = Path(directory)
    meta = read_model_meta(path, verify=verify)
    model = load_model(path, device, meta=meta)
    encoder = None
    if meta.get("encoders") or "experiment" in meta or (path / ENCODERS_FILE).exists():
        encoder = _load_encoder(path, model)
    experiment = None
    if "experiment" in meta:
        try:
            experiment = experiment_from_dict(meta["experiment"], source=f"{path}/config.json")
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ModelDirError(str(err) if isinstance(err, ConfigError) else f"{path}/config.json: {err!r}") from None
    return ModelDir(path, model, meta, encoder, experiment)


def _load_encoder(path: Path, model: MultiTaskModel) -> FeatureEncoder:
    file = path / ENCODERS_FILE
    if not file.is_file():
        raise ModelDirError(
            f"{file}: missing; config.json says the model reads raw feature values through it (without it every "
            "request would be refused): restore the file from the directory `mtrank train` wrote"
        )
    try:
        encoder = FeatureEncoder.load(file)
    except ValueError as err:  # a DataError naming the file
        raise ModelDirError(str(err)) from None
    except (TypeError, KeyError, AttributeError, IndexError) as err:
        raise ModelDirError(f"{file}: not a valid encoder description ({err!r})") from None
    encoded = (encoder.num_dense, encoder.vocab_sizes)
    if encoded != (model.num_dense, model.vocab_sizes):
        raise ModelDirError(
            f"{file}: encoders give {encoded[0]} dense features and vocabularies {encoded[1]}; "
            f"the model expects {model.num_dense} and {model.vocab_sizes}"
        )
    embedded = [(n.column, n.type, n.edges) for n in model.config.inputs.numeric]
    try:
        fitted = [(n["column"], n["type"], n.get("edges", [])) for n in encoder.numeric_inputs]
    except (TypeError, KeyError, AttributeError) as err:
        raise ModelDirError(f"{file}: not a valid encoder description ({err!r})") from None
    if embedded != fitted:
        raise ModelDirError(
            f"{file}: the encoders' embedded numeric features (column, type, bin edges) {fitted} are not the "
            f"model's {embedded}; the two files come from different trainings"
        )
    return encoder
