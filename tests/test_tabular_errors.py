"""Bad input fails with a message naming the file, the column and an example row (issue 4's list)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import mtrank
from mtrank.config import ConfigError
from mtrank.config.experiment import experiment_from_dict, load_experiment
from mtrank.data.errors import DataError
from tabular_helpers import config, make_frame, one_torch_thread  # noqa: F401


def fit_file(path, **sections):
    cfg = config(data={"train": str(path)}, **sections)
    return mtrank.fit(cfg, output=None)


def test_missing_column_names_file_column_config_field_and_a_row(tmp_path):
    path = tmp_path / "clicks.csv"
    make_frame(n=50).drop(columns=["price"]).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        fit_file(path)
    message = str(err.value)
    assert str(path) in message and "column 'price'" in message and "features.numeric[1]" in message
    assert "data row 0: {" in message and "'city':" in message


def test_config_naming_an_unknown_column_suggests_the_close_name(tmp_path):
    path = tmp_path / "clicks.parquet"
    pq.write_table(pa.Table.from_pandas(make_frame(n=50), preserve_index=False), path)
    tasks = [{"name": "click", "column": "clik"}]
    with pytest.raises(DataError, match=r"column 'clik' named by tasks\[0\].column .*did you mean 'click'"):
        fit_file(path, tasks=tasks)


def test_text_in_a_numeric_csv_column_names_the_line_and_shows_it(tmp_path):
    frame = make_frame(n=60).astype({"age": object})
    frame.loc[41, "age"] = "forty"
    path = tmp_path / "clicks.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        fit_file(path)
    message = str(err.value)
    assert str(path) in message and "column 'age'" in message and "'forty'" in message
    assert "line 43" in message  # header + 42 rows; the message quotes that line
    assert ",forty," in message


def test_text_in_a_numeric_parquet_column_names_the_row(tmp_path):
    frame = make_frame(n=60).astype({"price": str})
    frame.loc[7, "price"] = "cheap"
    path = tmp_path / "clicks.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    with pytest.raises(
        DataError, match=r"clicks.parquet.*column 'price': text 'cheap' in a numeric column.*data row 7"
    ):
        fit_file(path)


def test_wrong_type_for_a_multi_valued_column_says_what_is_expected(tmp_path):
    path = tmp_path / "clicks.parquet"
    pq.write_table(pa.Table.from_pandas(make_frame(n=40).assign(tags=1.5), preserve_index=False), path)
    with pytest.raises(DataError, match=r"column 'tags': expected a list column .* got type double.*data row 0"):
        fit_file(path)


def test_binary_label_outside_zero_one_names_the_value_and_the_row(tmp_path):
    frame = make_frame(n=60)
    frame.loc[12, "click"] = 3
    path = tmp_path / "clicks.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        fit_file(path)
    message = str(err.value)
    assert "column 'click': binary label 3.0 is outside {0, 1}" in message
    assert "'click': 3" in message and "positive" in message  # the row, and how to fix it


def test_text_labels_suggest_positive_values(tmp_path):
    frame = make_frame(n=40).assign(click=lambda f: np.where(f.click == 1, "yes", "no"))
    with pytest.raises(
        DataError, match=r"column 'click': label of tasks\[0\].*has text 'no'.*positive_values: \['no'\]"
    ):
        mtrank.fit(config(), frame, output=None)


@pytest.mark.parametrize("content", [b"", b"user,city,age,price,tags,click,buy,ts\n"])
def test_empty_files_fail_naming_the_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"empty.csv: (the file is empty|no rows)"):
        fit_file(path)


def test_an_empty_parquet_file_fails_naming_the_file(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pandas(make_frame(n=5).iloc[:0], preserve_index=False), path)
    with pytest.raises(DataError, match=r"empty.parquet: no rows"):
        fit_file(path)


def test_an_all_nan_numeric_column_fails_naming_the_column(tmp_path):
    path = tmp_path / "clicks.csv"
    make_frame(n=30).assign(age=np.nan).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"clicks.csv.*column 'age': every value is missing .*data row 0"):
        fit_file(path)


def test_a_task_without_any_label_in_training_fails():
    frame = make_frame(n=40).assign(buy=np.nan)
    with pytest.raises(DataError, match=r"column 'buy': task 'buy' has no labels in the training split"):
        mtrank.fit(config(), frame, output=None)


def test_negative_sample_weights_fail_naming_the_row():
    frame = make_frame(n=40).assign(w=1.0)
    frame.loc[5, "w"] = -2.0
    with pytest.raises(DataError, match=r"column 'w': sample weight -2.0 is missing or negative"):
        mtrank.fit(config(data={"weight_column": "w"}), frame, output=None)


def test_a_missing_file_fails_naming_the_config_field(tmp_path):
    with pytest.raises(DataError, match=r"nope.csv: file not found \(looked for .*nope.csv\); check data.train"):
        fit_file(tmp_path / "nope.csv")


def test_data_paths_resolve_against_the_config_files_folder(tmp_path, monkeypatch):
    """A config names its data relative to itself, so it runs from any working directory; the error for a
    missing file says where it looked and that paths are relative to the config."""
    folder = tmp_path / "project"
    folder.mkdir()
    make_frame(n=200).to_csv(folder / "rows.csv", index=False)
    raw = config(data={"train": "rows.csv"}, train={"epochs": 1, "progress": False})
    (folder / "exp.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    assert mtrank.fit("project/exp.yaml", output=None).rows["train"] == 140
    raw["data"]["train"] = "missing.csv"
    (folder / "exp.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError, match=r"looked for .*project/missing.csv\) \(paths in project/exp.yaml are relative"):
        mtrank.fit("project/exp.yaml", output=None)


@pytest.mark.parametrize(
    "change, field",
    [
        (
            lambda c: c["features"]["numeric"].append({"name": "x", "clip": [5, 1]}),
            r"features.numeric\[2\].clip",
        ),
        (
            lambda c: c["features"]["categorical"].append({"name": "x", "min_cnt": 2}),
            r"features.categorical\[2\].min_cnt: unknown field; did you mean 'min_count'",
        ),
        (lambda c: c["tasks"].append({"name": "r", "type": "ranking"}), r"tasks\[2\].type"),
        (
            lambda c: c["tasks"][0].update(positive="at least 4"),
            r"tasks\[0\].positive: expected a comparison",
        ),
        (lambda c: c["data"].update(split={"method": "time"}), r"data.split.time_column: required"),
        (lambda c: c["data"].update(split={"fractions": [0.5, 0.1]}), r"data.split.fractions"),
        (lambda c: c["model"].update(block="moe"), r"model.block.type: unknown 'moe'; did you mean"),
        (lambda c: c["model"].update(num_dense=3), r"model.num_dense: derived from the features section"),
        (lambda c: c["train"].update(lr=-1), r"train.lr: must be > 0"),
        (lambda c: c.update(trian={}), r"trian: unknown section; did you mean 'train'"),
        (
            lambda c: c["features"]["numeric"].append({"name": "age"}),
            r"features.numeric\[2\].name: 'age' is already",
        ),
        (
            lambda c: c["features"].update(numeric=[], categorical=[], multi_categorical=[]),
            r"features: no features",
        ),
    ],
)
def test_config_errors_name_the_field(change, field):
    cfg = config()
    change(cfg)
    with pytest.raises(ConfigError, match=field):
        experiment_from_dict(cfg, source="exp.yaml")


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("features: [unclosed\n")
    with pytest.raises(ConfigError, match="exp.yaml: not valid YAML"):
        load_experiment(path)
    path.write_text(yaml.safe_dump({**config(), "tasks": "click"}))
    with pytest.raises(ConfigError, match=r"exp.yaml: tasks: expected a list"):
        load_experiment(path)
