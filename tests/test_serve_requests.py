"""Request encoding: a request encodes exactly as the same rows of a file, and every bad value is an error that
names the candidate (or the context), the feature and what to send."""

import numpy as np
import pandas as pd
import pytest

from mtrank.config.experiment import CategoricalFeature, FeaturesSpec, MultiCategoricalFeature, NumericFeature
from mtrank.data.encoders import FeatureEncoder
from mtrank.serve.requests import FeatureRequests, RawRequests, RequestError


def training_rows() -> pd.DataFrame:
    """Rows with every kind of feature, and a missing value in each."""
    return pd.DataFrame(
        [
            ("paris", "u1", 10, 20.0, 0.0, "a|b", "x|y"),
            ("paris", "u2", 11, 30.0, 1.0, "a", "x"),
            ("rome", "u3", 10, None, 10.0, "c", "y|q|x"),
            ("oslo", "u1", 12, 150.0, 100.0, None, "q"),
            ("rome", "u9", 10, 40.0, None, "b|b|a", None),
            (None, "u2", 11, 50.0, 3.0, "a", "x"),
            (None, "u3", 13, 25.0, 2.0, "z", "y"),
        ],
        columns=["city", "user", "item_id", "age", "spend", "genres", "tags"],
    )


@pytest.fixture(scope="module")
def requests() -> FeatureRequests:
    spec = FeaturesSpec(
        categorical=[
            CategoricalFeature("city", min_count=2),
            CategoricalFeature("user", hash_buckets=7),
            CategoricalFeature("item_id"),
        ],
        numeric=[NumericFeature("age", fill="median", clip=[0, 100]), NumericFeature("spend", log1p=True)],
        multi_categorical=[
            MultiCategoricalFeature("genres", pooling="mean"),
            MultiCategoricalFeature("tags", embed=True, max_values=2),
        ],
    )
    return FeatureRequests(FeatureEncoder(spec).fit(training_rows()))


CANDIDATE = {"city": "rome", "user": "u1", "item_id": 10, "age": 30.0, "spend": 1.0, "genres": "a", "tags": "x"}


def test_candidates_encode_exactly_like_the_rows_of_a_file(requests):
    rows = training_rows()
    candidates = rows.astype(object).where(rows.notna(), None).to_dict("records")
    dense, sparse = requests({}, candidates)
    file_dense, file_sparse = requests.encoder.transform(rows)
    np.testing.assert_allclose(dense, file_dense, rtol=1e-6)
    np.testing.assert_array_equal(sparse, file_sparse)


def test_context_features_encode_as_if_merged_into_every_candidate(requests):
    context = {"city": "rome", "age": 30.0}
    candidates = [
        {"user": "u1", "item_id": 10, "spend": 1.0, "genres": "a", "tags": ["x", "q"]},
        {"user": "zz", "item_id": 11, "spend": None, "genres": ["a", "b"], "tags": None},
    ]
    merged = requests({}, [{**context, **c} for c in candidates])
    split = requests(context, candidates)
    for merged_part, split_part in zip(merged, split):
        np.testing.assert_array_equal(split_part, merged_part)


def test_a_string_id_matches_the_integer_vocabulary(requests):
    _, as_int = requests({}, [{**CANDIDATE, "item_id": 11}])
    _, as_str = requests({}, [{**CANDIDATE, "item_id": "11"}])
    assert as_int[0, 2] == as_str[0, 2] > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"age": "old"}, "candidates[1]: feature 'age' has str 'old'; expected a number or null"),
        ({"age": True}, "candidates[1]: feature 'age' has bool True; expected a number or null"),
        ({"city": ["a"]}, "candidates[1]: feature 'city' has list ['a']; expected a string, an int or null"),
        ({"genres": 3.5}, "candidates[1]: feature 'genres' has float 3.5; expected a list of strings/ints"),
        ({"genres": 5}, "candidates[1]: feature 'genres' has int 5; expected a list of strings/ints"),
        ({"item_id": 2**64}, "candidates[1]: feature 'item_id' is an integer outside the 64-bit range; send the id"),
        ({"spend": -(2**70)}, "candidates[1]: feature 'spend' is an integer outside the 64-bit range; send it as"),
        ({"colour": "red"}, "candidates[1]: unknown feature 'colour'; the model reads ['age', 'spend', 'genres'"),
        ({"age": "x" * 500}, "candidates[1]: feature 'age' has str 'xxxxxxxx"),
    ],
)
def test_a_bad_candidate_value_names_the_candidate_the_feature_and_what_to_send(requests, change, message):
    with pytest.raises(RequestError) as caught:
        requests({}, [CANDIDATE, {**CANDIDATE, **change}])
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300  # one line, long values shortened


def test_a_missing_feature_says_where_to_give_it(requests):
    candidate = {k: v for k, v in CANDIDATE.items() if k != "age"}
    with pytest.raises(RequestError, match=r"^candidates\[0\]: missing feature 'age' \(required: .*\); give it in"):
        requests({}, [candidate])


def test_the_first_bad_candidate_is_named_and_in_it_the_first_bad_feature(requests):
    """Values are checked column by column, yet the error is the one a loop over candidates would find."""
    candidates = [CANDIDATE, {**CANDIDATE, "genres": 1.5}, {**CANDIDATE, "age": "old", "genres": 1.5}]
    candidates.insert(1, {**CANDIDATE, "spend": "a lot", "tags": 7})
    with pytest.raises(RequestError, match=r"^candidates\[1\]: feature 'spend' has str 'a lot'"):
        requests({}, candidates)


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"age": "old"}, "context: feature 'age' has str 'old'; expected a number or null"),
        ({"city": 10**30}, "context: feature 'city' is an integer outside the 64-bit range; send the id as a string"),
        ({"colour": "red"}, "context: unknown feature 'colour'; the model reads"),
    ],
)
def test_a_bad_context_value_names_the_context(requests, context, message):
    candidate = {k: v for k, v in CANDIDATE.items() if k not in context}
    with pytest.raises(RequestError) as caught:
        requests(context, [candidate])
    assert str(caught.value).startswith(message)


def test_a_feature_in_both_the_context_and_a_candidate_is_refused(requests):
    with pytest.raises(RequestError, match=r"^candidates\[0\]: feature 'city' is also in the context; give each"):
        requests({"city": "oslo"}, [CANDIDATE])


def test_a_candidate_that_is_not_an_object_is_named(requests):
    with pytest.raises(RequestError, match=r"^candidates\[1\]: expected an object of features, got int"):
        requests({}, [CANDIDATE, 5])


def test_raw_candidates_become_the_dense_and_sparse_arrays_they_list():
    dense, sparse = RawRequests(num_dense=2, vocab_sizes=[5, 3])({}, [{"dense": [0.5, -1], "sparse": [4, 0]}] * 2)
    assert dense.dtype == np.float32 and sparse.dtype == np.int64
    np.testing.assert_array_equal(dense, [[0.5, -1.0]] * 2)
    np.testing.assert_array_equal(sparse, [[4, 0]] * 2)
    dense, sparse = RawRequests(num_dense=2, vocab_sizes=[])({}, [{"dense": [1, 2]}])  # no ids: "sparse" optional
    assert dense.tolist() == [[1.0, 2.0]] and sparse.shape == (1, 0)


@pytest.mark.parametrize(
    ("context", "candidate", "message"),
    [
        ({}, {"dense": [1, 10**400], "sparse": [0]}, "candidates[0].dense[1]: expected a finite number, got 1000"),
        ({}, {"dense": [1, True], "sparse": [0]}, "candidates[0].dense[1]: expected a finite number, got True"),
        ({}, {"dense": [1, 2], "sparse": [True]}, "candidates[0].sparse[0]: expected an integer id in [0, 5)"),
        ({}, {"dense": [1, 2]}, "candidates[0].sparse: expected a list of 1 integer ids, got None"),
        ({}, [1, 2], "candidates[0]: expected an object with 'dense' and 'sparse', got [1, 2]"),
        ({"user": 1}, {"dense": [1, 2], "sparse": [0]}, "context: this model has no encoders.json"),
    ],
)
def test_raw_errors_name_the_candidate_and_the_position(context, candidate, message):
    with pytest.raises(RequestError) as caught:
        RawRequests(num_dense=2, vocab_sizes=[5])(context, [candidate])
    assert str(caught.value).startswith(message)
