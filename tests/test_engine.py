"""The one training loop: checkpoints that refuse another configuration, set a damaged one aside, and
resume ensembles; the history it logs (JSON lines, TensorBoard); the monitored metric checked."""

import json

import pytest
import torch

from mtrank.config import ConfigError, ModelConfig, TaskConfig, TrainConfig
from mtrank.data import make_synthetic
from mtrank.model import MultiTaskModel
from mtrank.train import Ensemble, EnsembleData, Trainer

TASKS = [TaskConfig("y1", "regression"), TaskConfig("y2", "regression")]


def model(block: str = "mmoe", seed: int = 0) -> MultiTaskModel:
    config = ModelConfig(inputs={"num_dense": 100}, tasks=TASKS, block={"type": block, "num_experts": 3})
    return MultiTaskModel(config, seed=seed)


def splits():
    data = make_synthetic(n=900, seed=0)
    return data[:700], data[700:]


def fit(tmp_path, m=None, **train):
    config = TrainConfig(
        **{"batch_size": 100, "epochs": 2, "progress": False, "checkpoint_dir": str(tmp_path), **train}
    )
    return Trainer(m if m is not None else model(), config).fit(*splits())


def test_a_checkpoint_of_another_learning_rate_or_block_is_refused_naming_what_changed(tmp_path):
    fit(tmp_path, lr=1e-3)
    with pytest.raises(ConfigError, match=r"train.lr 0.001 -> 0.004.*--overwrite"):
        fit(tmp_path, lr=4e-3)
    with pytest.raises(ConfigError, match=r'runs.model.block.type "mmoe" -> "omoe"'):
        fit(tmp_path, m=model("omoe"), lr=1e-3)


def test_overwrite_starts_afresh_and_require_insists_on_a_checkpoint(tmp_path):
    first = fit(tmp_path, lr=1e-3)
    fresh = fit(tmp_path, lr=4e-3, resume="overwrite")
    assert fresh.resumed_from == 0 and fresh.steps == first.steps
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        fit(tmp_path / "empty", resume="require")


def test_more_epochs_with_a_constant_schedule_continue_the_same_run(tmp_path):
    fit(tmp_path, epochs=2)
    longer = fit(tmp_path, epochs=3)
    assert longer.resumed_from == 14 and longer.steps == 21


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_complete_one_resumed(tmp_path):
    """Each checkpoint is a folder sealed by its manifest: one whose files fail it is never loaded, even in part
    (every kill moment of a write: tests/test_faults_checkpoint.py)."""
    full = model()
    uninterrupted = fit(tmp_path / "a", m=full, epochs=3)
    ckpt = tmp_path / "b"
    fit(ckpt, epochs=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000007", "step-000000014"]  # keep_checkpoints: 2
    optimizer = ckpt / "step-000000014" / "optimizer.safetensors"
    flipped = bytearray(optimizer.read_bytes())
    flipped[-1] ^= 1  # one bit of the newest optimizer state
    optimizer.write_bytes(bytes(flipped))
    (ckpt / "step-000000021.partial").mkdir()  # and a write killed half-way
    resumed = model(seed=99)
    with pytest.warns(UserWarning, match=r"step-000000014/optimizer.safetensors: SHA-256 differs.*previous complete"):
        result = fit(ckpt, m=resumed, epochs=3)
    assert result.resumed_from == 7
    assert [h["valid/loss"] for h in result.history] == [h["valid/loss"] for h in uninterrupted.history]
    for name, weight in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], weight), name
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000014", "step-000000014.corrupt", "step-000000021"]
    assert fit(ckpt, epochs=3, resume="overwrite").resumed_from == 0
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000000014", "step-000000021"]


def test_an_interrupted_ensemble_resumes_to_the_uninterrupted_ensembles_weights(tmp_path):
    config = ModelConfig(inputs={"num_dense": 100}, tasks=TASKS, block={"num_experts": 2}, experts={"hidden": [8]})
    parts = [make_synthetic(n=500, seed=s) for s in (3, 4)]
    train, valid = EnsembleData.stack([p[:400] for p in parts]), EnsembleData.stack([p[400:] for p in parts])

    def run(epochs, ckpt=""):
        ensemble = Ensemble(config, [3, 4])
        cfg = TrainConfig(batch_size=50, epochs=epochs, eval_every=4, progress=False, checkpoint_dir=ckpt)
        return ensemble, ensemble.fit(train, valid, cfg)

    full, full_result = run(4)
    run(2, str(tmp_path))
    resumed, resumed_result = run(4, str(tmp_path))
    assert resumed_result.runs[0].resumed_from == 16
    assert resumed_result.best_step == full_result.best_step
    for name, weight in full.params.items():
        torch.testing.assert_close(resumed.params[name], weight, rtol=0, atol=0)


def test_the_history_is_written_live_as_json_lines_with_per_task_losses_and_gate_entropy(tmp_path):
    cfg = TrainConfig(batch_size=100, epochs=2, eval_every=3, progress=False, log_dir=str(tmp_path))
    Trainer(model(), cfg).fit(*splits())
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 6, 9, 12, 14]
    first = lines[0]
    for key in ("train_loss", "train_loss/y1", "train_loss/y2", "lr", "valid/loss", "valid/mse/y1"):
        assert key in first
    assert 0 < first["valid/gate_entropy/y1"] <= torch.log(torch.tensor(3.0)).item() + 1e-6


def test_tensorboard_receives_losses_metrics_gate_entropy_and_the_learning_rate(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(batch_size=100, epochs=1, progress=False, log_dir=str(tmp_path), tensorboard=True)
    Trainer(model(), cfg).fit(*splits())
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss/y1", "valid/mse/y2", "valid/gate_entropy/y1", "lr"} <= tags


def test_a_monitor_that_is_not_a_validation_metric_fails_at_the_first_evaluation():
    cfg = TrainConfig(batch_size=100, epochs=1, progress=False, monitor="auc/y1")
    with pytest.raises(ValueError, match=r"train.monitor: 'auc/y1' is not a validation metric; choose one of"):
        Trainer(model(), cfg).fit(*splits())
