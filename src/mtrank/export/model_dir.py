"""``mtrank export``: a model directory exported to AOTInductor, TorchScript or ONNX, checked, in ``export.json``.

Files written (``MODEL_DIR/export/`` unless told otherwise):

===================  =====================================================================
``model.pt2``        torch.export + AOTInductor package (:mod:`mtrank.export.aoti`), the compiled path
``model.pt``         TorchScript (:mod:`mtrank.export.torchscript`, legacy), load with ``torch.jit.load``
``model.onnx``       ONNX (:mod:`mtrank.export.onnx`), inputs ``dense``, ``sparse``, output ``scores``
``model.int8.onnx``  the ONNX model with int8 dynamic quantisation of its MatMuls (optional)
``export.json``      what was exported: format, tasks, inputs, the measured difference to eager
===================  =====================================================================

An export is kept only if its scores are within ``max |diff| / max(1, |score|) <= 1e-5`` of eager PyTorch on
random inputs of another batch size (:func:`mtrank.export.common.max_difference`: absolute for probabilities,
relative for regression values beyond 1); ONNX files are checked by running them in onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtrank.artifacts import add_to_manifest, open_model_dir
from mtrank.export.aoti import AotiScorer, export_aoti
from mtrank.export.common import EXPORT_TOLERANCE, max_difference
from mtrank.export.onnx import OnnxScorer, export_onnx, quantize_onnx_int8
from mtrank.export.torchscript import export_torchscript, load_torchscript

AOTI_FILE = "model.pt2"  # MODEL_DIR/export/model.pt2: what `mtrank serve --backend aoti` loads when present
# format -> (file name, write the model to a path, load a path as a scorer)
FORMATS = {
    "aoti": (AOTI_FILE, export_aoti, AotiScorer),
    "torchscript": ("model.pt", export_torchscript, load_torchscript),
    "onnx": ("model.onnx", export_onnx, OnnxScorer),
}


def export_model_dir(
    model_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    int8: bool = False,
    tolerance: float = EXPORT_TOLERANCE,
) -> dict[str, Any]:
    """Export the model of ``model_dir`` to ``fmt``, check it against eager PyTorch, write ``export.json``.

    Args:
        model_dir: a model directory written by mtrank.
        fmt: ``aoti``, ``torchscript`` or ``onnx``.
        out: the output folder (default ``MODEL_DIR/export``).
        int8: with ``onnx``, also write ``model.int8.onnx``.
        tolerance: the largest accepted score difference to eager PyTorch.

    Returns the record written to ``export.json``, plus ``path``, the exported file. Raises ``ValueError``
    when the export differs from eager by more than ``tolerance`` (the file is removed then).

    Example:
        >>> import tempfile
        >>> from mtrank import ModelConfig, MultiTaskModel
        >>> from mtrank.artifacts import save_model
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     record = export_model_dir(save_model(MultiTaskModel(ModelConfig(inputs={"num_dense": 3})), tmp), "onnx")
        >>> record["file"], record["inputs"], record["max_abs_diff_vs_eager"] <= 1e-5
        ('model.onnx', {'dense': ['batch', 3], 'sparse': ['batch', 0]}, True)
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown export format {fmt!r}; expected one of {tuple(FORMATS)}")
    if int8 and fmt != "onnx":
        raise ValueError("--int8: int8 export is for --format onnx (for PyTorch use precision='int8')")
    filename, export, load = FORMATS[fmt]
    model = open_model_dir(model_dir).model  # every file verified, encoders and experiment included
    out_dir = Path(out) if out else Path(model_dir) / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = export(model, out_dir / filename)
    diff = max_difference(model, load(path))
    if not diff <= tolerance:
        path.unlink(missing_ok=True)
        raise ValueError(f"{fmt} export differs from eager PyTorch by {diff:.3g} > {tolerance:g}; not written")
    record: dict[str, Any] = {
        "format": fmt,
        "file": path.name,
        "tasks": model.task_names,
        "task_types": [t.type for t in model.tasks],
        "inputs": {"dense": ["batch", model.num_dense], "sparse": ["batch", len(model.vocab_sizes)]},
        "output": {"scores": ["batch", len(model.tasks)]},
        "max_abs_diff_vs_eager": diff,
    }
    if int8:
        int8_path = quantize_onnx_int8(path, out_dir / "model.int8.onnx")
        record["int8_file"] = int8_path.name
        record["int8_max_abs_diff_vs_eager"] = max_difference(model, OnnxScorer(int8_path))
    (out_dir / "export.json").write_text(json.dumps(record, indent=2))
    if out_dir.resolve().is_relative_to(Path(model_dir).resolve()):  # MODEL_DIR/export: recorded in its manifest
        add_to_manifest(model_dir, [p for p in out_dir.rglob("*") if p.is_file()])
    record["path"] = str(path)
    return record
