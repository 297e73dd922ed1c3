"""``mtrank train`` as a user meets it: YAML numbers as YAML writes them, one-line errors naming the field, and
a checkpoint directory that refuses another configuration until told what to do."""

import pytest
import yaml

from mtrank.cli import main
from tabular_helpers import config, make_frame, one_torch_thread  # noqa: F401


@pytest.fixture
def experiment(tmp_path):
    make_frame(n=300).to_csv(tmp_path / "rows.csv", index=False)
    raw = config(
        data={"train": "rows.csv"},
        train={"epochs": 1, "progress": False, "lr": "1e-3", "checkpoint_dir": "ckpt"},
    )
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw).replace("'1e-3'", "1e-3"))  # as a user writes it: YAML reads a string
    return path


def run(capsys, *argv) -> tuple[int, str]:
    code = main(["train", *map(str, argv), "--no-progress"])
    return code, capsys.readouterr().err


def test_lr_written_1e_3_trains_and_a_word_for_a_number_is_a_one_line_error(experiment, tmp_path, capsys):
    assert "lr: 1e-3" in experiment.read_text()
    code, err = run(capsys, experiment, "--out", tmp_path / "m", "--set", f"train.checkpoint_dir={tmp_path}/c1")
    assert code == 0, err
    code, err = run(capsys, experiment, "--set", "train.epochs=ten")
    assert code == 1
    assert err.strip() == "mtrank train: error: exp.yaml: train.epochs: expected an integer, got 'ten'".replace(
        "exp.yaml", str(experiment)
    )


def test_a_changed_config_on_an_old_checkpoint_is_refused_until_overwrite(experiment, tmp_path, capsys):
    ckpt = f"train.checkpoint_dir={tmp_path}/ckpt"
    assert run(capsys, experiment, "--out", tmp_path / "a", "--set", ckpt)[0] == 0
    code, err = run(capsys, experiment, "--out", tmp_path / "b", "--set", ckpt, "--set", "train.lr=0.004")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "train.lr 0.001 -> 0.004" in err and "--overwrite" in err
    assert (
        run(capsys, experiment, "--out", tmp_path / "b", "--set", ckpt, "--set", "train.lr=0.004", "--overwrite")[0]
        == 0
    )
    code, err = run(
        capsys, experiment, "--out", tmp_path / "c", "--set", f"train.checkpoint_dir={tmp_path}/new", "--resume"
    )
    assert code == 1 and "holds no checkpoint" in err
