import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mtrank.config.experiment import CategoricalFeature, FeaturesSpec, MultiCategoricalFeature, NumericFeature
from mtrank.data.encoders import ENCODERS_FILE, FeatureEncoder
from mtrank.data.errors import DataError


def spec():
    return FeaturesSpec(
        categorical=[
            CategoricalFeature("city", min_count=2),
            CategoricalFeature("user", hash_buckets=7),
            CategoricalFeature("item_id"),
        ],
        numeric=[NumericFeature("age", fill="median", clip=[0, 100]), NumericFeature("spend", log1p=True)],
        multi_categorical=[MultiCategoricalFeature("genres", pooling="mean")],
    )


def frame():
    return pd.DataFrame(
        {
            "city": ["paris", "paris", "rome", "oslo", "rome", None, None],
            "user": ["u1", "u2", "u3", "u1", "u9", "u2", "u3"],
            "item_id": [10, 11, 10, 12, 10, 11, 13],
            "age": [20.0, 30.0, np.nan, 150.0, 40.0, 50.0, 25.0],
            "spend": [0.0, 1.0, 10.0, 100.0, np.nan, 3.0, 2.0],
            "genres": ["a|b", "a", "c", None, "b|b|a", "a", "z"],
        }
    )


def test_columns_come_out_in_feature_order_with_declared_widths():
    enc = FeatureEncoder(spec()).fit(frame())
    dense, sparse = enc.transform(frame())
    # numeric first, then the multi-hot block (OOV column + vocabulary), categorical ids in sparse
    assert enc.feature_names[:3] == ["age", "spend", "genres=<oov>"]
    assert enc.feature_names[-3:] == ["city", "user", "item_id"]
    assert dense.shape == (7, enc.num_dense) and dense.dtype == np.float32
    assert sparse.shape == (7, 3) and sparse.dtype == np.int64
    assert enc.num_dense == 2 + 1 + 4  # genres vocabulary a, b, c, z


def test_vocabulary_keeps_values_seen_min_count_times_and_sends_the_rest_to_oov():
    enc = FeatureEncoder(spec()).fit(frame())
    _, sparse = enc.transform(frame())
    city = sparse[:, 0]
    # paris x2, rome x2, <NA> x2 are kept; oslo (once) is OOV
    assert city[3] == 0
    assert len(set(city[[0, 1]])) == 1 and city[0] > 0
    assert city[5] == city[6] > 0  # missing values are their own category
    assert enc.vocab_sizes[0] == 4


def test_unseen_categories_map_to_the_oov_bucket():
    enc = FeatureEncoder(spec()).fit(frame())
    test = frame().assign(city=["madrid"] * 7, item_id=[999] * 7)
    _, sparse = enc.transform(test)
    assert (sparse[:, 0] == 0).all() and (sparse[:, 2] == 0).all()


def test_hashed_feature_ids_are_stable_and_below_the_bucket_count():
    enc = FeatureEncoder(spec()).fit(frame())
    _, sparse = enc.transform(frame())
    user = sparse[:, 1]
    assert user.max() < 7 and user.min() >= 0
    assert user[0] == user[3]  # same value, same bucket
    again = FeatureEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert np.array_equal(again.transform(frame())[1][:, 1], user)


def test_numeric_fill_clip_log_and_standardise_follow_the_training_split():
    enc = FeatureEncoder(spec()).fit(frame())
    dense, _ = enc.transform(frame())
    age = np.array([20.0, 30.0, 0.0, 100.0, 40.0, 50.0, 25.0])
    age[2] = np.median([20.0, 30.0, 150.0, 40.0, 50.0, 25.0])  # median fill before the clip
    age = np.clip(age, 0, 100)
    np.testing.assert_allclose(dense[:, 0], (age - age.mean()) / age.std(), rtol=1e-5)
    np.testing.assert_allclose(dense[:, 0].mean(), 0, atol=1e-6)
    spend = np.array([0.0, 1.0, 10.0, 100.0, np.nan, 3.0, 2.0])
    spend[4] = np.nanmean(spend)
    z = np.log1p(spend)
    np.testing.assert_allclose(dense[:, 1], (z - z.mean()) / z.std(), rtol=1e-5)


def test_multi_valued_mean_pooling_gives_rows_that_sum_to_one():
    enc = FeatureEncoder(spec()).fit(frame())
    dense, _ = enc.transform(frame())
    block = dense[:, 2:7]
    names = enc.feature_names[2:7]
    np.testing.assert_allclose(block[[0, 1, 2, 4, 5, 6]].sum(1), 1.0, rtol=1e-6)
    assert block[3].sum() == 0  # a missing list contributes nothing
    row = dict(zip(names, block[4]))  # "b|b|a"
    assert row["genres=b"] == pytest.approx(2 / 3) and row["genres=a"] == pytest.approx(1 / 3)


def test_multi_valued_sum_pooling_counts_and_accepts_list_columns():
    features = FeaturesSpec(multi_categorical=[MultiCategoricalFeature("tags", pooling="sum")])
    table = pa.table({"tags": pa.array([["x", "y"], ["x", "x", "q"], []], pa.list_(pa.string()))})
    enc = FeatureEncoder(features).fit(table)
    dense, _ = enc.transform(table)
    assert enc.feature_names == ["tags=<oov>", "tags=x", "tags=q", "tags=y"]
    np.testing.assert_array_equal(dense, [[0, 1, 0, 1], [0, 2, 1, 0], [0, 0, 0, 0]])


def test_save_and_load_round_trip_writes_encoders_json(tmp_path):
    enc = FeatureEncoder(spec()).fit(frame())
    path = enc.save(tmp_path)
    assert path.name == ENCODERS_FILE and json.loads(path.read_text())["format"] == "mtrank-encoders"
    loaded = FeatureEncoder.load(tmp_path)
    assert loaded.feature_names == enc.feature_names and loaded.vocab_sizes == enc.vocab_sizes
    for a, b in zip(loaded.transform(frame()), enc.transform(frame())):
        np.testing.assert_array_equal(a, b)


def test_loading_a_directory_without_encoders_says_how_to_make_one(tmp_path):
    with pytest.raises(DataError, match="no fitted encoders"):
        FeatureEncoder.load(tmp_path)


def test_text_in_a_numeric_column_names_the_column_and_the_row():
    enc = FeatureEncoder(spec()).fit(frame())
    bad = frame().assign(age=["20", "30", "n/a?", "1", "2", "3", "4"])
    with pytest.raises(DataError, match=r"column 'age': text 'n/a\?' in a numeric column .*data row 2"):
        enc.transform(bad, source="users.csv")


def test_an_all_missing_numeric_column_fails_the_fit():
    with pytest.raises(DataError, match="column 'age': every value is missing"):
        FeatureEncoder(spec()).fit(frame().assign(age=np.nan))


def test_a_missing_column_is_named_with_a_suggestion():
    with pytest.raises(DataError, match="column 'city'.*missing.*did you mean 'cty'"):
        FeatureEncoder(spec()).fit(frame().rename(columns={"city": "cty"}))


def test_encoding_does_not_loop_over_rows_in_python():
    # 200k rows encode in one vectorised pass: checks the shape contract at a size a per-row loop would notice
    rng = np.random.default_rng(0)
    n = 200_000
    df = pd.DataFrame(
        {
            "city": rng.choice(["a", "b", "c"], n),
            "user": rng.integers(0, 1000, n).astype(str),
            "item_id": rng.integers(0, 50, n),
            "age": rng.normal(40, 10, n),
            "spend": rng.exponential(5, n),
            "genres": rng.choice(["a|b", "c", "b"], n),
        }
    )
    enc = FeatureEncoder(spec()).fit(df)
    dense, sparse = enc.transform(df)
    assert dense.shape == (n, enc.num_dense) and np.isfinite(dense).all() and (sparse >= 0).all()


@pytest.mark.parametrize("ids", [[3, 5, 5, 7, 9], [10**12, 5, 5, -7, 2**40]])  # compact and sparse id ranges
def test_integer_ids_map_like_the_vocabulary_with_nulls_and_unseen_values_to_oov(ids):
    features = FeaturesSpec(categorical=[CategoricalFeature("item")])
    enc = FeatureEncoder(features).fit(pa.table({"item": pa.array(ids, pa.int64())}))
    vocab = enc.state["item"]["vocab"]
    probe = pa.table({"item": pa.array([ids[1], ids[0], 424242, None, ids[4]], pa.int64())})
    _, sparse = enc.transform(probe)
    assert sparse[:, 0].tolist() == [
        vocab.index(ids[1]) + 1,
        vocab.index(ids[0]) + 1,
        0,
        0,
        vocab.index(ids[4]) + 1,
    ]
    assert vocab[0] == 5  # the most frequent value gets id 1


def test_string_lookup_gives_the_same_ids_for_small_and_large_columns():
    from mtrank.data.encoders import NA_TOKEN, StringLookup

    vocab = [f"v{i}" for i in range(50)] + [NA_TOKEN, "7"]
    lookup = StringLookup(vocab)
    rng = np.random.default_rng(0)
    values = [f"v{i}" for i in rng.integers(0, 80, 6000)] + [NA_TOKEN, "7", "unseen"]
    column = pa.array(values, pa.string())
    large = lookup(column)  # more than StringLookup.SMALL rows: pyarrow's index_in
    small = np.concatenate([lookup(column.slice(i, 1000)) for i in range(0, len(values), 1000)])  # the dict
    np.testing.assert_array_equal(small, large)
    assert large[-3:].tolist() == [51, 52, 0] and (large[:-3] == 0).any()


def test_an_embedded_multi_valued_feature_becomes_padded_bag_ids():
    features = FeaturesSpec(
        categorical=[CategoricalFeature("city")],
        multi_categorical=[MultiCategoricalFeature("tags", embed=True, max_values=3, pooling="sum")],
    )
    table = pa.table(
        {
            "city": ["a", "b", "a", "a"],
            "tags": pa.array([["x", "y"], ["x", "x", "q", "y"], [], None], pa.list_(pa.string())),
        }
    )
    enc = FeatureEncoder(features).fit(table)
    dense, sparse = enc.transform(table)
    assert dense.shape == (4, 0)  # nothing dense: the bag is ids
    vocab = enc.state["tags"]["vocab"]  # x, y, q by frequency
    ids = {v: i + 1 for i, v in enumerate(vocab)}
    pad = len(vocab) + 1
    assert enc.vocab_sizes == [3, pad + 1, pad + 1, pad + 1]
    assert enc.bag_inputs == [{"length": 3, "pooling": "sum"}]
    assert enc.categorical_names == ["city", "tags[0]", "tags[1]", "tags[2]"]
    np.testing.assert_array_equal(
        sparse[:, 1:],
        [[ids["x"], ids["y"], pad], [ids["x"], ids["x"], ids["q"]], [pad] * 3, [pad] * 3],  # 4th value dropped
    )
    _, unseen = enc.transform(pa.table({"city": ["a"], "tags": ["zz|x"]}))
    assert unseen[0, 1:].tolist() == [0, ids["x"], pad]  # unseen value -> 0 (OOV), not padding


@pytest.mark.parametrize("spread", [1, 10**9])  # compact values (the dense table) and sparse ones (sorted keys)
def test_int_lookup_gives_each_value_its_vocabulary_position_and_zero_elsewhere(spread):
    from mtrank.data.encoders import IntLookup

    rng = np.random.default_rng(spread)
    vocab = (rng.choice(5000, 1000, replace=False) * spread - 300).tolist()
    ids = {v: i for i, v in enumerate(vocab, 1)}
    low, high = min(vocab), max(vocab)
    values = [*rng.choice(vocab, 3000).tolist(), *rng.integers(low - 50, high + 50, 3000).tolist()]
    values += [low - 1, high + 1, -(2**63), 2**63 - 1, 0, None]  # just outside the span, int64's ends, missing
    got = IntLookup(vocab)(pa.array(values, pa.int64()))
    np.testing.assert_array_equal(got, [ids.get(v, 0) for v in values])
