"""A scoring request's features -> the model's inputs ``(dense float32 [N, F_dense], sparse int64 [N, F_cat])``.

Two forms, by what the model directory holds:

* with ``encoders.json`` (:class:`FeatureRequests`): raw values by feature name. The ``context``'s features are
  shared by every candidate (a feature is in the context or in every candidate, not both). The request is
  checked, turned into a pyarrow table of the encoder's input columns and encoded by the model's
  :class:`~mtrank.data.encoders.FeatureEncoder`, the same transform that encoded the training files.
* without (:class:`RawRequests`): each candidate is ``{"dense": [F_dense numbers], "sparse": [F_cat ids]}``
  and the context is empty.

Every problem raises a :class:`RequestError` whose one-line message names where it is (``context`` or
``candidates[i]``), the feature, and what to send instead.

Values are checked column by column (``all(map(check, column))``), not value by value in Python: a request is
~100 candidates x ~40 features, and per-value checking was most of its encoding time. The error still names
the first bad candidate, and in it the first bad feature, as a loop would.
"""

from __future__ import annotations

import math
from operator import itemgetter
from types import NoneType
from typing import Any

import numpy as np
import pyarrow as pa

from mtrank.data.encoders import FeatureEncoder
from mtrank.data.errors import DataError
from mtrank.serve.limits import MAX_STRING_CHARS

INT64_MIN, INT64_END = -(2**63), 2**63


class RequestError(ValueError):
    """A problem with a request; ``status`` is the HTTP status to answer with (4xx)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------ value checks
# JSON gives None, bool, int (any size), float, str, list, dict; bool is an int subclass and not a number here


def _is_int64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value < INT64_END


def _is_number_or_none(value: Any) -> bool:
    """A finite number or null: NaN, +-Infinity and literals that overflow (1e400 parses as inf) are refused."""
    return value is None or (isinstance(value, float) and math.isfinite(value)) or _is_int64(value)


def _is_short_str(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_STRING_CHARS


def _is_id_or_none(value: Any) -> bool:
    return value is None or _is_short_str(value) or _is_int64(value)


def _is_id_list_or_none(value: Any) -> bool:
    if value is None or _is_short_str(value):
        return True
    return (
        isinstance(value, list)
        and len(value) <= MAX_STRING_CHARS
        and all(_is_short_str(v) or _is_int64(v) for v in value)
    )


CHECKS = {"numeric": _is_number_or_none, "categorical": _is_id_or_none, "multi": _is_id_list_or_none}


def _column_passes(kind: str, values: list[Any]) -> bool:
    """``all(map(CHECKS[kind], values))``, with the common columns checked without a Python call per value: floats
    (and nulls) through numpy, strings (and nulls) by their lengths. Other columns (ints, mixed types) go value
    by value."""
    types = set(map(type, values))
    if kind == "numeric" and types <= {float, NoneType}:
        numbers = np.array(values, dtype=np.float64)  # null -> NaN: as many NaN as nulls, else a NaN was sent
        return int(np.isnan(numbers).sum()) == values.count(None) and not np.isinf(numbers).any()
    if kind == "categorical" and types <= {str, NoneType}:
        return max(map(len, filter(None, values)), default=0) <= MAX_STRING_CHARS
    return all(map(CHECKS[kind], values))


EXPECTED = {
    "numeric": "a number or null",
    "categorical": "a string, an int or null",
    "multi": "a list of strings/ints, a separated string, or null",
}


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (an error message stays one short line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def value_error(where: str, feature: str, kind: str, value: Any) -> RequestError:
    """The error for a value that failed ``CHECKS[kind]``: an integer outside int64, or a wrong type."""
    if isinstance(value, float) and not math.isfinite(value):
        return RequestError(
            f"{where}: feature {feature!r} is {value!r}, not a finite number; send a finite number, or null for a "
            "missing value"
        )
    if isinstance(value, (str, list)) and len(value) > MAX_STRING_CHARS:
        return RequestError(
            f"{where}: feature {feature!r} has a {type(value).__name__} of length {len(value)}; at most "
            f"{MAX_STRING_CHARS}"
        )
    if kind == "multi" and isinstance(value, list):
        return RequestError(f"{where}: feature {feature!r} has {_short(value)}; expected {EXPECTED[kind]}")
    if kind != "multi" and isinstance(value, int) and not isinstance(value, bool):  # numbers and ids: out of range
        fix = "send it as a float" if kind == "numeric" else "send the id as a string"
        return RequestError(f"{where}: feature {feature!r} is an integer outside the 64-bit range; {fix}")
    return RequestError(
        f"{where}: feature {feature!r} has {type(value).__name__} {_short(value)}; expected {EXPECTED[kind]}"
    )


# ------------------------------------------------------------------------------------------ the two forms


class FeatureRequests:
    """Raw feature values by name -> model inputs, through the model directory's fitted encoders.

    Call with ``context`` (``{feature: value}``, shared by every candidate) and ``candidates`` (a list of
    ``{feature: value}``); returns ``(dense float32 [N, F_dense], sparse int64 [N, F_cat])`` for the N
    candidates, exactly as :meth:`FeatureEncoder.transform` encodes the same rows of a file.

    Args:
        encoder: the fitted encoders of the model directory.

    Example:
        >>> import pandas as pd
        >>> from mtrank.config.experiment import CategoricalFeature, FeaturesSpec, NumericFeature
        >>> spec = FeaturesSpec(categorical=[CategoricalFeature("city")], numeric=[NumericFeature("age")])
        >>> encoder = FeatureEncoder(spec).fit(pd.DataFrame({"city": ["a", "b", "a"], "age": [20.0, 30.0, None]}))
        >>> requests = FeatureRequests(encoder)
        >>> dense, sparse = requests({"age": 25.0}, [{"city": "a"}, {"city": "zzz"}])
        >>> dense.shape, sparse.ravel().tolist()
        ((2, 1), [1, 0])
        >>> requests({}, [{"city": "a", "age": "old"}])
        Traceback (most recent call last):
        ...
        mtrank.serve.requests.RequestError: candidates[0]: feature 'age' has str 'old'; expected a number or null
    """

    def __init__(self, encoder: FeatureEncoder) -> None:
        self.encoder = encoder
        features = encoder.features
        self.columns = encoder.input_columns  # the keys a request gives, in the encoder's order
        self.kinds = {f.column: "numeric" for f in features.numeric}
        self.kinds.update({f.column: "multi" for f in features.multi_categorical})
        self.kinds.update({f.column: "categorical" for f in features.categorical})
        self.separators = {f.column: f.separator for f in features.multi_categorical}
        for feat in features.sequence:  # lists of item ids, actions, times (as a multi-categorical value is)
            for column in filter(None, (feat.column, feat.actions_column, feat.times_column)):
                self.kinds[column], self.separators[column] = "multi", feat.separator
            if feat.time_column:
                self.kinds.setdefault(feat.time_column, "numeric")

    def __call__(self, context: dict[str, Any], candidates: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        return self.encode(self.table(context, candidates))

    def encode(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """A checked request's table -> ``(dense, sparse)``; a value that overflows once standardised (1e308) is
        the same 422 as a non-finite one, naming the candidate and the feature."""
        dense, sparse = self.encoder.transform(table, source="request")
        try:
            self.encoder.check_finite(dense, table, "request")
        except DataError as err:
            numeric = self.encoder.features.numeric
            bad = ~np.isfinite(dense[:, : len(numeric)])
            row = int(np.flatnonzero(bad.any(1))[0])
            column = numeric[int(np.flatnonzero(bad[row])[0])].column
            problem = str(err).split(": value ", 1)[-1].split(" (", 1)[0].split(". ", 1)[0]
            raise RequestError(
                f"candidates[{row}]: feature {column!r}: value {problem}; send a value near the training range"
            ) from None
        return dense, sparse

    def encode_many(self, tables: list[pa.Table]) -> list[tuple[np.ndarray, np.ndarray] | RequestError]:
        """Several requests' tables encoded in one pass (the encoder's fixed cost per column paid once), each
        result exactly :meth:`encode` of its table alone (encoding is row by row); when the pass fails (a bad
        value, or tables whose column types differ), each table is encoded alone, so every error names its own
        request's candidate."""
        if len(tables) > 1 and all(t.schema == tables[0].schema for t in tables):
            try:
                dense, sparse = self.encode(pa.concat_tables(tables))  # (sum n_i, F_dense), (sum n_i, F_cat)
            except RequestError:
                pass
            else:
                offsets = np.cumsum([0] + [t.num_rows for t in tables])
                return [(dense[a:b], sparse[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
        results: list[tuple[np.ndarray, np.ndarray] | RequestError] = []
        for table in tables:
            try:
                results.append(self.encode(table))
            except RequestError as err:
                results.append(err)
        return results

    def unseen(self, sparse: np.ndarray) -> dict[str, int]:
        """Candidates per categorical feature whose value was not in the training vocabulary (non-zero only)."""
        counts = self.encoder.unseen_counts(sparse)
        return {f.column: int(c) for f, c in zip(self.encoder.features.categorical, counts) if c}

    def example(self) -> dict[str, Any]:
        """A valid request of two candidates: each numeric feature at its training mean, each categorical one
        at a value of its training vocabulary (what the OpenAPI schema shows)."""
        values: dict[str, Any] = {}
        for feat in self.encoder.features.all():
            state = self.encoder.state.get(feat.name, {})
            if self.kinds[feat.column] == "numeric":
                values[feat.column] = round(float(state.get("mean", 0.0)), 4)
                continue
            vocab = state.get("vocab") or self.encoder.state.get(state.get("target"), {}).get("vocab") or ["a"]
            values[feat.column] = [vocab[0]] if self.kinds[feat.column] == "multi" else vocab[0]
            if getattr(feat, "actions_column", ""):  # a sequence's actions and times: one per item
                values[feat.actions_column] = state["actions"][:1] or ["a"]
            if getattr(feat, "times_column", ""):
                values[feat.times_column], values[feat.time_column] = [0], 0
        return {"context": {}, "candidates": [values, dict(values)]}

    def table(self, context: dict[str, Any], candidates: list[dict[str, Any]]) -> pa.Table:
        """The request as a table of the encoder's input columns, one row per candidate (context repeated)."""
        self._check_context(context)
        own = [c for c in self.columns if c not in context]  # the features each candidate gives
        self._check_keys(context, candidates, own)
        n = len(candidates)
        if len(own) > 1:  # the candidates' rows as columns, at C speed: (N, own) -> (own, N)
            values = dict(zip(own, map(list, zip(*map(itemgetter(*own), candidates)))))
        else:
            values = {c: [candidate[c] for candidate in candidates] for c in own}
        self._check_values(values)
        return pa.table({c: self._array(c, values[c] if c in values else [context[c]] * n) for c in self.columns})

    prepare = table  # a request checked, not yet encoded (what the service's coalescer batches)

    @staticmethod
    def rows(table: pa.Table) -> int:
        """Candidates in a prepared request."""
        return table.num_rows

    def _check_context(self, context: Any) -> None:
        if not isinstance(context, dict):
            raise RequestError(f"context: expected an object of features, got {type(context).__name__}")
        unknown = sorted(set(context) - set(self.columns))
        if unknown:
            raise RequestError(f"context: unknown feature {unknown[0]!r}; the model reads {self.columns}")
        for column, value in context.items():  # once per request, whatever the number of candidates
            if not CHECKS[self.kinds[column]](value):
                raise value_error("context", column, self.kinds[column], value)

    def _check_keys(self, context: dict[str, Any], candidates: list[Any], own: list[str]) -> None:
        own_keys = set(own)
        for i, candidate in enumerate(candidates):
            if not isinstance(candidate, dict):
                raise RequestError(f"candidates[{i}]: expected an object of features, got {type(candidate).__name__}")
            if candidate.keys() == own_keys:
                continue
            both = sorted(set(candidate) & set(context))
            if both:
                raise RequestError(
                    f"candidates[{i}]: feature {both[0]!r} is also in the context; give each feature in one place"
                )
            missing = [c for c in own if c not in candidate]
            if missing:
                raise RequestError(
                    f"candidates[{i}]: missing feature {missing[0]!r} (required: {self.columns}); give it in the "
                    "context or in every candidate"
                )
            unknown = sorted(set(candidate) - own_keys)
            raise RequestError(f"candidates[{i}]: unknown feature {unknown[0]!r}; the model reads {self.columns}")

    def _check_values(self, values: dict[str, list[Any]]) -> None:
        """Each column at once; on failure, the first bad candidate and, in it, the first bad feature."""
        first_bad: tuple[int, int] | None = None  # (candidate, position of the feature in self.columns)
        for position, column in enumerate(self.columns):
            column_values = values.get(column)
            check = CHECKS[self.kinds[column]]
            if column_values is None or _column_passes(self.kinds[column], column_values):
                continue
            row = next(r for r, v in enumerate(column_values) if not check(v))
            first_bad = min(first_bad, (row, position)) if first_bad else (row, position)
        if first_bad is not None:
            row, position = first_bad
            column = self.columns[position]
            raise value_error(f"candidates[{row}]", column, self.kinds[column], values[column][row])

    def _array(self, column: str, values: list[Any]) -> pa.Array:
        """Checked values -> the pyarrow column the encoder reads as it reads a file's."""
        kind = self.kinds[column]
        if kind == "numeric":
            return pa.array(np.array(values, dtype=np.float64))  # None -> NaN, which the encoder fills as missing
        if kind == "multi":
            separator = self.separators[column]
            split = [v.split(separator) if isinstance(v, str) else v for v in values]
            return pa.array([None if v is None else [str(x) for x in v] for v in split], pa.list_(pa.string()))
        types = set(map(type, values))
        if types <= {str, NoneType}:
            return pa.array(values, pa.string())
        if types <= {int, NoneType}:
            return pa.array(values, pa.int64())
        return pa.array([None if v is None else str(v) for v in values], pa.string())


class RawRequests:
    """``{"dense": [...], "sparse": [...]}`` candidates -> model inputs, for a model directory without encoders.

    Args:
        num_dense: F_dense, numbers per candidate.
        vocab_sizes: the vocabulary of each of the F_cat ids (an id is in ``[0, vocab)``).

    Example:
        >>> requests = RawRequests(num_dense=2, vocab_sizes=[5])
        >>> dense, sparse = requests({}, [{"dense": [0.5, 1.0], "sparse": [4]}])
        >>> dense.tolist(), sparse.tolist()
        ([[0.5, 1.0]], [[4]])
        >>> requests({}, [{"dense": [0.5, 1.0], "sparse": [5]}])
        Traceback (most recent call last):
        ...
        mtrank.serve.requests.RequestError: candidates[0].sparse[0]: expected an integer id in [0, 5), got 5
    """

    def __init__(self, num_dense: int, vocab_sizes: list[int]) -> None:
        self.num_dense, self.vocab_sizes = num_dense, list(vocab_sizes)

    def unseen(self, sparse: np.ndarray) -> dict[str, int]:
        """No vocabulary without encoders: nothing is counted unseen."""
        return {}

    def example(self) -> dict[str, Any]:
        """A valid request of two candidates (zeros and the first ids), what the OpenAPI schema shows."""
        candidate = {"dense": [0.0] * self.num_dense, "sparse": [0] * len(self.vocab_sizes)}
        return {"context": {}, "candidates": [candidate, dict(candidate)]}

    def encode_many(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Prepared requests are already the model's inputs."""
        return items

    def __call__(self, context: dict[str, Any], candidates: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        if context:
            raise RequestError(
                "context: this model has no encoders.json, so features are given per candidate as "
                '{"dense": [...], "sparse": [...]}; leave the context empty'
            )
        num_dense, vocab = self.num_dense, self.vocab_sizes
        dense = np.empty((len(candidates), num_dense), dtype=np.float32)
        sparse = np.empty((len(candidates), len(vocab)), dtype=np.int64)
        for i, candidate in enumerate(candidates):
            where = f"candidates[{i}]"
            if not isinstance(candidate, dict):
                raise RequestError(f"{where}: expected an object with 'dense' and 'sparse', got {_short(candidate)}")
            unknown = sorted(set(candidate) - {"dense", "sparse"})
            if unknown:
                raise RequestError(f"{where}: unknown key {unknown[0]!r}; expected 'dense' and 'sparse'")
            values = _list_of(candidate, "dense", num_dense, where, f"a list of {num_dense} numbers")
            for j, value in enumerate(values):
                if not ((isinstance(value, float) and math.isfinite(value)) or _is_int64(value)):
                    raise RequestError(f"{where}.dense[{j}]: expected a finite number, got {_short(value)}")
            dense[i] = values
            ids = _list_of(candidate, "sparse", len(vocab), where, f"a list of {len(vocab)} integer ids")
            for j, value in enumerate(ids):
                if not (_is_int64(value) and 0 <= value < vocab[j]):
                    raise RequestError(f"{where}.sparse[{j}]: expected an integer id in [0, {vocab[j]}), got {value!r}")
            sparse[i] = ids
        return dense, sparse

    prepare = __call__  # checked and encoded at once

    @staticmethod
    def rows(prepared: tuple[np.ndarray, np.ndarray]) -> int:
        """Candidates in a prepared request."""
        return len(prepared[0])


def _list_of(candidate: dict[str, Any], key: str, length: int, where: str, expected: str) -> list[Any]:
    """``candidate[key]``, a list of ``length`` values (may be left out when ``length`` is 0)."""
    values = candidate.get(key, [] if length == 0 else None)
    if not isinstance(values, list) or len(values) != length:
        raise RequestError(f"{where}.{key}: expected {expected}, got {_short(values)}")
    return values
