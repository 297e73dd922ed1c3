"""Export (TorchScript, ONNX in onnxruntime) and reduced-precision scorers agree with eager PyTorch."""

import json

import pytest
import torch

from mtrank.artifacts import ModelDirError, save_model
from mtrank.config import ModelConfig, TaskConfig
from mtrank.export.formats import OnnxScorer, export_model_dir, random_inputs
from mtrank.export.precision import check_precision
from mtrank.model import MultiTaskModel
from mtrank.serve.backends import Scorer

TASKS = [TaskConfig("click", "binary"), TaskConfig("watch", "regression")]


def small_config(block="mmoe", num_dense=5, vocab_sizes=(30, 7, 11), shared_hidden=()):
    return ModelConfig(
        inputs={"num_dense": num_dense, "vocab_sizes": list(vocab_sizes), "embedding_dim": 4},
        tasks=TASKS,
        block={"type": block, "num_experts": 4, "task_experts": 1, "shared_hidden": list(shared_hidden)},
        experts={"hidden": [16, 8]},
        towers={"hidden": [6]},
    )


@pytest.fixture
def model_dir(tmp_path):
    directory = tmp_path / "model"
    save_model(MultiTaskModel(small_config()), directory)
    return directory


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_eager_within_1e_5(model_dir, fmt):
    record = export_model_dir(model_dir, fmt)
    assert record["max_abs_diff_vs_eager"] <= 1e-5
    written = json.loads((model_dir / "export" / "export.json").read_text())
    assert written["format"] == fmt and written["tasks"] == ["click", "watch"]


@pytest.mark.parametrize("block", ["mmoe", "omoe", "cgc", "shared_bottom", "single_task"])
@pytest.mark.parametrize("inputs", [(5, (30, 7)), (0, (30, 7)), (5, ())])
def test_onnx_runs_in_onnxruntime_for_every_block_and_input_mix(tmp_path, block, inputs):
    num_dense, vocab = inputs
    model = MultiTaskModel(small_config(block, num_dense, vocab, shared_hidden=[12] if block == "omoe" else []))
    save_model(model, tmp_path / "m")
    record = export_model_dir(tmp_path / "m", "onnx")
    dense, sparse = random_inputs(model, 33, seed=5)  # a batch size the export never saw
    got = torch.from_numpy(OnnxScorer(record["path"])(dense, sparse))
    torch.testing.assert_close(got, model.predict(dense, sparse), atol=1e-5, rtol=0)


def test_int8_onnx_export_stays_close_to_fp32(model_dir):
    record = export_model_dir(model_dir, "onnx", int8=True)
    assert (model_dir / "export" / record["int8_file"]).is_file()
    assert 0 < record["int8_max_abs_diff_vs_eager"] < 0.05


def test_export_rejects_unknown_format_and_bad_model_dir(model_dir, tmp_path):
    with pytest.raises(ValueError, match="--format"):
        export_model_dir(model_dir, "tflite")
    with pytest.raises(ModelDirError, match="no config.json"):
        export_model_dir(tmp_path / "nothing-here", "onnx")


def test_export_refuses_a_model_dir_of_another_format_version(model_dir):
    meta = json.loads((model_dir / "config.json").read_text())
    meta["format_version"] = 99
    (model_dir / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="format_version 99"):
        export_model_dir(model_dir, "onnx")


@pytest.mark.parametrize(
    ("backend", "precision", "tolerance"),
    [
        ("eager", "fp32", 1e-6),
        ("torchscript", "fp32", 1e-5),
        ("onnx", "fp32", 1e-5),
        ("eager", "bf16", 0.05),
        ("torchscript", "bf16", 0.05),
        ("eager", "mixed", 0.01),
        ("torchscript", "mixed", 0.01),
        ("eager", "int8", 0.05),
        ("onnx", "int8", 0.05),
    ],
)
def test_scorers_agree_with_fp32_eager(backend, precision, tolerance):
    model = MultiTaskModel(small_config(shared_hidden=[12])).eval()
    dense, sparse = random_inputs(model, 64, seed=3)
    scores = Scorer(model, backend, precision)(dense, sparse)
    assert scores.dtype == torch.float32 and scores.shape == (64, 2)
    diff = (scores - model.predict(dense, sparse)).abs().max().item()
    assert diff <= tolerance
    if precision != "fp32":
        assert diff > 0  # the reduced precision really ran


def test_mixed_precision_splits_the_input_and_is_closer_to_fp32_than_bf16():
    torch.manual_seed(1)
    config = small_config()
    model = MultiTaskModel(config).eval()
    with torch.no_grad():  # larger weights than at init, so rounding errors show
        for layer in model.block.levels[0].experts.layers:
            layer.weight.mul_(4)
    dense, sparse = random_inputs(model, 256, seed=4)
    reference = model.predict(dense, sparse)
    errors = {p: (Scorer(model, "eager", p)(dense, sparse) - reference).abs().max().item() for p in ("bf16", "mixed")}
    assert 0 < errors["mixed"] < errors["bf16"]


def test_int8_quantises_the_expert_layers():
    from mtrank.export.precision import Int8StackedLinear, quantize_int8

    model = MultiTaskModel(small_config())
    qmodel = quantize_int8(model)
    assert all(isinstance(layer, Int8StackedLinear) for layer in qmodel.block.levels[0].experts.layers)
    assert model.block.levels[0].experts.layers[0].weight.dtype == torch.float32  # the original is untouched


def test_precision_checks_name_the_problem():
    with pytest.raises(ValueError, match="fp16 inference is for GPUs"):
        check_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown 'fp8'"):
        check_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="backend onnx"):
        Scorer(MultiTaskModel(small_config()), "onnx", "bf16")


def test_export_command_prints_the_difference_and_fails_cleanly(model_dir, tmp_path, capsys):
    from mtrank.cli import main

    assert main(["export", str(model_dir), "--format", "onnx", "--int8", "--out", str(tmp_path / "out")]) == 0
    assert "max |score - eager|" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "model.int8.onnx").is_file()
    assert main(["export", str(tmp_path / "missing"), "--format", "onnx"]) == 1
    assert "no config.json" in capsys.readouterr().err


def test_auto_backend_picks_onnxruntime_for_fp32_on_cpu_and_torchscript_for_bf16():
    model = MultiTaskModel(small_config())
    assert Scorer(model, "auto", "fp32").name == "onnx/fp32"
    assert Scorer(model, "auto", "mixed").name == "torchscript/mixed"


@pytest.mark.parametrize("variant", [{"block": {"type": "ple", "levels": 2}}, {"experts": "dcn"}])
def test_reduced_precisions_cover_every_level_and_dcn_experts(variant):
    import dataclasses

    from mtrank.export.precision import mixed_precision, quantize_int8

    model = MultiTaskModel(dataclasses.replace(small_config(), **variant)).eval()
    dense, sparse = random_inputs(model, 64, seed=2)
    reference = model.predict(dense, sparse)
    for reduced, tolerance in ((mixed_precision(model), 1e-2), (quantize_int8(model), 5e-2)):
        diff = (reduced.predict(dense, sparse) - reference).abs().max().item()
        assert 0 < diff < tolerance
