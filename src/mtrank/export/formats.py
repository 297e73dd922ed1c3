"""Export a model for inference: TorchScript and ONNX of ``(dense, sparse) -> scores [B, K]``.

Both formats wrap :class:`~mtrank.model.ScoringModule` (probabilities for binary tasks, values for
regression) with a dynamic batch dimension. Every export is checked against eager PyTorch on random inputs
before it is kept (``max |diff| <= 1e-5`` in fp32); ONNX files are checked by running them in onnxruntime.

Files written next to the model (``MODEL_DIR/export/`` unless told otherwise):

===================  =====================================================================
``model.pt``         TorchScript (``torch.jit.trace``), load with ``torch.jit.load``
``model.onnx``       ONNX (opset 17, TorchScript-based exporter), inputs ``dense``, ``sparse``
``model.int8.onnx``  the ONNX model with int8 dynamic quantisation of its MatMuls (optional)
``export.json``      what was exported: format, tasks, inputs, the measured difference to eager
===================  =====================================================================
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtrank.artifacts import load_model
from mtrank.model import MultiTaskModel, ScoringModule

FORMATS = ("torchscript", "onnx")
FILENAMES = {"torchscript": "model.pt", "onnx": "model.onnx"}
EXPORT_TOLERANCE = 1e-5
ONNX_OPSET = 17


def random_inputs(model: MultiTaskModel, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``dense [B, F_dense]`` (N(0, 1)) and ``sparse [B, F_cat]`` (valid ids) for ``model``'s inputs."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, model.num_dense, generator=gen)
    if model.vocab_sizes:
        vocab = torch.tensor(model.vocab_sizes, dtype=torch.float64)
        sparse = (torch.rand(batch, len(vocab), generator=gen, dtype=torch.float64) * vocab).long()  # (B, F)
    else:
        sparse = torch.zeros(batch, 0, dtype=torch.long)
    return dense, sparse


def scoring_module(model: MultiTaskModel) -> ScoringModule:
    return ScoringModule(model.eval()).eval()


def export_torchscript(model: MultiTaskModel, path: str | Path, batch: int = 8) -> Path:
    """Trace ``(dense, sparse) -> scores`` to TorchScript. The trace is batch-size independent: the model
    has no data-dependent control flow, only branches on configuration and tensor rank."""
    path = Path(path)
    dense, sparse = random_inputs(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices
        traced = torch.jit.trace(scoring_module(model), (dense, sparse), check_trace=False)
        traced = torch.jit.freeze(traced.eval())
        torch.jit.save(traced, str(path))
    return path


def onnx_bytes(model: MultiTaskModel, batch: int = 8) -> bytes:
    """The ONNX serialisation of ``(dense, sparse) -> scores`` with a dynamic batch axis."""
    dense, sparse = random_inputs(model, batch)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            scoring_module(model),
            (dense, sparse),
            buffer,
            dynamo=False,  # TorchScript-based exporter: no onnxscript needed, constant-folds weight reshapes
            opset_version=ONNX_OPSET,
            input_names=["dense", "sparse"],
            output_names=["scores"],
            dynamic_axes={"dense": {0: "batch"}, "sparse": {0: "batch"}, "scores": {0: "batch"}},
            do_constant_folding=True,
        )
    return buffer.getvalue()


def export_onnx(model: MultiTaskModel, path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(onnx_bytes(model))
    return path


def quantize_onnx_int8(source: str | Path, target: str | Path) -> Path:
    """int8 dynamic quantisation of an ONNX model's MatMuls (weights per output channel, activations per batch
    at run time) with onnxruntime's quantiser."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source)).graph
    weights = {init.name: len(init.dims) for init in graph.initializer}
    # only MatMuls against a 2-D weight: the expert bank's first layer ([in, E*out], the bulk of the
    # FLOPs) and plain linears; onnxruntime's int8 MatMul has no per-channel form for batched
    # [G, in, out] weights
    nodes = [n.name for n in graph.node if n.op_type == "MatMul" and weights.get(n.input[1]) == 2]
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs a pre-processing hint at WARNING
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=nodes)
    return Path(target)


class OnnxScorer:
    """Runs an exported ONNX model in onnxruntime: ``(dense, sparse) -> scores [B, K]`` (float32 numpy).

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (0 = onnxruntime's default).
    """

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between runs: spinning threads would steal the cores PyTorch or the server needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # an input the graph does not read (``sparse`` of a model without categorical features) is dropped
        self.input_names = {i.name for i in self.session.get_inputs()}

    def __call__(self, dense: np.ndarray | torch.Tensor, sparse: np.ndarray | torch.Tensor) -> np.ndarray:
        feeds = {}
        if "dense" in self.input_names:
            feeds["dense"] = np.ascontiguousarray(_numpy(dense), dtype=np.float32)
        if "sparse" in self.input_names:
            feeds["sparse"] = np.ascontiguousarray(_numpy(sparse), dtype=np.int64)
        return self.session.run(["scores"], feeds)[0]


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def max_export_difference(model: MultiTaskModel, path: str | Path, fmt: str, batch: int = 64, seed: int = 1) -> float:
    """``max |scores(export) - scores(eager)|`` on random inputs (a batch size other than the tracing one)."""
    dense, sparse = random_inputs(model, batch, seed)
    with torch.inference_mode():
        expected = scoring_module(model)(dense, sparse).numpy()
        if fmt == "torchscript":
            got = torch.jit.load(str(path))(dense, sparse).numpy()
        elif fmt == "onnx":
            got = OnnxScorer(path)(dense, sparse)
        else:
            raise ValueError(f"format: unknown export format {fmt!r}; expected one of {FORMATS}")
    return float(np.abs(got - expected).max())


def export_model_dir(
    model_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    int8: bool = False,
    tolerance: float = EXPORT_TOLERANCE,
) -> dict[str, Any]:
    """Export the model of ``model_dir`` to ``fmt``, check it against eager PyTorch, write ``export.json``.

    Returns the record written to ``export.json``. Raises ``ValueError`` when the export differs from eager by
    more than ``tolerance`` (the file is removed then).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown export format {fmt!r}; expected one of {FORMATS}")
    model = load_model(model_dir)
    out_dir = Path(out) if out else Path(model_dir) / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILENAMES[fmt]
    (export_torchscript if fmt == "torchscript" else export_onnx)(model, path)
    diff = max_export_difference(model, path, fmt)
    if not diff <= tolerance:
        path.unlink(missing_ok=True)
        raise ValueError(f"{fmt} export differs from eager PyTorch by {diff:.3g} > {tolerance:g}; not written")
    record: dict[str, Any] = {
        "format": fmt,
        "file": path.name,
        "tasks": [t.name for t in model.tasks],
        "task_types": [t.type for t in model.tasks],
        "inputs": {
            "dense": ["batch", model.num_dense],
            "sparse": ["batch", len(model.vocab_sizes)],
        },
        "output": {"scores": ["batch", len(model.tasks)]},
        "max_abs_diff_vs_eager": diff,
    }
    if int8:
        if fmt != "onnx":
            raise ValueError("--int8: int8 export is for --format onnx (for PyTorch use precision='int8')")
        int8_path = quantize_onnx_int8(path, out_dir / "model.int8.onnx")
        record["int8_file"] = int8_path.name
        record["int8_max_abs_diff_vs_eager"] = max_export_difference(model, int8_path, "onnx")
    (out_dir / "export.json").write_text(json.dumps(record, indent=2))
    record["path"] = str(path)
    return record
