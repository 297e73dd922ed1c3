"""The gradient-boosting baseline in every training report (and `--no-baseline`), its features, its libraries;
shift shares in the report and the one shift warning at evaluate / predict."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import yaml

import mtrank
from mtrank.cli import main
from mtrank.config.experiment import BaselineSpec, FeaturesSpec, TaskSpec
from mtrank.data.encoders import FeatureEncoder, LabelTransforms
from mtrank.data.errors import DataWarning
from mtrank.data.tensors import TensorData
from mtrank.evaluate.baseline import MAX_CATEGORIES, baseline_features, fit_baseline
from mtrank.pipeline import evaluate_model_dir, predict_model_dir
from tabular_helpers import config, make_frame, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("with_baseline")
    frame = make_frame(800)
    return mtrank.fit(config(), frame, output=directory), directory, frame


def test_the_report_and_metrics_json_hold_the_baseline_and_the_networks_difference_per_task(trained):
    result, directory, _ = trained
    metrics = json.loads((directory / "metrics.json").read_text())
    baseline = metrics["baseline"]
    assert baseline["library"] == "scikit-learn HistGradientBoosting"
    for split in ("valid", "test"):
        for task in ("click", "buy"):
            key = f"auc/{task}"
            gbdt, net = baseline["metrics"][split][key], metrics["metrics"][split][key]
            assert 0.5 < gbdt <= 1.0
            assert baseline["difference"][split][key] == pytest.approx(net - gbdt)
    assert set(baseline["rounds"]) == {"click", "buy"} and min(baseline["rounds"].values()) >= 1
    report = (directory / "report.md").read_text()
    assert "## Gradient-boosting baseline" in report
    row = next(line for line in report.splitlines() if line.startswith("| test | click | AUC |"))
    difference = metrics["metrics"]["test"]["auc/click"] - baseline["metrics"]["test"]["auc/click"]
    assert row.endswith(f"| {difference:+.4f} |")


def test_mtrank_train_no_baseline_skips_it_and_the_python_api_writes_none_without_a_directory(tmp_path, capsys):
    frame = make_frame(400)
    frame.to_csv(tmp_path / "rows.csv", index=False)
    cfg = config(data={"train": "rows.csv", "split": {"method": "random", "fractions": [0.7, 0.15, 0.15]}})
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "a"), "--threads", "1"]) == 0
    assert "mtrank - GBDT" in capsys.readouterr().out  # printed beside the metrics
    assert main(["train", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "b"), "--no-baseline"]) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["baseline"] is None
    assert "Gradient-boosting baseline" not in (tmp_path / "b" / "report.md").read_text()
    assert mtrank.fit(cfg, frame, output=None).baseline is None  # no report, no baseline (unless asked)


def test_the_baseline_sees_vocabulary_ids_as_categories_capped_at_255_and_wide_hashes_as_numbers():
    rng = np.random.default_rng(0)
    n = 3000
    frame = pd.DataFrame(
        {
            "shop": rng.integers(0, 400, n),  # 400 values: the rarest go to the out-of-vocabulary id
            "page": rng.integers(0, 10_000, n),
            "price": rng.normal(size=n),
        }
    )
    spec = FeaturesSpec.from_dict(
        {"categorical": ["shop", {"name": "page", "hash_buckets": 1000}], "numeric": ["price"]}, "features"
    )
    encoder = FeatureEncoder(spec).fit(frame)
    dense, sparse = encoder.transform(frame)
    import torch

    data = TensorData(torch.from_numpy(dense), torch.from_numpy(sparse), torch.zeros(n, 1))
    x, categorical, left_out = baseline_features(encoder, data)
    assert categorical == [False, True, False] and left_out == []
    assert x[:, 1].max() <= MAX_CATEGORIES - 2 and (x[:, 1] == np.where(sparse[:, 0] < 254, sparse[:, 0], 0)).all()
    assert (x[:, 2] == sparse[:, 1]).all()  # the hashed feature as a number


@pytest.mark.parametrize("library", ["sklearn", "lightgbm", "xgboost"])
def test_each_library_learns_a_signal_and_stops_early_on_validation(library):
    if library != "sklearn":
        pytest.importorskip(library)
    rng = np.random.default_rng(0)
    n = 2000
    frame = pd.DataFrame({"x": rng.normal(size=n), "city": rng.choice(list("abcd"), n)})
    logit = 2 * frame["x"] + (frame["city"] == "a") * 1.5
    frame["click"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    frame["spend"] = np.exp(3 + frame["x"] + rng.normal(0, 0.3, n))
    tasks = [TaskSpec("click"), TaskSpec("spend", type="regression", label_transform="log1p")]
    spec = FeaturesSpec.from_dict({"categorical": ["city"], "numeric": ["x"]}, "features")
    encoder = FeatureEncoder(spec).fit(frame)
    labels = LabelTransforms(tasks).fit(frame[["click", "spend"]].to_numpy())

    import torch

    def data(rows: slice, scaled: bool) -> TensorData:
        dense, sparse = encoder.transform(frame.iloc[rows])
        y = frame[["click", "spend"]].to_numpy()[rows]
        y = labels.transform(y) if scaled else y.astype(np.float32)
        return TensorData(torch.from_numpy(dense), torch.from_numpy(sparse), torch.from_numpy(y))

    spec = BaselineSpec(library=library, max_iter=300, patience=5)
    result = fit_baseline(
        spec, tasks, encoder, labels, data(slice(0, 1400), True), {"valid": data(slice(1400, n), False)}
    )
    assert result["metrics"]["valid"]["auc/click"] > 0.8
    assert result["metrics"]["valid"]["r2/spend"] > 0.5  # predictions back on the labels' own scale
    assert 1 <= result["rounds"]["click"] < 300


def shifted(frame: pd.DataFrame, share: float) -> pd.DataFrame:
    out = frame.copy()
    rows = int(share * len(out))
    out.loc[: rows - 1, "age"] = 500.0  # far beyond the training range
    out.loc[: rows - 1, "city"] = "atlantis"
    return out


def test_evaluate_and_predict_warn_once_naming_the_shifted_columns_and_their_share(trained, tmp_path):
    _, directory, frame = trained
    data = shifted(make_frame(400, seed=7), 0.3)
    with pytest.warns(DataWarning) as caught:
        evaluate_model_dir(directory, data)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "numeric values outside the training split's range: 'age' 30.0% of rows" in message
    assert "categorical values the training split did not have: 'city' 30% of rows (training: 0%)" in message
    with pytest.warns(DataWarning, match="'age' 30.0% of rows") as caught:
        predict_model_dir(directory, data, batch_rows=64, progress=False)  # counted over every batch
    assert len(caught) == 1


def test_a_few_rows_outside_the_range_do_not_warn(trained):
    _, directory, _ = trained
    data = shifted(make_frame(400, seed=7), 0.02)  # 8 rows: below the 10-row minimum
    data["city"] = "paris"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        evaluate_model_dir(directory, data)


def test_the_training_report_lists_each_splits_shift_against_the_training_range(trained):
    from mtrank.config.experiment import experiment_from_dict
    from mtrank.data.splits import load_splits

    result, directory, frame = trained
    shift = json.loads((directory / "metrics.json").read_text())["shift"]
    assert set(shift) == {"valid", "test"} and shift["test"]["rows"] == result.rows["test"]
    splits = load_splits(experiment_from_dict(config()), frame)
    train_age = splits["train"][0].column("age").to_numpy()
    for role in ("valid", "test"):
        age = splits[role][0].column("age").to_numpy()
        outside = np.mean((age < train_age.min()) | (age > train_age.max()))
        assert shift[role]["numeric_out_of_range"]["age"] == pytest.approx(outside)
    assert shift["test"]["categorical_unseen"]["city"] == 0.0
    assert "## Shift" in (directory / "report.md").read_text()
