"""Scorers: one call ``(dense, sparse) -> scores [B, K]`` over every inference path mtrank offers.

==============  =============================  =========================================================
backend         precisions                     what runs
==============  =============================  =========================================================
``eager``       fp32, bf16, mixed, fp16, int8  PyTorch modules (see :mod:`mtrank.export.precision`)
``compile``     fp32, bf16, fp16               ``torch.compile`` of the same (Inductor; first call compiles)
``torchscript`` fp32, bf16, mixed, fp16        ``torch.jit.trace`` + ``freeze``
``onnx``        fp32, int8                     onnxruntime on CPU (int8: its dynamic quantisation)
``aoti``        fp32                           torch.export + AOTInductor, compiled ahead of time (CPU)
==============  =============================  =========================================================

TorchScript is deprecated in torch 2.13 and kept as a legacy option; ``aoti`` is the compiled PyTorch path.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from mtrank.export.aoti import AotiScorer, export_aoti
from mtrank.export.common import random_inputs
from mtrank.export.onnx import OnnxScorer, export_onnx, quantize_onnx_int8
from mtrank.export.precision import PrecisionScoring, check_precision, inference_model
from mtrank.export.torchscript import trace
from mtrank.model import MultiTaskModel

BACKENDS = ("auto", "eager", "compile", "torchscript", "onnx", "aoti")


def resolve_backend(backend: str, precision: str, device: str | torch.device) -> str:
    """``auto``: onnxruntime for fp32 / int8 on CPU (the fastest exact path in docs/serving.md), else
    TorchScript."""
    if backend != "auto":
        return backend
    if torch.device(device).type == "cpu" and precision in ("fp32", "int8"):
        return "onnx"
    return "torchscript"


def check_backend(backend: str, precision: str, device: str | torch.device = "cpu") -> str:
    """The backend that runs ``precision`` on ``device`` (``auto`` resolved); ``ValueError`` naming the problem
    when the three do not go together (see the table above).

    Example:
        >>> check_backend("auto", "int8")
        'onnx'
        >>> check_backend("onnx", "bf16")
        Traceback (most recent call last):
        ...
        ValueError: backend onnx: runs fp32 or int8 on CPU; use eager/compile/torchscript for bf16, mixed, fp16
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown {backend!r}; expected one of {BACKENDS}")
    backend = resolve_backend(backend, precision, device)
    check_precision(precision, device)
    if backend == "onnx" and (precision not in ("fp32", "int8") or torch.device(device).type != "cpu"):
        raise ValueError("backend onnx: runs fp32 or int8 on CPU; use eager/compile/torchscript for bf16, mixed, fp16")
    if backend == "compile" and precision == "mixed":
        raise ValueError(
            "backend compile: Inductor folds the bf16 round trip that splits the input (x - bf16(x)), "
            "which undoes 'mixed'; use eager or torchscript for mixed"
        )
    if backend == "aoti" and (precision != "fp32" or torch.device(device).type != "cpu"):
        raise ValueError("backend aoti: runs fp32 on CPU here; use eager/compile/torchscript for other precisions")
    if precision == "int8" and backend not in ("eager", "onnx"):
        raise ValueError(f"backend {backend}: int8 runs with backend eager (PyTorch) or onnx (onnxruntime)")
    return backend


class Scorer:
    """Scores candidates with one backend and precision: ``(dense float32 [B, F_dense], sparse int64
    [B, F_cat]) -> scores float32 [B, K]`` (CPU tensors or numpy in, a CPU tensor out).

    Args:
        model: the float32 model.
        backend: one of :data:`BACKENDS` (``auto``: see :func:`resolve_backend`).
        precision: ``fp32``, ``bf16``, ``mixed``, ``fp16`` or ``int8`` (see the table above for what each
            backend takes).
        device: ``cpu`` or ``cuda`` (the ``onnx`` backend is CPU only).
        threads: onnxruntime intra-op threads (0 = its default); PyTorch uses ``torch.set_num_threads``.
        package: with backend ``aoti``, a package from ``mtrank export --format aoti`` (else the model is
            compiled now, which takes tens of seconds).

    Example:
        >>> from mtrank.config import ModelConfig
        >>> from mtrank.export.common import random_inputs
        >>> model = MultiTaskModel(ModelConfig(inputs={"num_dense": 4, "vocab_sizes": [10]}))
        >>> dense, sparse = random_inputs(model, 16)
        >>> scorer = Scorer(model, "torchscript", "bf16")
        >>> scores = scorer(dense, sparse)
        >>> scorer.name, scores.shape, scores.dtype
        ('torchscript/bf16', torch.Size([16, 2]), torch.float32)
        >>> bool((scores - model.predict(dense, sparse)).abs().max() < 0.05)
        True
    """

    def __init__(
        self,
        model: MultiTaskModel,
        backend: str = "eager",
        precision: str = "fp32",
        device: str = "cpu",
        threads: int = 0,
        package: str | Path | None = None,
    ) -> None:
        self.backend = check_backend(backend, precision, device)
        self.precision, self.device = precision, torch.device(device)
        self.task_names = model.task_names
        self._onnx: OnnxScorer | None = None
        self._module: torch.nn.Module | AotiScorer | None = None
        if self.backend == "aoti":
            if package is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="mtrank-aoti-")
                package = export_aoti(model, Path(self._tmp.name) / "model.pt2")
            self._module = AotiScorer(package)
            return
        if self.backend == "onnx":
            self._tmp = tempfile.TemporaryDirectory(prefix="mtrank-onnx-")
            path = export_onnx(model, Path(self._tmp.name) / "model.onnx")
            if precision == "int8":
                path = quantize_onnx_int8(path, Path(self._tmp.name) / "model.int8.onnx")
            self._onnx = OnnxScorer(path, threads=threads)
            return
        module = PrecisionScoring(inference_model(model, precision, device)).eval()
        if self.backend == "compile":
            module = torch.compile(module, dynamic=True)
        elif self.backend == "torchscript":
            dense, sparse = random_inputs(model, 8)
            with torch.inference_mode():
                module = trace(module, dense.to(self.device), sparse.to(self.device))
        self._module = module

    @property
    def name(self) -> str:
        """``backend/precision``, e.g. ``onnx/fp32``."""
        return f"{self.backend}/{self.precision}"

    def __call__(self, dense: torch.Tensor | np.ndarray, sparse: torch.Tensor | np.ndarray) -> torch.Tensor:
        if self._onnx is not None:
            return torch.from_numpy(self._onnx(dense, sparse))
        dense = torch.as_tensor(dense, dtype=torch.float32).to(self.device, non_blocking=True)
        sparse = torch.as_tensor(sparse, dtype=torch.long).to(self.device, non_blocking=True)
        with torch.inference_mode():
            scores = self._module(dense, sparse)
        return scores.float().cpu()
