import pytest
import torch

from mtrank.artifacts import ModelDirError, load_model, save_model, seal_model_dir
from mtrank.config import ConfigError, ModelConfig, TaskConfig, TrainConfig
from mtrank.data import make_synthetic
from mtrank.model import MultiTaskModel
from mtrank.train import Trainer

TASKS = [TaskConfig("y1", "regression"), TaskConfig("y2", "regression")]


def splits():
    data = make_synthetic(n=1200, correlation=0.9, seed=0)
    return data[:1000], data[1000:]


def small_model(block="mmoe", seed=0):
    return MultiTaskModel(
        ModelConfig(inputs={"num_dense": 100}, tasks=TASKS, block={"type": block, "num_experts": 4}), seed=seed
    )


@pytest.mark.parametrize("block", ["shared_bottom", "omoe", "mmoe"])
def test_training_lowers_the_loss_on_synthetic_data(block):
    train, valid = splits()
    model = small_model(block)
    from mtrank.evaluate import evaluate

    before = evaluate(model, valid)["loss"]
    result = Trainer(model, TrainConfig(epochs=8, batch_size=64, lr=3e-3, progress=False)).fit(train, valid)
    after = evaluate(model, valid)["loss"]
    assert after < 0.7 * before
    assert result.best_value == pytest.approx(after)


def test_best_validation_weights_are_restored():
    train, valid = splits()
    model = small_model()
    result = Trainer(model, TrainConfig(epochs=4, batch_size=64, eval_every=4, progress=False)).fit(train, valid)
    from mtrank.evaluate import evaluate

    losses = [h["valid/loss"] for h in result.history]
    assert result.best_value == pytest.approx(min(losses))
    assert evaluate(model, valid)["loss"] == pytest.approx(min(losses))


def test_early_stopping_stops_after_patience():
    train, valid = splits()
    model = small_model()
    cfg = TrainConfig(epochs=200, batch_size=500, lr=5e-2, eval_every=1, early_stopping_patience=3, progress=False)
    result = Trainer(model, cfg).fit(train, valid)
    assert result.steps < 400
    assert result.steps - result.best_step == 3


def test_save_then_load_gives_identical_predictions(tmp_path):
    model = small_model("mmoe")
    x = torch.randn(32, 100)
    empty = torch.zeros(32, 0, dtype=torch.long)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert torch.equal(model.predict(x, empty), loaded.predict(x, empty))


def test_load_rejects_corrupt_or_wrong_version_model_dir(tmp_path):
    save_model(small_model(), tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text(cfg.read_text().replace('"format_version": 3', '"format_version": 99'))
    with pytest.raises(ModelDirError, match=r"config.json: .*manifest.json"):
        load_model(tmp_path / "m")
    seal_model_dir(tmp_path / "m")  # sealed as it is: the format check itself refuses it
    with pytest.raises(ModelDirError, match="format_version 99"):
        load_model(tmp_path / "m")
    save_model(small_model(), tmp_path / "n")
    (tmp_path / "n" / "model.safetensors").write_bytes(b"garbage")
    seal_model_dir(tmp_path / "n")
    with pytest.raises(ModelDirError, match="cannot read weights"):
        load_model(tmp_path / "n")


def test_resume_continues_from_the_saved_step_and_matches_uninterrupted_training(tmp_path):
    train, valid = splits()
    common = dict(batch_size=100, lr=1e-3, progress=False, seed=3)
    full = small_model(seed=1)
    full_result = Trainer(full, TrainConfig(epochs=4, **common)).fit(train, valid)

    part = small_model(seed=1)
    Trainer(part, TrainConfig(epochs=2, checkpoint_dir=str(tmp_path), **common)).fit(train, valid)
    resumed = small_model(seed=99)  # different init: everything must come from the checkpoint
    result = Trainer(resumed, TrainConfig(epochs=4, checkpoint_dir=str(tmp_path), **common)).fit(train, valid)
    assert result.resumed_from == 20
    assert result.steps == 40
    assert [h["step"] for h in result.history] == [10, 20, 30, 40]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert result.best_value == pytest.approx(full_result.best_value)


def test_bad_train_config_names_the_field():
    with pytest.raises(ConfigError, match="train.optimizer"):
        TrainConfig(optimizer="sgdd").validate()
    with pytest.raises(ConfigError, match="train.precision"):
        TrainConfig(precision="fp8").validate()


def test_bf16_autocast_computes_the_experts_in_bf16_and_learns_as_well_as_fp32():
    train, valid = splits()
    dtypes = []
    results = {}
    for precision in ("fp32", "bf16"):
        model = small_model()
        hook = model.block.levels[0].experts.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        cfg = TrainConfig(epochs=3, batch_size=64, precision=precision, progress=False)
        results[precision] = Trainer(model, cfg).fit(train, valid)
        hook.remove()
    assert torch.bfloat16 in dtypes and torch.float32 in dtypes  # autocast on for bf16 only
    assert results["bf16"].best_value == pytest.approx(results["fp32"].best_value, rel=0.1)
    assert results["bf16"].best_value != results["fp32"].best_value
