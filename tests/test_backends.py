"""Every scoring backend x precision the Scorer runs on CPU scores a dense-only and a categorical model, and
agrees with eager fp32."""

import itertools

import pytest
import torch

from mtrank.config import ModelConfig, TaskConfig
from mtrank.export.common import random_inputs
from mtrank.export.precision import PRECISIONS
from mtrank.model import MultiTaskModel
from mtrank.serve.backends import BACKENDS, Scorer, check_backend

MODELS = {
    "dense_only": ModelConfig(inputs={"num_dense": 100}),
    "categorical": ModelConfig(
        inputs={"num_dense": 5, "vocab_sizes": [30, 7, 11], "embedding_dim": 4},
        tasks=[TaskConfig("click", "binary"), TaskConfig("watch", "regression")],
        block={"type": "mmoe", "num_experts": 4, "shared_hidden": [12]},
        experts={"hidden": [16, 8]},
        towers={"hidden": [6]},
    ),
}
# the largest difference from eager fp32 each precision may make (any backend)
TOLERANCES = {"fp32": 1e-5, "bf16": 0.05, "mixed": 0.01, "int8": 0.05}
UNCOMPILED = [
    ("eager", "fp32"),
    ("torchscript", "fp32"),
    ("onnx", "fp32"),
    ("eager", "bf16"),
    ("torchscript", "bf16"),
    ("eager", "mixed"),
    ("torchscript", "mixed"),
    ("eager", "int8"),
    ("onnx", "int8"),
]
# torch.compile takes seconds per model: one compiled precision per model kind, together both of compile's
COMPILED = {"dense_only": "bf16", "categorical": "fp32"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(MODELS))
def model_kind(request) -> str:
    return request.param


def supported_on_cpu() -> set[tuple[str, str]]:
    supported = set()
    for backend, precision in itertools.product(BACKENDS, PRECISIONS):
        try:
            if backend != "auto" and check_backend(backend, precision, "cpu") == backend:
                supported.add((backend, precision))
        except ValueError:
            pass
    return supported


AHEAD_OF_TIME = {("aoti", "fp32")}  # AOTInductor compiles C++ (~40 s): tests/test_export_aoti.py scores it


def test_the_paths_below_are_every_path_the_scorer_runs_on_cpu():
    tested = set(UNCOMPILED) | {("compile", precision) for precision in COMPILED.values()} | AHEAD_OF_TIME
    assert tested == supported_on_cpu()


def assert_scores_like_eager_fp32(model_kind: str, backend: str, precision: str) -> None:
    model = MultiTaskModel(MODELS[model_kind]).eval()
    dense, sparse = random_inputs(model, 16, seed=3)
    scores = Scorer(model, backend, precision)(dense, sparse)
    assert scores.dtype == torch.float32 and scores.shape == (16, 2)
    diff = (scores - model.predict(dense, sparse)).abs().max().item()
    assert diff <= TOLERANCES[precision]
    if backend == "eager" and precision == "fp32":
        assert diff <= 1e-6
    if precision != "fp32":
        assert diff > 0  # the reduced precision really ran


@pytest.mark.parametrize(("backend", "precision"), UNCOMPILED)
def test_every_path_scores_like_eager_fp32(model_kind, backend, precision):
    assert_scores_like_eager_fp32(model_kind, backend, precision)


def test_compiled_scores_are_like_eager_fp32(model_kind):
    assert_scores_like_eager_fp32(model_kind, "compile", COMPILED[model_kind])


def test_auto_backend_picks_onnxruntime_for_fp32_on_cpu_and_torchscript_for_bf16():
    model = MultiTaskModel(MODELS["categorical"])
    assert Scorer(model, "auto", "fp32").name == "onnx/fp32"
    assert Scorer(model, "auto", "mixed").name == "torchscript/mixed"


@pytest.mark.parametrize(
    ("backend", "precision", "message"),
    [
        ("onnx", "bf16", "backend onnx: runs fp32 or int8 on CPU"),
        ("compile", "mixed", "backend compile: Inductor folds the bf16 round trip"),
        ("torchscript", "int8", "backend torchscript: int8 runs with backend eager"),
        ("tensorrt", "fp32", "backend: unknown 'tensorrt'"),
        ("eager", "fp16", "fp16 inference is for GPUs"),
    ],
)
def test_a_backend_that_cannot_run_a_precision_says_what_can(backend, precision, message):
    with pytest.raises(ValueError, match=message):
        Scorer(MultiTaskModel(MODELS["categorical"]), backend, precision)
