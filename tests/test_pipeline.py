import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import mtrank
from mtrank.cli import main
from mtrank.config.experiment import experiment_from_dict
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.splits import load_splits
from mtrank.pipeline import evaluate_model_dir, predict_model_dir
from tabular_helpers import config, make_frame, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    result = mtrank.fit(config(), make_frame(), output=out)
    return result, out


def test_fit_on_a_dataframe_learns_both_tasks(trained):
    result, _ = trained
    assert result.metrics["test"]["auc/click"] > 0.7
    assert result.metrics["valid"]["auc/buy"] > 0.6
    assert result.rows == {"train": 560, "valid": 120, "test": 120}


def test_model_directory_holds_weights_config_encoders_metrics_and_report(trained):
    _, out = trained
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "encoders.json", "metrics.json", "report.md"} <= names
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["inputs"]["num_dense"] == FeatureEncoder.load(out).num_dense
    assert "| test | click |" in (out / "report.md").read_text()


def test_evaluate_with_saved_encoders_reproduces_the_test_metrics(trained, tmp_path):
    result, out = trained
    cfg = experiment_from_dict(config())
    test_table, _ = load_splits(cfg, make_frame())["test"]
    path = tmp_path / "test.parquet"
    pq.write_table(test_table, path)
    metrics = evaluate_model_dir(out, path)
    assert metrics["auc/click"] == pytest.approx(result.metrics["test"]["auc/click"], abs=1e-6)


def test_predict_scores_every_row_and_sends_unseen_categories_to_oov(trained, tmp_path):
    _, out = trained
    frame = make_frame(n=50, seed=5).drop(columns=["click", "buy"])
    frame.loc[:9, "city"] = "atlantis"  # never seen in training
    path = tmp_path / "new.csv"
    frame.to_csv(path, index=False)
    scores = predict_model_dir(out, path, tmp_path / "scores.parquet", progress=False)
    table = pq.read_table(tmp_path / "scores.parquet")
    assert table.num_rows == 50 and scores == tmp_path / "scores.parquet"
    for task in ("click", "buy"):
        s = table.column(f"score_{task}").to_numpy()
        assert ((s > 0) & (s < 1)).all()
    assert table.column("user").to_pylist() == frame["user"].astype(str).tolist()  # categorical: read as text
    in_memory = predict_model_dir(out, frame, progress=False)
    np.testing.assert_allclose(
        in_memory.column("score_click").to_numpy(), table.column("score_click").to_numpy(), rtol=1e-5
    )


def test_cli_train_evaluate_predict_round_trip(tmp_path, capsys):
    frame = make_frame()
    frame.iloc[:600].to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[600:].to_csv(tmp_path / "valid.csv", index=False)
    cfg = config(
        data={
            "train": str(tmp_path / "train.csv"),
            "valid": str(tmp_path / "valid.csv"),
            "split": {"method": "files"},
        },
        output=str(tmp_path / "model"),
    )
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "exp.yaml"), "--set", "train.epochs=2", "--no-progress"]) == 0
    assert "| valid | click |" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "model"), str(tmp_path / "valid.csv"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.5 < metrics["auc/click"] <= 1
    assert (
        main(
            [
                "predict",
                str(tmp_path / "model"),
                str(tmp_path / "valid.csv"),
                "-o",
                str(tmp_path / "s.parquet"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert pq.read_metadata(tmp_path / "s.parquet").num_rows == 200


def test_cli_reports_bad_config_fields_without_a_traceback(tmp_path, capsys):
    cfg = config()
    cfg["train"]["epoch"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "bad.yaml")]) == 1
    assert "train.epoch: unknown field" in capsys.readouterr().err


def test_parquet_shards_csv_and_dataframe_give_the_same_encoded_rows(tmp_path):
    frame = make_frame(n=300)
    (tmp_path / "shards").mkdir()
    for i in range(3):
        pq.write_table(
            pa.Table.from_pandas(frame.iloc[i * 100 : (i + 1) * 100], preserve_index=False),
            tmp_path / "shards" / f"part-{i}.parquet",
        )
    frame.to_csv(tmp_path / "all.csv", index=False)
    encoded = []
    for path, dataframe in [("", frame), (str(tmp_path / "shards"), None), (str(tmp_path / "all.csv"), None)]:
        cfg = experiment_from_dict(config(data={"train": path, "split": {"method": "random", "seed": 3}}))
        train, _ = load_splits(cfg, dataframe)["train"]
        encoded.append(FeatureEncoder(cfg.features).fit(train).transform(train))
    for dense, sparse in encoded[1:]:
        np.testing.assert_allclose(dense, encoded[0][0], rtol=1e-6)
        np.testing.assert_array_equal(sparse, encoded[0][1])


def test_time_split_puts_the_earliest_rows_in_train():
    cfg = experiment_from_dict(
        config(data={"split": {"method": "time", "time_column": "ts", "fractions": [0.6, 0.2, 0.2]}})
    )
    splits = load_splits(cfg, make_frame(n=500))
    last_train = max(splits["train"][0].column("ts").to_pylist())
    assert last_train < min(splits["valid"][0].column("ts").to_pylist())
    assert max(splits["valid"][0].column("ts").to_pylist()) < min(splits["test"][0].column("ts").to_pylist())
    assert [splits[r][0].num_rows for r in ("train", "valid", "test")] == [300, 100, 100]


def test_random_split_is_reproducible_per_seed_and_differs_across_seeds():
    frame = make_frame(n=200)

    def users(seed):
        cfg = experiment_from_dict(config(data={"split": {"method": "random", "seed": seed}}))
        return load_splits(cfg, frame)["test"][0].column("age").to_pylist()

    assert users(1) == users(1) and users(1) != users(2)


def test_mask_column_and_missing_labels_become_nan_and_derived_labels_binarise():
    frame = make_frame(n=200)
    frame["rating"] = np.arange(200) % 5 + 1.0
    frame.loc[:9, "rating"] = np.nan
    frame["has_buy"] = (np.arange(200) % 2).astype(int)
    cfg = experiment_from_dict(
        config(
            tasks=[
                {"name": "liked", "column": "rating", "positive": ">= 4"},
                {"name": "buy", "mask_column": "has_buy"},
            ]
        )
    )
    from mtrank.data.readers import encode_labels, read_table

    table, _ = read_table(frame, cfg)
    labels = encode_labels(table, cfg.tasks, "frame")
    assert np.isnan(labels[:10, 0]).all()
    np.testing.assert_array_equal(labels[10:, 0], (frame["rating"][10:] >= 4).astype(np.float32))
    assert np.isnan(labels[frame["has_buy"] == 0, 1]).all()
    assert not np.isnan(labels[frame["has_buy"] == 1, 1]).any()


def test_sample_weights_are_read_and_used(tmp_path):
    frame = make_frame(n=300)
    frame["w"] = 1.0 + (np.arange(300) % 3)
    cfg = config(data={"weight_column": "w"}, train={"epochs": 1, "progress": False, "batch_size": 64})
    result = mtrank.fit(cfg, frame, output=None)
    assert result.train_result.steps > 0 and np.isfinite(result.metrics["test"]["loss"])


@pytest.mark.parametrize("block", ["single_task", "shared_bottom", "omoe", "mmoe"])
def test_every_block_trains_from_the_same_config(block):
    cfg = config(model={"block": block}, train={"epochs": 2, "batch_size": 128, "progress": False, "lr": 0.01})
    result = mtrank.fit(cfg, make_frame(n=400), output=None)
    assert result.model.config.block.type == block and np.isfinite(result.metrics["test"]["loss"])


def test_an_embedded_bag_feature_trains_saves_scores_and_serves(tmp_path):
    from mtrank.export.model_dir import export_model_dir
    from mtrank.serve.service import ScoringService

    features = {**config()["features"], "multi_categorical": [{"name": "tags", "embed": True, "max_values": 2}]}
    result = mtrank.fit(config(features=features), make_frame(), output=tmp_path / "m")
    assert result.model.config.inputs.bag_lengths == [2] and result.model.config.inputs.bag_pooling == ["mean"]
    assert result.metrics["test"]["auc/click"] > 0.7
    frame = make_frame(n=40, seed=7)
    table = predict_model_dir(tmp_path / "m", frame.drop(columns=["click", "buy"]), progress=False)
    records = frame.drop(columns=["click", "buy", "ts"]).to_dict("records")
    service = ScoringService(tmp_path / "m", backend="eager")
    served = np.array([service.batcher(*service.encode({}, [r])) for r in records])[:, 0, 0]
    np.testing.assert_allclose(served, table.column("score_click").to_numpy(), rtol=1e-5)
    for fmt in ("onnx", "torchscript"):  # exported, and checked against eager PyTorch to 1e-5
        assert export_model_dir(tmp_path / "m", fmt, out=tmp_path / fmt)["max_abs_diff_vs_eager"] <= 1e-5
