"""Conflict diagnostics: ``mtrank diagnose`` on a model directory, the training report's section, and the
measured gradient cosine following the synthetic tasks' correlation."""

import json

import pytest
import torch
import yaml

from mtrank.cli import main
from mtrank.config import ModelConfig, TaskConfig, TrainConfig
from mtrank.data import make_synthetic
from mtrank.evaluate.conflict import gram_matrices, shared_layers, shared_parameter_masks, task_gradients
from mtrank.model import MultiTaskModel
from mtrank.train import Trainer
from mtrank.train.balancing import diagnose
from tabular_helpers import config, make_frame, one_torch_thread  # noqa: F401


def test_per_layer_gram_matrices_sum_to_the_overall_one_and_match_a_plain_dot_product():
    model = MultiTaskModel(ModelConfig(inputs={"num_dense": 10}, block={"type": "ple", "num_experts": 2}), seed=0)
    out = model(torch.randn(32, 10), torch.zeros(32, 0, dtype=torch.long))
    losses = (out.task_logits**2).mean(0)  # (K,)
    named = list(model.named_parameters())
    grads = dict(zip([n for n, _ in named], task_gradients(losses, [p for _, p in named], "loop")))
    masks = shared_parameter_masks(grads)
    assert not any(name.startswith("block.towers") for name in masks)
    grams = gram_matrices(grads, masks, shared_layers(masks))
    flat = torch.stack([torch.cat([(grads[n][k] * masks[n]).flatten() for n in masks]) for k in range(2)]).double()
    torch.testing.assert_close(grams["overall"], flat @ flat.T)
    torch.testing.assert_close(sum(v for k, v in grams.items() if k != "overall"), grams["overall"])


def test_batched_task_gradients_equal_the_loop():
    model = MultiTaskModel(ModelConfig(inputs={"num_dense": 10}), seed=0)
    out = model(torch.randn(16, 10), torch.zeros(16, 0, dtype=torch.long))
    losses = (out.task_logits**2).mean(0)
    params = list(model.parameters())
    loop = task_gradients(losses, params, "loop", retain_graph=True)
    batched = task_gradients(losses, params, "batched")
    for a, b in zip(loop, batched):
        torch.testing.assert_close(a, b)


def _cosine_after_training(correlation: float, seed: int) -> float:
    tasks = [TaskConfig("y1", "regression"), TaskConfig("y2", "regression")]
    config = ModelConfig(
        inputs={"num_dense": 100}, tasks=tasks, block={"type": "shared_bottom"}, experts={"hidden": [16]}
    )
    data = make_synthetic(n=2000, correlation=correlation, seed=seed)
    model = MultiTaskModel(config, seed=seed)
    Trainer(model, TrainConfig(steps=150, batch_size=64, lr=3e-3, progress=False, seed=seed)).fit(data)
    return diagnose(model, data, batches=4, batch_size=256)["conflict"]["pairs"]["y1~y2"]["cosine"]


def test_measured_gradient_cosine_falls_as_the_synthetic_correlation_falls():
    cosines = {p: sum(_cosine_after_training(p, seed) for seed in (0, 1)) / 2 for p in (1.0, 0.5, -0.5)}
    assert cosines[1.0] > cosines[0.5] > cosines[-0.5]
    assert cosines[1.0] > 0.3 and cosines[-0.5] < 0


@pytest.fixture
def model_dir(tmp_path):
    make_frame(n=300).to_csv(tmp_path / "rows.csv", index=False)
    raw = config(
        data={"train": "rows.csv"},
        train={"epochs": 2, "batch_size": 32, "progress": False, "balancing": {"type": "pcgrad", "conflict_every": 3}},
    )
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    return tmp_path


def test_training_with_conflict_every_writes_the_report_section_and_figure(model_dir):
    report = (model_dir / "m" / "report.md").read_text()
    assert "## Task conflict" in report and "![task conflict](conflict.png)" in report
    assert (model_dir / "m" / "conflict.png").stat().st_size > 1000
    assert main(["model", "verify", str(model_dir / "m")]) == 0  # the figure is sealed with the rest


def test_mtrank_diagnose_prints_cosines_trend_and_gates_and_writes_json(model_dir, capsys):
    out = model_dir / "diag"
    code = main(
        [
            "diagnose",
            str(model_dir / "m"),
            str(model_dir / "rows.csv"),
            "--batches",
            "2",
            "--batch-size",
            "64",
            "--out",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "task conflict on 128 rows" in text and "over training" in text and "gates:" in text
    report = json.loads((out / "diagnose.json").read_text())
    pair = next(iter(report["conflict"]["pairs"].values()))
    assert -1 <= pair["cosine"] <= 1 and pair["norm_ratio"] > 0 and pair["layers"]
    assert report["gates"]["tasks"] and (out / "conflict.png").is_file()


def test_mtrank_diagnose_on_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path / "nope"), str(tmp_path / "rows.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err
