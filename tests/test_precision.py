"""Reduced-precision copies of a model (bf16, mixed, int8): what they rewrite, and how close they stay to fp32."""

import dataclasses

import pytest
import torch

from mtrank.config import ModelConfig, TaskConfig
from mtrank.export.common import random_inputs
from mtrank.export.precision import Int8StackedLinear, check_precision, mixed_precision, quantize_int8
from mtrank.model import MultiTaskModel
from mtrank.serve.backends import Scorer

CONFIG = ModelConfig(
    inputs={"num_dense": 5, "vocab_sizes": [30, 7, 11], "embedding_dim": 4},
    tasks=[TaskConfig("click", "binary"), TaskConfig("watch", "regression")],
    block={"type": "mmoe", "num_experts": 4, "task_experts": 1},
    experts={"hidden": [16, 8]},
    towers={"hidden": [6]},
)


def test_mixed_precision_splits_the_input_and_is_closer_to_fp32_than_bf16():
    model = MultiTaskModel(CONFIG).eval()
    with torch.no_grad():  # larger weights than at init, so rounding errors show
        for layers, _ in model.expert_banks():
            for layer in layers:
                layer.weight.mul_(4)
    dense, sparse = random_inputs(model, 256, seed=4)
    reference = model.predict(dense, sparse)
    errors = {p: (Scorer(model, "eager", p)(dense, sparse) - reference).abs().max().item() for p in ("bf16", "mixed")}
    assert 0 < errors["mixed"] < errors["bf16"]


def test_int8_quantises_the_expert_layers_of_a_copy():
    model = MultiTaskModel(CONFIG)
    qmodel = quantize_int8(model)
    assert all(isinstance(layer, Int8StackedLinear) for layers, _ in qmodel.expert_banks() for layer in layers)
    assert all(layer.weight.dtype == torch.float32 for layers, _ in model.expert_banks() for layer in layers)


@pytest.mark.parametrize("variant", [{"block": {"type": "ple", "levels": 2}}, {"experts": "dcn"}])
def test_reduced_precisions_cover_every_level_and_dcn_experts(variant):
    model = MultiTaskModel(dataclasses.replace(CONFIG, **variant)).eval()
    dense, sparse = random_inputs(model, 64, seed=2)
    reference = model.predict(dense, sparse)
    for reduced, tolerance in ((mixed_precision(model), 1e-2), (quantize_int8(model), 5e-2)):
        diff = (reduced.predict(dense, sparse) - reference).abs().max().item()
        assert 0 < diff < tolerance


@pytest.mark.parametrize(
    ("precision", "device", "message"),
    [
        ("fp16", "cpu", "fp16 inference is for GPUs"),
        ("fp8", "cpu", "unknown 'fp8'"),
    ],
)
def test_precision_checks_name_the_problem(precision, device, message):
    with pytest.raises(ValueError, match=message):
        check_precision(precision, device)
