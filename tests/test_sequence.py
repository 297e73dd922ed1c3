"""User action sequences: the encoder module (masks, padding), the fitted encoding (most recent kept, shared
vocabulary, unseen ids), the MovieLens history (no leak), Parquet list columns in memory and streamed, export and
the service."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mtrank
from mtrank.config import ConfigError, ModelConfig
from mtrank.config.experiment import FeaturesSpec, experiment_from_dict
from mtrank.config.model import SequenceConfig
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.errors import DataError
from mtrank.data.movielens import add_history
from mtrank.export.model_dir import export_model_dir
from mtrank.export.onnx import OnnxScorer
from mtrank.export.torchscript import load_torchscript
from mtrank.model import MultiTaskModel
from mtrank.nn.sequence import SequenceEncoder
from mtrank.serve.schemas import ScoreRequest
from mtrank.serve.service import ScoringService
from tabular_helpers import one_torch_thread  # noqa: F401
from test_pipeline_configs import example, write_movielens

ENCODINGS = [(0, "mean"), (1, "mean"), (0, "target"), (2, "target")]


@pytest.mark.parametrize("layers, pooling", ENCODINGS)
def test_a_padded_position_changes_nothing(layers, pooling):
    torch.manual_seed(0)
    config = SequenceConfig(length=6, vocab_size=21, actions=5, target=0, layers=layers, pooling=pooling)
    encoder = SequenceEncoder(config, start=1, dim=8).eval()
    for p in encoder.parameters():  # non-trivial weights everywhere (zeros would hide a leak)
        torch.nn.init.normal_(p, std=0.5)
    items = torch.tensor([[20, 20, 20, 3, 7, 1], [20, 20, 20, 20, 20, 20], [2, 5, 9, 0, 4, 8]])
    actions = torch.tensor([[4, 4, 4, 1, 2, 0], [4, 4, 4, 4, 4, 4], [0, 1, 2, 3, 0, 1]])
    sparse = torch.cat([torch.tensor([[5], [6], [7]]), items, actions], 1)
    out = encoder(sparse)
    # what sits at a padded position (its action, the padding row's embedding) does not reach the output
    changed = sparse.clone()
    changed[:, 7:][items == 20] = 2
    with torch.no_grad():
        encoder.items.weight[20] += 3.0
    torch.testing.assert_close(encoder(changed), out, rtol=0, atol=1e-6)
    # and the output is that of the valid items alone, without any padding
    for row, valid in ((0, 3), (2, 6)):
        x = encoder.items(items[row, -valid:]) + encoder.actions(actions[row, -valid:])
        x = (x + encoder.recency[:valid].flip(0)).unsqueeze(0)  # recency 0 = most recent, as in forward
        alone = encoder.pool(x, torch.ones(1, valid, dtype=torch.bool), sparse[row : row + 1])
        torch.testing.assert_close(alone[0], out[row], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out[1]).all()  # an empty history is the null token's, not NaN
    assert not torch.allclose(out[0], out[2])  # the items do reach it


def test_target_attention_depends_on_the_candidate():
    torch.manual_seed(0)
    encoder = SequenceEncoder(SequenceConfig(length=4, vocab_size=11, target=0, layers=0, pooling="target"), 1, 8)
    history = torch.tensor([[1, 2, 3, 4]])
    a, b = encoder(torch.cat([torch.tensor([[1]]), history], 1)), encoder(torch.cat([torch.tensor([[9]]), history], 1))
    assert not torch.allclose(a, b)
    mean = SequenceEncoder(SequenceConfig(length=4, vocab_size=11, target=0, layers=0, pooling="mean"), 1, 8)
    assert mean.actions is None and mean.times is None  # no tables (parameters) for what the sequence lacks
    torch.testing.assert_close(
        mean(torch.cat([torch.tensor([[1]]), history], 1)), mean(torch.cat([torch.tensor([[9]]), history], 1))
    )


def sequence_spec(**sequence) -> FeaturesSpec:
    seq = {"name": "hist", "max_length": 3, "target": "item", "actions_column": "acts", **sequence}
    return FeaturesSpec.from_dict({"categorical": [{"name": "item"}], "sequence": [seq]}, "features")


def test_the_encoding_keeps_the_most_recent_items_left_padded_in_the_targets_vocabulary():
    table = pa.table(
        {
            "item": [10, 11, 12, 10],
            "hist": [[], [10], [10, 11, 12, 99], None],  # oldest first; 99 was never a candidate
            "acts": [[], ["a"], ["a", "b", "c", "a"], None],
        }
    )
    encoder = FeatureEncoder(sequence_spec()).fit(table)
    _, sparse = encoder.transform(table)
    item = dict(zip(encoder.state["item"]["vocab"], range(1, 4)))  # 10 -> 1 (most frequent), ...
    pad = encoder.state["item"]["size"]  # V + 1
    assert sparse[:, 0].tolist() == [item[10], item[11], item[12], item[10]]
    assert sparse[:, 1:4].tolist() == [[pad] * 3, [pad, pad, item[10]], [item[11], item[12], 0], [pad] * 3]
    acts = dict(zip(encoder.state["hist"]["actions"], range(1, 4)))
    assert sparse[2, 4:].tolist() == [acts["b"], acts["c"], acts["a"]]  # the actions of the kept items
    assert encoder.vocab_sizes == [4, 5, 5, 5, 5, 5, 5]
    assert encoder.sequence_inputs[0]["target"] == 0 and encoder.sequence_inputs[0]["vocab_size"] == 5
    again = FeatureEncoder.from_dict(encoder.to_dict())  # saved in the model directory's encoders.json
    np.testing.assert_array_equal(again.transform(table)[1], sparse)


def test_a_sequence_without_target_fits_its_own_vocabulary_and_bad_rows_are_named():
    table = pa.table({"item": [1, 2], "hist": [[5, 5, 6], [7]], "acts": [["x"], ["y"]]})
    spec = sequence_spec(target="", actions_column="", min_count=2)
    encoder = FeatureEncoder(spec).fit(table)
    assert encoder.state["hist"]["vocab"] == [5]  # 6 and 7 are rarer than min_count: unseen, id 0
    assert encoder.transform(table)[1][:, 1:].tolist() == [[1, 1, 0], [2, 2, 0]]
    with pytest.raises(DataError, match=r"acts.*1 values for 3 items of 'hist'.*one value per item"):
        FeatureEncoder(sequence_spec()).fit(table).transform(table)
    with pytest.raises(ConfigError, match=r"features.sequence\[0\].target: 'itm' is not a categorical feature"):
        sequence_spec(target="itm")
    with pytest.raises(ConfigError, match=r"features.sequence\[0\].pooling: 'target' attends from the candidate"):
        sequence_spec(target="", pooling="target")


def test_item_times_become_log2_age_buckets_of_the_kept_items():
    table = pa.table(
        {
            "item": [1, 2],
            "hist": [[5, 6, 7], [8]],
            "when": [[0.0, 1000.0, 1023.0], [None]],  # a missing time: the unknown bucket
            "now": [1024.0, 50.0],
        }
    )
    spec = sequence_spec(target="", actions_column="", times_column="when", time_column="now", max_length=2)
    encoder = FeatureEncoder(spec).fit(table)
    _, sparse = encoder.transform(table)
    # ages of the kept (last two) items: 24 s -> floor(log2 25) = 4, 1 s -> 1; row 1: one unknown, one padding
    assert sparse[:, 3:].tolist() == [[4, 1], [32, 32]]
    assert encoder.sequence_inputs[0]["times"] == 33 and encoder.categorical_names[-1] == "hist.age[1]"
    with pytest.raises(ConfigError, match=r"features.sequence\[0\].time_column: times_column needs the row's own time"):
        sequence_spec(times_column="when")


def test_the_movielens_history_holds_only_the_users_strictly_earlier_ratings():
    rng = np.random.default_rng(0)
    n = 300
    table = pa.table(
        {
            "user_id": rng.integers(1, 6, n),
            "item_id": rng.integers(1, 40, n),
            "timestamp": rng.integers(0, 60, n),  # many ties within a user
            "rating": rng.integers(1, 6, n).astype(float),
        }
    )
    out = add_history(table, max_length=4).to_pandas()
    frame = table.to_pandas()
    for row in range(n):  # brute force: the 4 latest earlier ratings of the same user, by (time, item)
        user, time = frame.user_id[row], frame.timestamp[row]
        earlier = frame[(frame.user_id == user) & (frame.timestamp < time)].sort_values(["timestamp", "item_id"])
        assert list(out.history_items[row]) == earlier.item_id.tolist()[-4:]
        assert list(out.history_ratings[row]) == earlier.rating.astype(int).tolist()[-4:]
        assert list(out.history_times[row]) == earlier.timestamp.tolist()[-4:]
    times = dict(zip(zip(frame.user_id, frame.item_id), frame.timestamp))
    leaks = [
        row
        for row in range(n)
        if any(
            frame.timestamp[(frame.user_id == frame.user_id[row]) & (frame.item_id == item)].min()
            >= frame.timestamp[row]
            for item in out.history_items[row]
        )
    ]
    assert not leaks and times  # no history item was first rated at or after the row's time


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic click log in Parquet with list columns: the click is likely when the history holds one of
    the items 1..4 (a fan of them); trained, then exported and served."""
    folder = tmp_path_factory.mktemp("seq")
    rng = np.random.default_rng(0)
    n = 3000
    histories = [list(rng.integers(1, 30, rng.integers(0, 9))) for _ in range(n)]
    items = rng.integers(1, 30, n)
    seen = np.array([min(h, default=99) <= 4 for h in histories])
    click = (rng.random(n) < np.where(seen, 0.8, 0.1)).astype(float)
    frame = pd.DataFrame(
        {
            "item": items,
            "device": rng.choice(["ios", "web"], n),
            "hist": histories,
            "acts": [[str(a) for a in rng.integers(0, 3, len(h))] for h in histories],
            "ago": [sorted(rng.integers(0, 10_000, len(h)).tolist()) for h in histories],
            "now": rng.integers(10_000, 20_000, n),
            "click": click,
            "like": click * (rng.random(n) < 0.5),
        }
    )
    pq.write_table(pa.Table.from_pandas(frame.iloc[:2400], preserve_index=False), folder / "train.parquet")
    pq.write_table(pa.Table.from_pandas(frame.iloc[2400:], preserve_index=False), folder / "valid.parquet")
    raw = {
        "data": {"train": str(folder / "train.parquet"), "valid": str(folder / "valid.parquet")},
        "features": {
            "categorical": [{"name": "item"}, {"name": "device"}],
            "sequence": [
                {
                    "name": "hist",
                    "target": "item",
                    "actions_column": "acts",
                    "times_column": "ago",
                    "time_column": "now",
                    "max_length": 6,
                    "pooling": "target",
                }
            ],
        },
        "tasks": [{"name": "click"}, {"name": "like"}],
        "model": {"inputs": {"embedding_dim": 8}, "block": {"type": "mmoe", "num_experts": 2}, "mixer": {"layers": 1}},
        "train": {"epochs": 6, "batch_size": 128, "lr": 0.01, "progress": False},
    }
    raw["data"]["split"] = {"method": "files"}
    result = mtrank.fit(raw, output=folder / "model", baseline=False)
    return result, folder, frame, raw


def test_a_sequence_model_learns_from_parquet_list_columns(trained):
    result, folder, _, _ = trained
    assert result.metrics["valid"]["auc/click"] > 0.75  # the signal is only in the history


def test_streamed_parquet_list_columns_train_the_same_model(trained, tmp_path):
    _, folder, _, raw = trained
    streamed = {**raw, "data": {**raw["data"], "streaming": True, "workers": 0}, "train": {**raw["train"], "epochs": 1}}
    result = mtrank.fit(streamed, output=None, baseline=False)
    assert result.model.config.inputs.sequences[0].length == 6
    assert np.isfinite(result.metrics["valid"]["auc/click"])


def test_a_sequence_model_scores_alike_eager_torchscript_onnx_and_the_service(trained):
    result, folder, frame, _ = trained
    rows = frame.iloc[2400:2440]
    dense, sparse = result.encoder.transform(rows)
    expected = result.model.predict(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()
    for fmt, load in (("torchscript", load_torchscript), ("onnx", OnnxScorer)):
        record = export_model_dir(folder / "model", fmt)
        got = np.asarray(load(record["path"])(torch.from_numpy(dense), torch.from_numpy(sparse)))
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    service = ScoringService(folder / "model")
    candidates = [
        {
            "item": int(r.item),
            "device": r.device,
            "hist": [int(i) for i in r.hist],
            "acts": list(r.acts),
            "ago": [int(t) for t in r.ago],
            "now": int(r.now),
        }
        for r in rows.itertuples()
    ]
    context_free = service.score(ScoreRequest(candidates=candidates))
    served = np.array([[s["click"], s["like"]] for s in context_free.scores])
    np.testing.assert_allclose(served, expected, rtol=2e-5, atol=2e-5)
    # the history as context (one user, many candidates): the same as repeating it in each candidate
    context = {key: candidates[0][key] for key in ("hist", "acts", "ago", "now")}
    shared = service.score(
        ScoreRequest(context=context, candidates=[{"item": c["item"], "device": c["device"]} for c in candidates])
    )
    repeated = service.score(ScoreRequest(candidates=[{**c, **context} for c in candidates]))
    assert shared.scores == repeated.scores


def test_the_movielens_sequence_config_trains_on_tiny_ratings(tmp_path):
    write_movielens(tmp_path)
    raw = example("movielens_100k_seq.yaml", tmp_path, epochs=1, batch_size=64)
    raw["data"].update(train=str(tmp_path / "recbole"))
    config = experiment_from_dict(raw)
    assert config.data.history == 20 and config.features.sequence[0].target == "item_id"
    result = mtrank.fit(raw, output=tmp_path / "model", baseline=False)
    assert result.rows == {"train": 320, "valid": 40, "test": 40}
    assert result.encoder.categorical_names[-1] == "history.age[19]"
    assert np.isfinite(result.metrics["test"]["auc/liked"])


def test_sequences_are_refused_where_they_cannot_go():
    seq = {"length": 2, "vocab_size": 5, "target": 0, "pooling": "target"}
    inputs = {"num_dense": 1, "vocab_sizes": [4, 5, 5], "embedding_dim": 8, "sequences": [seq]}
    MultiTaskModel(ModelConfig.from_dict({"inputs": inputs}))
    with pytest.raises(ConfigError, match=r"sequences\[0\].target: the target's ids \[0, 6\) must be item ids"):
        ModelConfig.from_dict({"inputs": {**inputs, "vocab_sizes": [6, 5, 5]}}).validate("model")
    with pytest.raises(ConfigError, match=r"inputs.sequences: not with block stem"):
        ModelConfig.from_dict({"inputs": inputs, "block": {"type": "stem"}}).validate("model")


def test_a_sequence_trains_beside_a_sparse_bf16_table_and_a_padded_input(trained, tmp_path):
    """The features of three engineers at once: a sequence sharing the target's ids, the table in bf16 trained by
    row-wise Adagrad (sparse rows), the block input padded to a multiple of 64."""
    _, _, _, raw = trained
    raw = {
        **raw,
        "model": {**raw["model"], "inputs": {"embedding_dim": 8, "table_dtype": "bf16", "pad_to": 64}},
        "train": {**raw["train"], "epochs": 2, "sparse": "rowwise_adagrad"},
    }
    result = mtrank.fit(raw, output=tmp_path / "model", baseline=False)
    model = result.model
    width = model.block.levels[0].experts.linear_banks()[0][0][0].in_features  # the first expert layer's input
    assert model.input_pad > 0 and width % 64 == 0 and model.embedding.table.weight.dtype == torch.bfloat16
    assert result.metrics["valid"]["auc/click"] > 0.75  # the history carries the click (0.8 vs 0.1)
