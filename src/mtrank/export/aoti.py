"""torch.export + AOTInductor: ``(dense, sparse) -> scores [B, K]`` compiled ahead of time into a ``.pt2`` package.

The compiled path that replaces TorchScript (deprecated in torch 2.13; kept as the legacy ``torchscript``
format). :func:`torch.export.export` captures the scoring module as a graph with a dynamic batch dimension,
AOTInductor compiles it to a shared library with C++ kernels (this needs a C++ compiler: ``g++`` or ``cc``),
and :func:`torch._inductor.aoti_load_package` loads the package with no Python model code. Any batch size from 1
to :data:`MAX_BATCH` runs through the same package.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mtrank.export.common import random_inputs, scoring_module
from mtrank.model import MultiTaskModel

MAX_BATCH = 1 << 16  # the largest batch the package accepts (the dynamic dimension's upper bound)


def compiler() -> str | None:
    """The C++ compiler AOTInductor will call (``CXX``, else ``g++``, ``c++``, ``cc``), or None."""
    import os

    candidates = [os.environ.get("CXX"), "g++", "c++", "cc"]
    return next((found for name in candidates if name and (found := shutil.which(name))), None)


def export_aoti(model: MultiTaskModel, path: str | Path, batch: int = 8) -> Path:
    """Compile ``model``'s scoring module with torch.export + AOTInductor into the package ``path`` (``.pt2``).

    Example (skipped in the doctests: it compiles C++, ~30 s; ``tests/test_export_aoti.py`` runs it):
        >>> import tempfile
        >>> from mtrank import ModelConfig
        >>> model = MultiTaskModel(ModelConfig(inputs={"num_dense": 3, "vocab_sizes": [5]}))
        >>> with tempfile.TemporaryDirectory() as tmp:  # doctest: +SKIP
        ...     scorer = AotiScorer(export_aoti(model, Path(tmp) / "model.pt2"))
        ...     scorer(*random_inputs(model, batch=4)).shape  # any batch size
        torch.Size([4, 2])
    """
    if compiler() is None:
        raise RuntimeError(
            "export aoti: AOTInductor needs a C++ compiler (g++ or cc) on PATH; install one, or use --format onnx"
        )
    path = Path(path)
    module = scoring_module(model)
    dense, sparse = random_inputs(model, batch)
    rows = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(module, (dense, sparse), dynamic_shapes=({0: rows}, {0: rows}))
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))


class AotiScorer:
    """A compiled package, ready to call: ``(dense float32 [B, F_dense], sparse int64 [B, F_cat]) -> scores
    float32 [B, K]`` (tensors or numpy arrays in, a tensor out).

    Args:
        path: a ``.pt2`` package from :func:`export_aoti`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.runner = torch._inductor.aoti_load_package(str(self.path))

    def __call__(self, dense, sparse) -> torch.Tensor:
        dense = torch.as_tensor(dense, dtype=torch.float32)
        sparse = torch.as_tensor(sparse, dtype=torch.long)
        with torch.inference_mode():
            return self.runner(dense, sparse)
