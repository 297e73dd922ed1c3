"""ONNX export (opset 17, inputs ``dense`` float32 ``[B, F_dense]`` and ``sparse`` int64 ``[B, F_cat]``, output
``scores`` ``[B, K]``, a dynamic batch axis), onnxruntime's int8 dynamic quantisation, and :class:`OnnxScorer`,
which runs a file in onnxruntime on CPU.

onnx and onnxruntime are imported by the functions that need them.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from mtrank.export.common import random_inputs, scoring_module
from mtrank.model import MultiTaskModel

ONNX_OPSET = 17


def onnx_bytes(model: MultiTaskModel, batch: int = 8) -> bytes:
    """The ONNX serialisation of ``model``'s ``(dense, sparse) -> scores`` (traced on ``batch`` random rows)."""
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
    """Write :func:`onnx_bytes` of ``model`` to ``path``.

    Example:
        >>> import tempfile
        >>> from mtrank import ModelConfig
        >>> from mtrank.export.common import max_difference
        >>> model = MultiTaskModel(ModelConfig(inputs={"num_dense": 3, "vocab_sizes": [5]}))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     scorer = OnnxScorer(export_onnx(model, Path(tmp) / "model.onnx"))  # the session holds the model
        >>> max_difference(model, scorer) <= 1e-5
        True
    """
    path = Path(path)
    path.write_bytes(onnx_bytes(model))
    return path


def quantize_onnx_int8(source: str | Path, target: str | Path) -> Path:
    """int8 dynamic quantisation of an ONNX model's MatMuls (weights per output channel, activations per batch
    at run time) with onnxruntime's quantiser; returns ``target``."""
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
    """Runs an exported ONNX model in onnxruntime on CPU: ``(dense [B, F_dense], sparse [B, F_cat]) -> scores
    [B, K]`` (float32 numpy; the inputs may be numpy arrays or CPU tensors).

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
