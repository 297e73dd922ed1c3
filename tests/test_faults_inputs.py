"""Bad configs and data (issue 10, item 6), through `mtrank train CONFIG` and the Python API: each fails with exit 1
and one line naming the field or the file and column, or, where the input is legal but suspicious, trains with a
one-line warning. Small frames, one epoch: seconds each."""

import json
import re
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import mtrank
from mtrank.cli import main
from mtrank.config import ConfigError, ModelConfig, TaskConfig, TrainConfig
from mtrank.config.experiment import load_experiment
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.errors import DataError, DataWarning
from mtrank.data.tensors import TensorData
from mtrank.pipeline import evaluate_model_dir, predict_model_dir
from mtrank.train import Trainer
from mtrank.train.ensemble import Ensemble, EnsembleData
from mtrank.train.loop import TrainingDiverged
from tabular_helpers import config, make_frame, one_torch_thread  # noqa: F401

ROWS = 240


def case_config(**train) -> dict:
    cfg = config(data={"train": "train.csv"})
    cfg["train"].update({"epochs": 1, **train})
    return cfg


def write_case(folder, cfg: dict, frame: pd.DataFrame):
    frame.to_csv(folder / "train.csv", index=False)
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and the lines on stderr of ``mtrank ARGV`` (run in this process)."""
    code = main([*argv, "--threads", "1"] if argv[0] == "train" else argv)
    return code, capsys.readouterr().err.strip().splitlines()


def set_in(cfg: dict, dotted: str, value) -> dict:
    node = cfg
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return cfg


def with_row(column: str, value, row: int = 5):
    def change(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[row, column] = value
        return frame

    return change


def regression_task(cfg: dict) -> dict:
    """``price`` becomes the label of a regression task ``spend`` (and stops being a feature)."""
    cfg["features"]["numeric"] = ["age"]
    cfg["tasks"].append({"name": "spend", "column": "price", "type": "regression"})
    return cfg


# (id, config change, frame change, the message's regex): every one a non-zero exit and one line
FAILURES = [
    ("epochs ten", lambda c: set_in(c, "train.epochs", "ten"), None, r"train\.epochs: expected an integer, got 'ten'"),
    ("batch_size 12.5", lambda c: set_in(c, "train.batch_size", 12.5), None, r"train\.batch_size: expected an integer"),
    (
        "hidden with text",
        lambda c: set_in(c, "model.experts.hidden", [8, "wide"]),
        None,
        r"model\.experts\.hidden\[1\]: expected an integer, got 'wide'",
    ),
    (
        "hidden as one string",
        lambda c: set_in(c, "model.experts.hidden", "32, 16"),
        None,
        r"model\.experts\.hidden: expected a list, got str '32, 16'; write a YAML list, e.g. \[32, 16\]",
    ),
    (
        "numeric as one string",
        lambda c: set_in(c, "features.numeric", "age"),
        None,
        r"features\.numeric: expected a list, got str 'age'; write a YAML list, e.g. \['age'\]",
    ),
    ("lr inf", lambda c: set_in(c, "train.lr", float("inf")), None, r"train\.lr: must be > 0 and finite, got inf"),
    ("seed -1", lambda c: set_in(c, "train.seed", -1), None, r"train\.seed: must be in \[0, 2\^32\), got -1"),
    ("task weight inf", lambda c: set_in(c, "tasks.1.weight", float("inf")), None, r"tasks\[1\]\.weight: must be >= 0"),
    (
        "monitor typo",
        lambda c: set_in(c, "train.monitor", "auc/clik"),
        None,
        r"train\.monitor: 'auc/clik' is not a validation metric \(did you mean 'auc/click'\?\); choose one of "
        r"\['loss', 'auc/click', 'logloss/click', 'auc/buy', 'logloss/buy'\]",
    ),
    (
        "inf feature",
        None,
        with_row("age", np.inf),
        r"column 'age': value inf is not a finite number \(1 such rows\) \(data row 5: \{'age': inf.*"
        r"features\.numeric\[0\]\.clip",
    ),
    ("-inf feature", None, with_row("price", -np.inf), r"column 'price': value -inf is not a finite number"),
    (
        "1e308 feature",
        None,
        with_row("age", 1e308),
        r"column 'age': value 1e\+308 is too large to standardise .*'age': 1e\+308",
    ),
    (
        "inf regression label",
        regression_task,
        with_row("price", np.inf),
        r"column 'price': regression label inf of tasks\[2\] \('spend'\) is not a finite number .*data row 5",
    ),
    (
        "1e308 regression label",
        regression_task,
        with_row("price", 1e308),
        r"column 'price': regression label 1e\+308 of tasks\[2\] \('spend'\) is too large",
    ),
    (
        "lr 1e6 diverges",
        lambda c: set_in(c, "train.lr", 1e6),
        None,
        r"training diverged at step \d+: task '(click|buy)' has (loss \S+|a non-finite loss \(nan\)) over steps "
        r"1-\d+ .*lower train\.lr \(now 1e\+06\)",
    ),
]
ERRORS = (ConfigError, DataError, TrainingDiverged)


@pytest.mark.parametrize(
    ("change_config", "change_frame", "message"), [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES]
)
def test_a_bad_input_exits_non_zero_with_one_line_naming_the_field_or_column(
    tmp_path, capsys, change_config, change_frame, message
):
    cfg = case_config()
    cfg = change_config(cfg) if change_config else cfg
    frame = make_frame(n=ROWS)
    frame = change_frame(frame) if change_frame else frame
    code, lines = run_cli(["train", str(write_case(tmp_path, cfg, frame)), "--out", str(tmp_path / "m")], capsys)
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("mtrank train: error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert "train.csv" in lines[0] or change_frame is None  # data errors name the file
    assert not (tmp_path / "m" / "model.safetensors").exists()  # no model (a diverged run leaves its history)
    with pytest.raises(ERRORS, match=message):  # the Python API, from a dict and a DataFrame
        mtrank.fit(cfg, frame, output=None)


def test_numbers_written_as_text_and_a_lone_width_are_read_as_meant(tmp_path, capsys):
    cfg = case_config()
    text = yaml.safe_dump(cfg).replace("lr: 0.01", "lr: 1e-2").replace("epochs: 1", "epochs: '1'")
    text = text.replace("hidden:\n    - 8", "hidden: 8")
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    make_frame(n=ROWS).to_csv(tmp_path / "train.csv", index=False)
    assert yaml.safe_load(text)["train"]["lr"] == "1e-2"  # YAML 1.1 reads it as a string
    experiment = load_experiment(path)
    assert (experiment.train.lr, experiment.train.epochs, experiment.model.experts.hidden) == (0.01, 1, [8])
    code, lines = run_cli(["train", str(path), "--out", str(tmp_path / "m"), "--no-progress"], capsys)
    assert code == 0 and lines == []


def test_inf_in_a_clipped_column_is_bounded_not_refused(tmp_path, capsys):
    cfg = case_config()
    cfg["features"]["numeric"] = [{"name": "age", "clip": [0, 100]}, "price"]
    path = write_case(tmp_path, cfg, with_row("age", np.inf)(make_frame(n=ROWS)))
    code, lines = run_cli(["train", str(path), "--out", str(tmp_path / "m"), "--no-progress"], capsys)
    assert code == 0 and lines == []


WARNINGS = [
    (
        "label as a feature",
        lambda c: c["features"]["numeric"].append("click") or c,
        lambda f: f,
        r"tasks\[0\] \('click'\) reads its label from column 'click', which feature 'click' also reads: the model "
        r"sees the label",
    ),
    (
        "constant binary label",
        lambda c: c,
        lambda f: f.assign(buy=0),
        r"column 'buy': every label of task 'buy' in the train split is 0 \(\d+ rows\), so its AUC is undefined",
    ),
]


@pytest.mark.parametrize(
    ("change_config", "change_frame", "message"), [w[1:] for w in WARNINGS], ids=[w[0] for w in WARNINGS]
)
def test_a_suspicious_input_trains_with_a_one_line_warning(tmp_path, capsys, change_config, change_frame, message):
    cfg = change_config(case_config())
    frame = change_frame(make_frame(n=ROWS))
    code, lines = run_cli(["train", str(write_case(tmp_path, cfg, frame)), "--out", str(tmp_path / "m")], capsys)
    assert code == 0
    warned = [line for line in lines if line.startswith("mtrank train: warning: ")]
    assert any(re.search(message, line) for line in warned), lines
    with pytest.warns(DataWarning, match=message):
        mtrank.fit(cfg, frame, output=None)


# ------------------------------------------------------------------------------ categorical values and spaces


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model directory trained on make_frame, and a test frame of other rows."""
    folder = tmp_path_factory.mktemp("spaces")
    mtrank.fit(case_config(epochs=2), make_frame(n=600), output=folder / "model")
    return folder / "model", make_frame(n=300, seed=1)


@pytest.mark.parametrize("copies", [1, 20])  # 300 rows: the dict lookup; 6,000: pyarrow's (see StringLookup)
def test_values_padded_with_spaces_encode_as_the_training_values(trained, copies):
    model_dir, test = trained
    test = pd.concat([test] * copies, ignore_index=True)
    padded = test.assign(city="  " + test.city + " ", tags=test.tags.str.replace("|", " | "))
    encoder = FeatureEncoder.load(model_dir)
    for a, b in zip(encoder.transform(test), encoder.transform(padded)):
        np.testing.assert_array_equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # no unseen-value warning either
        assert evaluate_model_dir(model_dir, padded) == evaluate_model_dir(model_dir, test)


def test_encoders_fitted_before_stripping_keep_their_raw_values(trained):
    model_dir, _ = trained
    data = json.loads((model_dir / "encoders.json").read_text())
    data["state"]["city"] = {"size": 3, "kind": "str", "vocab": [" paris", "rome"]}  # as an older mtrank wrote it
    old = FeatureEncoder.from_dict(data)
    ids = old.transform(make_frame(n=4).assign(city=[" paris", "paris", "rome", " rome"]))[1][:, 0]
    assert ids.tolist() == [1, 0, 2, 0]


def test_evaluate_and_predict_warn_about_a_column_of_unseen_values(trained, tmp_path, capsys):
    model_dir, test = trained
    upper = test.assign(city=test.city.str.upper())
    with pytest.warns(DataWarning, match=r"dataframe: categorical values the training split did not have: 'city' 100%"):
        evaluate_model_dir(model_dir, upper)
    upper.to_csv(tmp_path / "upper.csv", index=False)
    code, lines = run_cli(
        ["predict", str(model_dir), str(tmp_path / "upper.csv"), "-o", str(tmp_path / "s.parquet"), "--no-progress"],
        capsys,
    )
    assert code == 0
    assert lines[0] == (
        f"mtrank predict: warning: {tmp_path / 'upper.csv'}: categorical values the training split did not have: "
        "'city' 100% of rows (training: 0%); check for changed spellings, case or ids (surrounding spaces are "
        "ignored); the model treats them as one unknown value"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.inf, r"column 'age': value inf is not a finite number \(data row 207: \{'age': inf"),
        (1e300, r"column 'age': value 1e\+300 is too large: standardised with the training mean .* overflows float32"),
    ],
)
def test_predict_and_evaluate_refuse_a_value_that_does_not_encode(trained, tmp_path, capsys, value, message):
    model_dir, test = trained
    test.loc[207, "age"] = value
    test.to_csv(tmp_path / "bad.csv", index=False)
    for command in (
        ["predict", str(model_dir), str(tmp_path / "bad.csv"), "-o", str(tmp_path / "s.parquet"), "--no-progress"],
        ["evaluate", str(model_dir), str(tmp_path / "bad.csv")],
    ):
        code, lines = run_cli(command, capsys)
        assert code == 1 and len(lines) == 1 and re.search(message, lines[0]), lines
    with pytest.raises(DataError, match=message):  # scored in batches: the row number is still the file's
        predict_model_dir(model_dir, str(tmp_path / "bad.csv"), batch_rows=100, progress=False)
    assert not (tmp_path / "s.parquet").exists() or pq.read_metadata(tmp_path / "s.parquet").num_rows == 0


# ------------------------------------------------------------------------------ the one loop: every kind of run


def test_an_ensemble_that_diverges_stops_naming_the_run_and_task():
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(300, 3, generator=gen)
    data = TensorData(dense, torch.zeros(300, 0, dtype=torch.long), (dense[:, :2] > 0).float())
    config = ModelConfig(inputs={"num_dense": 3}, tasks=[TaskConfig("a"), TaskConfig("b")], block={"num_experts": 2})
    ensemble = Ensemble(config, [0, 1])
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: run 0, task 'a' has"):
        ensemble.fit(EnsembleData.shared(data), None, TrainConfig(lr=1e6, batch_size=50, epochs=2, progress=False))


def test_a_monitor_typo_fails_before_training_even_without_validation_data():
    data = TensorData(torch.randn(100, 3), torch.zeros(100, 0, dtype=torch.long), torch.rand(100, 2))
    config = ModelConfig(inputs={"num_dense": 3}, tasks=[TaskConfig("a", "regression"), TaskConfig("b", "regression")])
    trainer = Trainer(mtrank.MultiTaskModel(config), TrainConfig(monitor="r2/c", progress=False))
    with pytest.raises(ConfigError, match=r"train.monitor: 'r2/c' is not a validation metric .*'mse/a', 'r2/a'"):
        trainer.fit(data)


def test_a_bad_value_in_a_streamed_file_is_one_line_from_the_reader_process(tmp_path, capsys):
    cfg = case_config()
    cfg["data"] = {"train": "train.csv", "valid": "valid.csv", "split": {"method": "files"}, "streaming": True}
    cfg["data"].update(workers=1, fit_rows=100)  # the encoders never see row 180: the reader process does
    make_frame(n=100, seed=1).to_csv(tmp_path / "valid.csv", index=False)
    path = write_case(tmp_path, cfg, with_row("age", -np.inf, row=180)(make_frame(n=ROWS)))
    code, lines = run_cli(["train", str(path), "--out", str(tmp_path / "m"), "--no-progress"], capsys)
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(
        f"mtrank train: error: {tmp_path / 'train.csv'}: column 'age': value -inf is not a finite number (data row "
        "180: {'age': -inf"
    )
    assert "Traceback" not in lines[0] and "features.numeric[0].clip: [low, high]" in lines[0]
