"""Export files (TorchScript, ONNX run in onnxruntime, int8 ONNX) agree with eager PyTorch; `mtrank export`."""

import json

import pytest
import torch

from mtrank.artifacts import ModelDirError, save_model, seal_model_dir
from mtrank.config import ModelConfig, TaskConfig
from mtrank.export.common import random_inputs
from mtrank.export.model_dir import export_model_dir
from mtrank.export.onnx import OnnxScorer
from mtrank.export.torchscript import load_torchscript
from mtrank.model import MultiTaskModel

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


LOADERS = {"torchscript": load_torchscript, "onnx": OnnxScorer}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_eager_within_1e_5_at_a_batch_size_it_never_saw(model_dir, fmt):
    record = export_model_dir(model_dir, fmt)
    assert record["max_abs_diff_vs_eager"] <= 1e-5
    written = json.loads((model_dir / "export" / "export.json").read_text())
    assert written["format"] == fmt and written["tasks"] == ["click", "watch"]
    assert written["inputs"] == {"dense": ["batch", 5], "sparse": ["batch", 3]}
    model = MultiTaskModel(small_config())
    dense, sparse = random_inputs(model, 33, seed=5)
    got = torch.as_tensor(LOADERS[fmt](record["path"])(dense, sparse))
    torch.testing.assert_close(got, model.predict(dense, sparse), atol=1e-5, rtol=0)


def test_an_export_beyond_the_tolerance_is_refused_and_removed(model_dir):
    with pytest.raises(ValueError, match="onnx export differs from eager PyTorch by .* > -1; not written"):
        export_model_dir(model_dir, "onnx", tolerance=-1.0)
    assert not (model_dir / "export" / "model.onnx").exists()
    assert not (model_dir / "export" / "export.json").exists()


def test_int8_export_is_for_onnx_only_and_nothing_is_written_otherwise(model_dir):
    with pytest.raises(ValueError, match="--int8: int8 export is for --format onnx"):
        export_model_dir(model_dir, "torchscript", int8=True)
    assert not (model_dir / "export" / "model.pt").exists()


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
    seal_model_dir(model_dir)  # sealed as it is: the format check refuses it, not the checksum
    with pytest.raises(ModelDirError, match="format_version 99"):
        export_model_dir(model_dir, "onnx")


def test_export_command_prints_the_difference_and_fails_cleanly(model_dir, tmp_path, capsys):
    from mtrank.cli import main

    assert main(["export", str(model_dir), "--format", "onnx", "--int8", "--out", str(tmp_path / "out")]) == 0
    assert "max |score - eager|" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "model.int8.onnx").is_file()
    assert main(["export", str(tmp_path / "missing"), "--format", "onnx"]) == 1
    assert "no config.json" in capsys.readouterr().err
