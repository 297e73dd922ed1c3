"""FeatureEncoder: columns -> ``(dense float32 [N, F_dense], sparse int64 [N, F_cat])``, fitted once, JSON.

Fitted on the training split from the ``features`` section of an experiment config
(:class:`mtrank.config.experiment.FeaturesSpec`) and saved in the model directory as ``encoders.json`` beside
``model.safetensors`` and ``config.json``; the same object encodes training files, evaluation files and
serving requests (:mod:`mtrank.serve.requests` turns a request into a table for :meth:`FeatureEncoder.transform`),
so they cannot drift apart.

Column order:
    dense  = ``[numeric features (1 column each), multi-categorical features (V + 1 columns each)]``
    sparse = ``[categorical features (1 id each), bags (max_values ids each), sequences (max_length item ids,
              then max_length action ids when there are actions)]``

A sequence (a list of item ids per row, oldest first) keeps its ``max_length`` most recent items, left-padded
with the id ``V + 1``; its items share the vocabulary of its ``target`` feature (else one fitted on the listed
values), so a history item and the candidate have the same id; unseen items are 0.

Every transform is vectorised over the column (pyarrow compute + numpy): no Python loop over rows.
Categorical ids: 0 = out-of-vocabulary bucket, ``1..V`` = vocabulary (most frequent first); missing values are
the category ``<NA>``; with ``hash_buckets = N`` the id is ``siphash(str(value)) mod N``.

Categorical and multi-categorical string values are stripped of surrounding whitespace, at fit and at encode
time alike (``" Paris"`` is ``"Paris"``), so a file or a request that pads values differently from the training
file still finds them; encoders fitted before this rule (no ``strip`` in their state) keep their raw values.

Numeric values: a missing value (null, NaN) is filled; anything else must stay finite through
``fill -> clip -> log1p -> standardise -> float32``: ``inf`` (unless ``clip`` bounds it) or a value too large
to standardise is a :class:`DataError` naming the file, column and row, at fit time, and at encode time through
:meth:`FeatureEncoder.check_finite` (the pipeline's files; a service answers 422 for a non-finite input).
``quantile: true`` replaces standardising by quantile normalisation (:func:`quantile_normal`). A feature the
model embeds (``embedding: ple``) keeps its one dense column; its bin edges are fitted here, on the encoded
training values (:func:`quantile_edges`, :func:`target_edges`), and become the model's ``inputs.numeric``
(:attr:`FeatureEncoder.numeric_inputs`). Each numeric feature's training range is kept for the shift shares
(:meth:`FeatureEncoder.shift_counts`).

Regression labels: :class:`LabelTransforms` (``label_transform`` of a task) fitted on the training labels.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mtrank.config import ConfigError
from mtrank.config.experiment import (
    CategoricalFeature,
    FeaturesSpec,
    MultiCategoricalFeature,
    NumericFeature,
    SequenceFeature,
    TaskSpec,
)
from mtrank.config.model import SequenceConfig
from mtrank.data.errors import DataError, check_not_all_missing, data_error, warn

ENCODERS_FILE = "encoders.json"
AGE_BUCKETS = 32  # a sequence item's age (row time - item time) -> floor(log2(1 + age)) clipped to 0..31
FORMAT = "mtrank-encoders"
FORMAT_VERSION = 1
NA_TOKEN = "<NA>"
OOV_TOKEN = "<oov>"
CHUNK_ROWS = 65_536  # rows encoded at a time inside transform
UNSEEN_SHARE_WARNING = 0.2  # warn when this much more of a column's rows are unseen than in the training split
OUT_OF_RANGE_WARNING = 0.01  # warn when more of a numeric column's rows than this lie outside the training range
OUT_OF_RANGE_MIN_ROWS = 10  # ... and at least this many (a few rows of a small split are chance, not shift)


@dataclasses.dataclass
class ShiftCounts:
    """Rows of evaluation or scoring data unlike the training split, per column (summed over batches with ``+``).

    Attributes:
        rows: rows counted.
        out_of_range: ``[F_numeric]`` rows whose value lies outside the training split's ``[min, max]``.
        unseen: ``[F_categorical]`` rows whose value is not in the training vocabulary (OOV id 0).
    """

    rows: int
    out_of_range: np.ndarray
    unseen: np.ndarray

    def __add__(self, other: ShiftCounts) -> ShiftCounts:
        return ShiftCounts(self.rows + other.rows, self.out_of_range + other.out_of_range, self.unseen + other.unseen)


def as_table(data: Any) -> pa.Table:
    """A pyarrow Table from a Table, RecordBatch or pandas DataFrame (index dropped)."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, preserve_index=False)
    raise TypeError(f"expected a pyarrow Table / RecordBatch or a pandas DataFrame, got {type(data).__name__}")


def is_numeric_type(dtype: pa.DataType) -> bool:
    return (
        pa.types.is_integer(dtype)
        or pa.types.is_floating(dtype)
        or pa.types.is_decimal(dtype)
        or pa.types.is_boolean(dtype)
        or pa.types.is_null(dtype)
    )


def numeric_column(table: pa.Table, column: str, source: str) -> np.ndarray:
    """Column as float64 numpy, NaN for missing; text in it raises a :class:`DataError` naming a bad row."""
    col = table.column(column)
    if pa.types.is_dictionary(col.type):
        col = pc.cast(col, col.type.value_type)
    if not is_numeric_type(col.type):
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            bad = _first_non_numeric(col)
            if bad is None:
                raise data_error(
                    source,
                    column,
                    f"numbers stored as text (type {col.type})",
                    "Store the column as a numeric type, or declare it under features.categorical",
                    table,
                    0,
                )
            value = col[bad].as_py()
            raise data_error(
                source,
                column,
                f"text {value!r} in a numeric column (type {col.type})",
                "Fix or remove the value, or declare the column under features.categorical",
                table,
                bad,
            )
        raise data_error(
            source,
            column,
            f"expected numbers, got type {col.type}",
            "Declare the column under features.categorical or convert it to numbers",
            table,
            0,
        )
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _first_non_numeric(col: pa.ChunkedArray | pa.Array) -> int | None:
    """Index of the first non-null string that does not parse as a number (vectorised via a regex match)."""
    pattern = r"^\s*[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|nan|NaN|inf|-inf|Infinity)\s*$"
    ok = pc.match_substring_regex(col, pattern)
    bad = pc.and_(pc.invert(ok), pc.is_valid(col))
    idx = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
    return int(idx[0]) if idx.size else None


def numeric_error(
    feat: NumericFeature,
    position: int,
    value: Any,
    problem: str,
    source: str,
    table: pa.Table,
    row: int,
    first_row: int = 0,
) -> DataError:
    """The error for a value of numeric feature ``features.numeric[position]`` that cannot be encoded."""
    return data_error(
        source,
        feat.column,
        f"value {value!r} {problem}",
        "Fix or drop the row, leave the value empty to have it filled, or bound the column with "
        f"features.numeric[{position}].clip: [low, high]",
        table,
        row,
        first_row,
    )


def check_no_infinity(x: np.ndarray, feat: NumericFeature, position: int, source: str, table: pa.Table) -> None:
    """``+-inf`` in numeric feature ``features.numeric[position]`` (values ``x``) is an error unless its ``clip``
    bounds it: infinity is not a missing value, and imputing it would hide a broken column."""
    bad = np.flatnonzero(np.isinf(x)) if feat.clip is None else np.array([], dtype=np.int64)
    if bad.size:
        problem = f"is not a finite number ({bad.size} such rows)"
        raise numeric_error(feat, position, float(x[bad[0]]), problem, source, table, int(bad[0]))


def string_column(col: pa.ChunkedArray | pa.Array, strip: bool = False) -> pa.ChunkedArray | pa.Array:
    """Values as strings, missing as ``<NA>`` (ints print as ``5543``, floats as pyarrow prints them); with
    ``strip``, surrounding whitespace removed."""
    if pa.types.is_dictionary(col.type):
        col = pc.cast(col, col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    if strip:
        col = pc.utf8_trim_whitespace(col)
    return pc.fill_null(col, NA_TOKEN)


def _lookup(values: pa.ChunkedArray | pa.Array, vocab: pa.Array) -> np.ndarray:
    """Ids ``1..V`` of values in ``vocab`` (position + 1), 0 where absent. int64 numpy."""
    index = pc.index_in(values, value_set=vocab)
    return pc.fill_null(pc.add(index, 1), 0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


class StringLookup:
    """String value -> id ``1..V`` (position in the vocabulary + 1), 0 when absent; built once per encoder.

    Large columns (files) go through ``pyarrow.compute.index_in``, which hashes the vocabulary on every call:
    O(V) per call, cheap next to a 100k-row record batch. A scoring request has ~100 rows, where that O(V)
    setup was most of the encoding time (5 ms of a 100-candidate request with 26 features of 10k values):
    small columns are looked up in a Python dict built on first use instead. Both give the same ids.

    With ``strip`` a value's id is that of the value stripped of surrounding spaces. The vocabulary holds
    stripped values, so a value found as it is needs no stripping: only the values not found are stripped and
    looked up again. Stripping every value made encoding 1.2x slower for a 100-row request of 26 categorical
    columns and 1.4x for a 50,000-row file; stripping the misses, 1.09x and 1.01x (``python
    benchmarks/encode_strip.py``, docs/results/encode_strip.txt).
    """

    SMALL = 4096  # rows up to which the dict is used

    def __init__(self, vocab: list) -> None:
        self.values = pa.array([str(v) for v in vocab], pa.string())
        self._ids: dict[str, int] | None = None

    def __getstate__(self) -> dict:
        """Pickled without the dict (rebuilt on first use): unpickling it was ~90% of unpickling an encoder
        (111 ms -> 12 ms for W2's, what each forkserver reader process pays at its start:
        ``benchmarks/encoder_parts.py``)."""
        return {**self.__dict__, "_ids": None}

    def build(self) -> dict[str, int]:
        if self._ids is None:
            self._ids = {v: i for i, v in enumerate(self.values.to_pylist(), 1)}
        return self._ids

    def __call__(self, col: pa.ChunkedArray | pa.Array, strip: bool = False) -> np.ndarray:
        if len(col) > self.SMALL:
            ids = _lookup(col, self.values)
            missed = np.flatnonzero(ids == 0) if strip else []
            if len(missed):
                ids = ids.copy()  # pyarrow's buffer is read-only
                ids[missed] = _lookup(pc.utf8_trim_whitespace(pc.take(col, pa.array(missed))), self.values)
            return ids
        get = self.build().get
        values = col.to_pylist()
        ids = np.fromiter(map(get, values, repeat(0)), dtype=np.int64, count=len(values))  # no Python frame a value
        if strip:
            for i in np.flatnonzero(ids == 0).tolist():
                ids[i] = get(values[i].strip(), 0)
        return ids


class IntLookup:
    """Integer value -> id ``1..V`` (position in the vocabulary + 1), 0 when absent; built once per encoder.

    ``pyarrow.compute.index_in`` rebuilds its hash table on every call (O(V) per record batch, which dominated
    encoding with 100k-value vocabularies); this keeps a dense table ``ids[value - low]`` when the values are
    compact (span <= 8 V + 4096), else a sorted array searched with ``np.searchsorted`` (O(log V) per row).
    """

    def __init__(self, vocab: list[int]) -> None:
        values = np.asarray(vocab, dtype=np.int64)
        ids = np.arange(1, len(values) + 1, dtype=np.int64)
        self.low = int(values.min()) if values.size else 0
        span = int(values.max()) - self.low + 1 if values.size else 0
        if values.size and span <= 8 * values.size + 4096:
            self.dense = np.zeros(span + 1, dtype=np.int64)  # + 1: the 0 that every value outside the span maps to
            self.dense[values - self.low] = ids
            self.keys = None
        else:
            order = np.argsort(values)
            self.dense, self.keys, self.ids = None, values[order], ids[order]

    def __call__(self, col: pa.ChunkedArray | pa.Array) -> np.ndarray:
        missing = None
        if col.null_count:
            missing = pc.is_null(col).to_numpy(zero_copy_only=False)
            col = pc.fill_null(col, 0)
        x = pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False)
        if self.dense is not None:
            # a value outside the span is a negative offset (huge as unsigned) or one past it: both become the
            # last entry, 0 (3 passes over the column instead of 7: ``benchmarks/encoder_parts.py``)
            offset = x - self.low
            unsigned = offset.view(np.uint64)
            np.minimum(unsigned, self.dense.size - 1, out=unsigned)
            out = self.dense.take(offset)
        elif self.keys.size:
            pos = np.minimum(np.searchsorted(self.keys, x), self.keys.size - 1)
            out = np.where(self.keys[pos] == x, self.ids[pos], 0)
        else:
            out = np.zeros(len(x), dtype=np.int64)
        if missing is not None:
            out[missing] = 0
        return out


def stable_hash(values: pa.ChunkedArray | pa.Array, buckets: int, strip: bool = False) -> np.ndarray:
    """``siphash(str(value)) mod buckets`` (pandas' fixed-key hash: stable across runs, machines). int64."""
    strings = string_column(values, strip).to_numpy(zero_copy_only=False).astype(object)
    return (pd.util.hash_array(strings, categorize=True) % np.uint64(buckets)).astype(np.int64)


def _vocabulary(counts: dict, min_count: int, max_vocab: int) -> list:
    """Values with count >= min_count, most frequent first (ties by value, so fitting is deterministic)."""
    kept = [(v, c) for v, c in counts.items() if c >= min_count]
    kept.sort(key=lambda vc: (-vc[1], str(vc[0])))
    if max_vocab:
        kept = kept[:max_vocab]
    return [v for v, _ in kept]


def _value_counts(col: pa.ChunkedArray | pa.Array) -> dict:
    counts = pc.value_counts(col)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


def _list_column(
    table: pa.Table, feat: MultiCategoricalFeature | SequenceFeature, source: str, column: str = ""
) -> pa.ChunkedArray | pa.Array:
    """The list column ``column`` (default the feature's), a separated string column split into lists."""
    column = column or feat.column
    col = table.column(column)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return col
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_dictionary(col.type):
        return pc.split_pattern(string_column(col) if pa.types.is_dictionary(col.type) else col, feat.separator)
    raise data_error(
        source,
        column,
        f"expected a list column or a {feat.separator!r}-separated string, got type {col.type}",
        "Declare it under features.categorical or features.numeric",
        table,
        0,
    )


def _flat_values(lists: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Flattened values (their own type), the row of each value, and each row's length (0 for missing lists)."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return flat, parents, lengths


def _flat_strings(lists: pa.ChunkedArray | pa.Array, strip: bool = False) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Flattened values (as strings, stripped with ``strip``), the row of each value, and each row's length (0 for
    missing lists)."""
    flat, parents, lengths = _flat_values(lists)
    return string_column(flat, strip), parents, lengths.astype(np.float32)


def age_buckets(age: np.ndarray) -> np.ndarray:
    """Ages (row time - item time, e.g. seconds) -> ``floor(log2(1 + age))`` in ``[0, AGE_BUCKETS)``; a negative
    age (an item after the row: clock skew) is 0, a missing one the unknown bucket ``AGE_BUCKETS``."""
    with np.errstate(invalid="ignore"):
        buckets = np.floor(np.log2(1.0 + np.clip(age, 0.0, None)))
    return np.where(np.isnan(buckets), AGE_BUCKETS, np.clip(buckets, 0, AGE_BUCKETS - 1)).astype(np.int64)


# ---------------------------------------------------------------------------------------- labels


class LabelTransforms:
    """Regression labels -> the scale the model learns on (``label_transform`` of each task), and back.

    Fitted on the training split's labels: ``log1p`` is the signed ``sign(y) log(1 + |y|)``, ``standardize``
    subtracts the mean and divides by the standard deviation of the (transformed) present labels. The fitted
    ``{"mean", "std"}`` of each task become its :class:`~mtrank.config.model.TaskConfig`'s ``label_mean`` and
    ``label_std``, so the model itself maps its outputs back (:meth:`mtrank.model.MultiTaskModel.scores`), and
    with it every export and the service; :meth:`inverse` is the same map in numpy (tested against the model).

    Shapes: ``labels [N, K]`` (NaN = missing) -> ``[N, K]``; binary tasks and ``none`` pass through.

    Example:
        >>> from mtrank.config.experiment import TaskSpec
        >>> tasks = [TaskSpec("click"), TaskSpec("spend", type="regression", label_transform="log1p_standardize")]
        >>> t = LabelTransforms(tasks).fit(np.array([[0, 9.0], [1, 99.0], [0, float("nan")]]))
        >>> z = t.transform(np.array([[1, 99.0]]))
        >>> z.round(3).tolist(), t.inverse(z).round(6).tolist()
        ([[1.0, 1.0]], [[1.0, 99.0]])
    """

    def __init__(self, tasks: list[TaskSpec]) -> None:
        self.kinds = [t.label_transform for t in tasks]
        self.names = [t.name for t in tasks]
        self.stats: list[dict[str, float]] = [{"mean": 0.0, "std": 1.0} for _ in tasks]

    @property
    def active(self) -> bool:
        return any(kind != "none" for kind in self.kinds)

    def fit(self, labels: np.ndarray) -> LabelTransforms:
        labels = np.asarray(labels, dtype=np.float64)
        for k, kind in enumerate(self.kinds):
            if kind.endswith("standardize"):
                z = self._log1p(labels[:, k], kind)
                z = z[~np.isnan(z)]
                mean, std = (float(z.mean()), float(z.std())) if z.size else (0.0, 1.0)
                self.stats[k] = {"mean": mean, "std": std if std > 0 else 1.0}
        return self

    @staticmethod
    def _log1p(y: np.ndarray, kind: str) -> np.ndarray:
        return np.sign(y) * np.log1p(np.abs(y)) if kind.startswith("log1p") else y

    def transform(self, labels: np.ndarray) -> np.ndarray:
        """Labels on the model's scale (float32, a new array)."""
        out = np.array(labels, dtype=np.float64, copy=True)
        for k, kind in enumerate(self.kinds):
            if kind != "none":
                out[:, k] = (self._log1p(out[:, k], kind) - self.stats[k]["mean"]) / self.stats[k]["std"]
        return out.astype(np.float32)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """Values on the model's scale -> the labels' own scale (float64)."""
        out = np.array(values, dtype=np.float64, copy=True)
        for k, kind in enumerate(self.kinds):
            if kind != "none":
                y = out[:, k] * self.stats[k]["std"] + self.stats[k]["mean"]
                out[:, k] = np.sign(y) * np.expm1(np.abs(y)) if kind.startswith("log1p") else y
        return out

    def task_stats(self) -> dict[str, dict[str, float]]:
        """``{task: {"mean", "std"}}`` of the transformed tasks (:meth:`ExperimentConfig.model_config`)."""
        return {name: dict(s) for name, kind, s in zip(self.names, self.kinds, self.stats) if kind != "none"}


# ---------------------------------------------------------------------------------------- numeric transforms

QUANTILE_BOUND = 1e-7  # quantile normalisation maps into [ndtri(1e-7), ndtri(1 - 1e-7)] = [-5.2, 5.2]


def fit_quantiles(z: np.ndarray, quantiles: int) -> list[float]:
    """``min(quantiles, N)`` reference values of the training values ``z`` at equally spaced probabilities
    (scikit-learn's ``QuantileTransformer`` fit, on every row)."""
    references = np.linspace(0.0, 1.0, min(quantiles, z.size))
    return np.maximum.accumulate(np.quantile(z, references)).tolist()


def quantile_normal(z: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Values ``z`` mapped through the fitted ``quantiles`` to a standard normal, as scikit-learn's
    ``QuantileTransformer(output_distribution="normal")`` transforms them (tested against it): the empirical
    CDF, interpolated forwards and backwards and averaged (so tied reference values map to their middle),
    bounded away from 0 and 1, then the normal quantile function."""
    from scipy.special import ndtri

    references = np.linspace(0.0, 1.0, quantiles.size)
    with np.errstate(invalid="ignore"):
        p = 0.5 * (np.interp(z, quantiles, references) - np.interp(-z, -quantiles[::-1], -references[::-1]))
    p[z - QUANTILE_BOUND < quantiles[0]] = 0.0
    p[z + QUANTILE_BOUND > quantiles[-1]] = 1.0
    return ndtri(np.clip(p, QUANTILE_BOUND, 1 - QUANTILE_BOUND))


def _edges(values: np.ndarray, z: np.ndarray) -> list[float]:
    """Sorted distinct bin edges: ``values`` with the training minimum and maximum; one bin of width 1 around a
    constant column."""
    edges = np.unique(np.concatenate([values, [z.min(), z.max()]]))
    edges = edges[(edges >= z.min()) & (edges <= z.max())]
    if edges.size < 2:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    return edges.tolist()


def quantile_edges(z: np.ndarray, bins: int) -> list[float]:
    """Edges of at most ``bins`` equal-frequency bins of the encoded training values ``z`` (Gorishniy et al.
    2022, section 3.2; fewer where quantiles coincide)."""
    return _edges(np.quantile(z, np.linspace(0.0, 1.0, bins + 1)), z)


def target_edges(z: np.ndarray, labels: np.ndarray, bins: int, min_leaf: int = 64) -> list[float]:
    """Edges of at most ``bins`` target-aware bins (Gorishniy et al. 2022, section 3.2): the thresholds of a
    regression tree on ``z`` alone with at most ``bins`` leaves of at least ``min(min_leaf, N / bins)`` rows,
    fitted to every task's label at once (each standardised, a missing label set to its task's mean)."""
    from sklearn.tree import DecisionTreeRegressor

    y = np.asarray(labels, dtype=np.float64).reshape(len(z), -1)
    with np.errstate(invalid="ignore"):
        mean, std = np.nanmean(y, 0), np.nanstd(y, 0)
    y = np.where(np.isnan(y), 0.0, (y - np.nan_to_num(mean)) / np.where(std > 0, std, 1.0))
    leaf = max(1, min(min_leaf, len(z) // bins))
    tree = DecisionTreeRegressor(max_leaf_nodes=bins, min_samples_leaf=leaf, random_state=0).fit(z[:, None], y)
    inner = tree.tree_.children_left >= 0
    return _edges(tree.tree_.threshold[inner], z)


class FeatureEncoder:
    """Fitted feature transforms: numeric fill/clip/log1p/standardise or quantile normalisation (and the bins of
    embedded numeric features), categorical vocabularies or hashing, multi-categorical pooled multi-hot.

    Shapes: ``transform(table [N rows]) -> (dense float32 [N, num_dense], sparse int64 [N, F_cat])``.

    Example:
        >>> import pandas as pd
        >>> from mtrank.config.experiment import FeaturesSpec, NumericFeature, CategoricalFeature
        >>> spec = FeaturesSpec(categorical=[CategoricalFeature("city")], numeric=[NumericFeature("age")])
        >>> enc = FeatureEncoder(spec).fit(pd.DataFrame({"city": ["a", "b", "a"], "age": [20.0, 30.0, None]}))
        >>> dense, sparse = enc.transform(pd.DataFrame({"city": ["a", "zzz"], "age": [25.0, None]}))
        >>> sparse.ravel().tolist(), enc.vocab_sizes, enc.feature_names
        ([1, 0], [3], ['age', 'city'])
    """

    def __init__(self, features: FeaturesSpec) -> None:
        features.validate("features")
        self.features = features
        self.state: dict[str, dict[str, Any]] = {}

    # ----------------------------------------------------------------------------------- properties

    @property
    def fitted(self) -> bool:
        return bool(self.state)

    @property
    def num_dense(self) -> int:
        return len(self.dense_names)

    @property
    def bags(self) -> list[MultiCategoricalFeature]:
        """Multi-valued features encoded as embedding bags (``embed: true``), in column order."""
        return [f for f in self.features.multi_categorical if f.embed]

    @property
    def vocab_sizes(self) -> list[int]:
        """Sizes of the sparse columns: single categoricals, then each bag's ``max_values`` columns, whose
        ids are 0 = unseen, 1..V = values, V + 1 = padding."""
        sizes = [int(self.state[f.name]["size"]) for f in self.features.categorical]
        for feat in self.bags:
            sizes += [len(self.state[feat.name]["vocab"]) + 2] * feat.max_values
        for feat in self.features.sequence:
            sizes += self._sequence_config(feat).column_sizes
        return sizes

    def _sequence_config(self, feat: SequenceFeature) -> SequenceConfig:
        state, single = self.state[feat.name], [f.name for f in self.features.categorical]
        return SequenceConfig(
            length=feat.max_length,
            vocab_size=state["size"] + 1,
            actions=len(state["actions"]) + 2 if feat.actions_column else 0,
            times=AGE_BUCKETS + 1 if feat.times_column else 0,
            target=single.index(feat.target) if feat.target else -1,
            layers=feat.layers,
            heads=feat.heads,
            pooling=feat.pooling,
        )

    @property
    def sequence_inputs(self) -> list[dict[str, Any]]:
        """The model's ``inputs.sequences`` (:class:`~mtrank.config.model.SequenceConfig` fields)."""
        return [dataclasses.asdict(self._sequence_config(f)) for f in self.features.sequence]

    @property
    def bag_inputs(self) -> list[dict[str, Any]]:
        """The model's ``inputs.bags``: ``{"length": columns, "pooling": "mean" | "sum"}`` per embedded bag."""
        return [{"length": f.max_values, "pooling": f.pooling} for f in self.bags]

    @property
    def dense_names(self) -> list[str]:
        names = [f.name for f in self.features.numeric]
        for feat in self.features.multi_categorical:
            if not feat.embed:
                vocab = self.state[feat.name]["vocab"]
                names += [f"{feat.name}={OOV_TOKEN}"] + [f"{feat.name}={v}" for v in vocab]
        return names

    @property
    def categorical_names(self) -> list[str]:
        names = [f.name for f in self.features.categorical]
        for feat in self.bags:
            names += [f"{feat.name}[{i}]" for i in range(feat.max_values)]
        for feat in self.features.sequence:
            names += [f"{feat.name}[{i}]" for i in range(feat.max_length)]
            for kind, column in (("action", feat.actions_column), ("age", feat.times_column)):
                if column:
                    names += [f"{feat.name}.{kind}[{i}]" for i in range(feat.max_length)]
        return names

    @property
    def feature_names(self) -> list[str]:
        """Names of the dense then the categorical columns, in the order of ``transform``'s outputs."""
        return [*self.dense_names, *self.categorical_names]

    @property
    def input_columns(self) -> list[str]:
        """The raw columns (record keys) the encoder reads."""
        extra = [c for f in self.features.sequence for c in f.extra_columns]
        return list(dict.fromkeys([f.column for f in self.features.all()] + extra))

    @property
    def numeric_inputs(self) -> list[dict[str, Any]]:
        """The model's ``inputs.numeric``: each embedded numeric feature's dense column, type and fitted bin
        edges (:class:`~mtrank.config.model.NumericEmbeddingConfig`)."""
        out = []
        for column, feat in enumerate(self.features.numeric):  # numeric features are the first dense columns
            spec = feat.embedding
            if spec.type == "ple":
                out.append({"column": column, "type": "ple", "edges": list(self.state[feat.name]["edges"])})
            elif spec.type == "periodic":
                out.append({"column": column, "type": "periodic", "frequencies": spec.frequencies, "sigma": spec.sigma})
        return out

    # ----------------------------------------------------------------------------------- fitting

    def fit(self, data: Any, source: str = "training data", labels: np.ndarray | None = None) -> FeatureEncoder:
        """Fit every feature's statistics / vocabulary on ``data`` (the training split).

        ``labels``: the tasks' training labels ``[N, K]`` (NaN where missing), on the scale the model learns;
        needed only by target-aware bins (``embedding: {type: ple, bin_method: target}``)."""
        table = as_table(data)
        self._check_columns(table, source)
        if table.num_rows == 0:
            raise data_error(source, None, "no rows to fit the encoders on", "Give a non-empty training split")
        state: dict[str, dict[str, Any]] = {}
        for feat in self.features.numeric:
            state[feat.name] = self._fit_numeric(feat, table, source, labels)
        for feat in self.features.multi_categorical:
            flat, _, _ = _flat_strings(_list_column(table, feat, source), strip=True)
            vocab = _vocabulary(_value_counts(flat), feat.min_count, feat.max_vocab)
            state[feat.name] = {"vocab": [str(v) for v in vocab], "strip": True}
        for feat in self.features.categorical:
            state[feat.name] = self._fit_categorical(feat, table)
        self.state = state
        for feat in self.features.sequence:
            state[feat.name] = self._fit_sequence(feat, table, source)
        return self

    def _fit_sequence(self, feat: SequenceFeature, table: pa.Table, source: str) -> dict[str, Any]:
        """The items' vocabulary (the target's, or fitted on the listed values) and the actions' vocabulary."""
        if feat.target:
            state: dict[str, Any] = {"target": feat.target, "size": self.state[feat.target]["size"]}
        else:
            flat, _, _ = _flat_values(_list_column(table, feat, source))
            values = CategoricalFeature(feat.name, "values", min_count=feat.min_count, max_vocab=feat.max_vocab)
            state = self._fit_categorical(values, pa.table({"values": flat}))
        if feat.actions_column:
            flat, _, _ = _flat_strings(_list_column(table, feat, source, feat.actions_column), strip=True)
            state["actions"] = [str(v) for v in _vocabulary(_value_counts(flat), 1, 0)]
        return state

    def _fit_numeric(
        self, feat: NumericFeature, table: pa.Table, source: str, labels: np.ndarray | None = None
    ) -> dict[str, Any]:
        x = numeric_column(table, feat.column, source)
        check_not_all_missing(x, source, feat.column, table)
        present = np.isfinite(x)  # the fill statistics ignore values that clip bounds
        if feat.fill == "mean":
            fill = float(x[present].mean())
        elif feat.fill == "median":
            fill = float(np.median(x[present]))
        elif feat.fill == "zero":
            fill = 0.0
        else:
            fill = float(feat.fill)
        state: dict[str, Any] = {"fill": fill, "mean": 0.0, "std": 1.0}
        state["min"], state["max"] = float(x[present].min()), float(x[present].max())  # the training range
        position = self.features.numeric.index(feat)
        check_no_infinity(x, feat, position, source, table)
        z = self._numeric_transform(feat, state, x)
        if feat.quantile:
            state["quantiles"] = fit_quantiles(z, feat.quantiles)
        elif feat.standardize:
            with np.errstate(over="ignore", invalid="ignore"):
                mean, std = float(z.mean()), float(z.std())
            if not (math.isfinite(mean) and math.isfinite(std)):
                row = int(np.argmax(np.abs(z)))
                problem = "is too large to standardise (its square overflows float64)"
                raise numeric_error(feat, position, float(x[row]), problem, source, table, row)
            state["mean"], state["std"] = mean, std if std > 0 else 1.0
        embedding = feat.embedding
        if embedding.type == "ple":
            encoded = self._numeric_transform(feat, state, x, standardize=True)
            if embedding.bin_method == "quantile":
                state["edges"] = quantile_edges(encoded, embedding.bins)
            else:
                if labels is None:
                    raise DataError(
                        f"{source}: features.numeric[{position}].embedding.bin_method: 'target' bins need the "
                        "training split's task labels (FeatureEncoder.fit(..., labels=...)); pass them, or use "
                        "'quantile'"
                    )
                state["edges"] = target_edges(encoded, labels, embedding.bins)
        return state

    def _fit_categorical(self, feat: CategoricalFeature, table: pa.Table) -> dict[str, Any]:
        if feat.hash_buckets:
            buckets = int(feat.hash_buckets)
            distinct = pc.unique(string_column(table.column(feat.column), strip=True))
            _, per_bucket = np.unique(stable_hash(distinct, buckets), return_counts=True)
            shared = int(per_bucket[per_bucket > 1].sum())  # distinct training values whose id another one has
            rate = shared / max(len(distinct), 1)
            return {"size": buckets, "hash": True, "strip": True, "distinct": len(distinct), "collision_rate": rate}
        col = table.column(feat.column)
        if pa.types.is_dictionary(col.type):
            col = pc.cast(col, col.type.value_type)
        kind = "int" if pa.types.is_integer(col.type) else "str"
        col = pc.fill_null(col, -(2**62)) if kind == "int" and col.null_count else col
        counts = _value_counts(col if kind == "int" else string_column(col, strip=True))
        vocab = _vocabulary(counts, feat.min_count, feat.max_vocab)
        unseen = 1.0 - sum(counts[v] for v in vocab) / max(len(col), 1)  # rows in the OOV bucket
        if kind == "int" and -(2**62) in vocab:  # missing ints are a category too: store as the NA token
            kind = "str"
            vocab = [NA_TOKEN if v == -(2**62) else str(v) for v in vocab]
        return {"size": len(vocab) + 1, "kind": kind, "vocab": vocab, "strip": True, "unseen": unseen}

    # ----------------------------------------------------------------------------------- transforming

    def transform(
        self, data: Any, source: str = "data", out: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode rows: ``(dense float32 [N, num_dense], sparse int64 [N, F_cat])``; unseen values -> id 0.

        Large tables are encoded in slices of :data:`CHUNK_ROWS` rows into the two output arrays: the
        temporaries of each slice stay in cache and reuse the same heap memory, where whole-column temporaries
        would each be fresh pages (page faults dominated encoding time on the benchmark machine). ``out``: the
        two arrays to write into and return instead (e.g. a streaming reader's buffer, reused chunk after chunk;
        its ids may be int32 when every vocabulary fits).
        """
        if not self.fitted:
            raise RuntimeError("FeatureEncoder.transform called before fit (or load)")
        table = as_table(data)
        self._check_columns(table, source)
        n = table.num_rows
        if out is not None:
            dense, sparse = out
        else:
            dense = np.empty((n, self.num_dense), dtype=np.float32)
            sparse = np.empty((n, len(self.categorical_names)), dtype=np.int64)
        for start in range(0, n, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, n)
            self._transform_into(table.slice(start, stop - start), source, dense[start:stop], sparse[start:stop])
        return dense, sparse

    def _transform_into(self, table: pa.Table, source: str, dense: np.ndarray, sparse: np.ndarray) -> None:
        col = 0
        for feat in self.features.numeric:
            x = numeric_column(table, feat.column, source)
            with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, which check_finite names
                dense[:, col] = self._numeric_transform(feat, self.state[feat.name], x, standardize=True)
            col += 1
        for feat in self.features.multi_categorical:
            if feat.embed:
                continue
            width = len(self.state[feat.name]["vocab"]) + 1
            dense[:, col : col + width] = self._multi_hot(feat, table, source)
            col += width
        for j, feat in enumerate(self.features.categorical):
            sparse[:, j] = self._categorical_ids(feat, table.column(feat.column))
        j = len(self.features.categorical)
        for feat in self.bags:
            sparse[:, j : j + feat.max_values] = self._bag_ids(feat, table, source)
            j += feat.max_values
        for feat in self.features.sequence:
            width = self._sequence_config(feat).columns
            sparse[:, j : j + width] = self._sequence_ids(feat, table, source)
            j += width

    def _sequence_ids(self, feat: SequenceFeature, table: pa.Table, source: str) -> np.ndarray:
        """``[N, L]`` item ids (then ``[N, L]`` action ids, then ``[N, L]`` age buckets, when the sequence has them)
        of each row's ``L = max_length`` most recent items, right-aligned: 0 unseen, 1..V the vocabulary, V + 1
        padding (actions: their own vocabulary and padding; ages: :func:`age_buckets`, padding 32)."""
        state, length = self.state[feat.name], feat.max_length
        flat, parents, lengths = _flat_values(_list_column(table, feat, source))
        # a row's k-th of n values is (n - 1 - k) from its end; the last L land in columns L - n .. L - 1
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        from_end = lengths[parents] - 1 - (np.arange(len(flat)) - starts[parents])
        keep = from_end < length
        rows, columns = parents[keep], length - 1 - from_end[keep]
        items = np.full((table.num_rows, length), state["size"], dtype=np.int64)
        targets = {f.name: f for f in self.features.categorical}
        lookup = targets[feat.target] if feat.target else CategoricalFeature(feat.name)  # whose state maps ids
        if len(flat):
            items[rows, columns] = self._categorical_ids(lookup, pc.filter(flat, pa.array(keep)))
        parts = [items]
        if feat.actions_column:
            flat_actions = self._per_item(feat, feat.actions_column, lengths, table, source)
            action_lookup = state.get("_actions_lookup")
            if action_lookup is None:
                action_lookup = state["_actions_lookup"] = StringLookup(state["actions"])
            actions = np.full((table.num_rows, length), len(state["actions"]) + 1, dtype=np.int64)
            kept = string_column(pc.filter(flat_actions, pa.array(keep)), True)
            actions[rows, columns] = action_lookup(kept, True)
            parts.append(actions)
        if feat.times_column:
            flat_times = self._per_item(feat, feat.times_column, lengths, table, source)
            if pa.types.is_string(flat_times.type):  # a CSV's or a request's separated / listed text
                try:
                    flat_times = pc.cast(flat_times, pa.float64())
                except pa.ArrowInvalid as err:
                    raise DataError(f"{source}: column {feat.times_column!r}: {err}; give numbers") from None
            when = numeric_column(pa.table({feat.times_column: flat_times}), feat.times_column, source)
            now = numeric_column(table, feat.time_column, source)
            ages = np.full((table.num_rows, length), AGE_BUCKETS, dtype=np.int64)  # padding / unknown
            ages[rows, columns] = age_buckets(now[parents] - when)[keep]
            parts.append(ages)
        return np.concatenate(parts, 1)

    @staticmethod
    def _per_item(feat: SequenceFeature, column: str, lengths: np.ndarray, table: pa.Table, source: str) -> pa.Array:
        """The flat values of list ``column``, which must hold one value per item of the sequence in each row."""
        flat, _, counts = _flat_values(_list_column(table, feat, source, column))
        bad = np.flatnonzero(counts != lengths)
        if bad.size:
            raise data_error(
                source,
                column,
                f"{int(counts[bad[0]])} values for {int(lengths[bad[0]])} items of {feat.column!r}",
                "Give one value per item",
                table,
                int(bad[0]),
            )
        return flat

    def _numeric_transform(self, feat: NumericFeature, state: dict, x: np.ndarray, standardize: bool = False):
        """``fill -> clip -> signed log1p -> standardise`` (or quantile normalisation, when the state has
        quantiles) (float64, in place on a copy of ``x``)."""
        z = np.array(x, dtype=np.float64, copy=True)
        z[np.isnan(z)] = state["fill"]  # missing; +-inf is not missing: clip bounds it, else check_finite fails
        if feat.clip is not None:
            np.clip(z, feat.clip[0], feat.clip[1], out=z)
        if feat.log1p:
            sign = np.sign(z)
            np.abs(z, out=z)
            np.log1p(z, out=z)
            z *= sign
        if standardize and "quantiles" in state:
            return quantile_normal(z, np.asarray(state["quantiles"]))
        if standardize:
            z -= state["mean"]
            z /= state["std"]
        return z

    def prepare_lookups(self) -> None:
        """Build every vocabulary lookup now rather than on first use (a service does this before serving)."""
        for feat in [*self.features.categorical, *self.features.multi_categorical]:
            state = self.state[feat.name]
            if state.get("hash"):
                continue
            if state.get("kind") == "int" and "_int_lookup" not in state:
                state["_int_lookup"] = IntLookup(state["vocab"])
            if "_str_lookup" not in state:
                state["_str_lookup"] = StringLookup(state["vocab"])
            state["_str_lookup"].build()

    def _categorical_ids(self, feat: CategoricalFeature, col: pa.ChunkedArray) -> np.ndarray:
        state = self.state[feat.name]
        if state.get("hash"):
            return stable_hash(col, state["size"], state.get("strip", False))
        if pa.types.is_dictionary(col.type):
            col = pc.cast(col, col.type.value_type)
        if state["kind"] == "int" and pa.types.is_integer(col.type):
            lookup = state.get("_int_lookup")
            if lookup is None:
                lookup = state["_int_lookup"] = IntLookup(state["vocab"])
            return lookup(col)  # missing ints: not in the vocabulary -> OOV
        lookup = state.get("_str_lookup")
        if lookup is None:
            lookup = state["_str_lookup"] = StringLookup(state["vocab"])
        return lookup(string_column(col), state.get("strip", False))

    def _bag_ids(self, feat: MultiCategoricalFeature, table: pa.Table, source: str) -> np.ndarray:
        """``[N, max_values]`` ids of each row's first values: 0 unseen, 1..V the vocabulary, V + 1 padding."""
        state = self.state[feat.name]
        lookup = state.get("_str_lookup")
        if lookup is None:
            lookup = state["_str_lookup"] = StringLookup(state["vocab"])
        flat, parents, lengths = _flat_strings(_list_column(table, feat, source))
        n, width = table.num_rows, feat.max_values
        out = np.full((n, width), len(state["vocab"]) + 1, dtype=np.int64)
        if len(flat):
            starts = np.concatenate([[0], np.cumsum(lengths.astype(np.int64))[:-1]])
            position = np.arange(len(flat)) - starts[parents]  # index of each value within its row
            keep = position < width
            out[parents[keep], position[keep]] = lookup(flat, state.get("strip", False))[keep]
        return out

    def _multi_hot(self, feat: MultiCategoricalFeature, table: pa.Table, source: str) -> np.ndarray:
        state = self.state[feat.name]
        lookup = state.get("_str_lookup")
        if lookup is None:
            lookup = state["_str_lookup"] = StringLookup(state["vocab"])
        width = len(state["vocab"]) + 1
        flat, parents, lengths = _flat_strings(_list_column(table, feat, source))
        ids = lookup(flat, state.get("strip", False))  # 0 = OOV column
        n = table.num_rows
        counts = np.bincount(parents * width + ids, minlength=n * width).reshape(n, width).astype(np.float32)
        if feat.pooling == "mean":
            counts /= np.maximum(lengths, 1.0)[:, None]
        return counts

    # ----------------------------------------------------------------------------------- checks

    def check_finite(self, dense: np.ndarray, data: Any, source: str, first_row: int = 0) -> None:
        """Raise a :class:`DataError` naming the column and row of the first numeric feature of ``dense`` (from
        :meth:`transform` of ``data``, rows ``first_row..`` of ``source``) that is not finite: ``+-inf`` that no
        ``clip`` bounds, or a value beyond float32 once standardised."""
        numeric = dense[:, : len(self.features.numeric)]  # numeric features come first
        if np.isfinite(numeric).all():
            return
        bad = ~np.isfinite(numeric)
        row = int(np.flatnonzero(bad.any(1))[0])
        feat = self.features.numeric[int(np.flatnonzero(bad[row])[0])]
        table = as_table(data)
        value = table.column(feat.column)[row].as_py()
        if isinstance(value, (int, float)) and math.isfinite(value):
            state = self.state[feat.name]
            problem = f"is too large: standardised with the training mean {state['mean']:.4g} and std "
            problem += f"{state['std']:.4g} it overflows float32"
        else:
            problem = "is not a finite number"
        position = self.features.numeric.index(feat)
        raise numeric_error(feat, position, value, problem, source, table, row, first_row)

    def hashing(self) -> dict[str, dict[str, float]]:
        """Per hashed categorical feature: ``buckets``, the training split's ``distinct`` values (of the rows the
        encoder was fitted on) and the ``collision_rate``, the share of them whose id another value has (for a
        uniform hash ``~ 1 - exp(-distinct / buckets)``)."""
        out = {}
        for feat in self.features.categorical:
            state = self.state[feat.name]
            if state.get("hash") and "distinct" in state:  # (encoders fitted before the count was kept: none)
                out[feat.name] = {k: state[k] for k in ("distinct", "collision_rate")} | {"buckets": state["size"]}
        return out

    def unseen_counts(self, sparse: np.ndarray) -> np.ndarray:
        """Rows per categorical feature (``[F]``, features.categorical order) whose value was not in the training
        vocabulary (id 0); hashed features count 0."""
        counts = (sparse[:, : len(self.features.categorical)] == 0).sum(0)
        hashed = [bool(self.state[f.name].get("hash")) for f in self.features.categorical]
        return np.where(hashed, 0, counts)

    def out_of_range_counts(self, data: Any, source: str = "data") -> np.ndarray:
        """Rows per numeric feature (``[F]``, features.numeric order) whose value lies outside the training split's
        ``[min, max]`` (missing values are not counted; encoders fitted before the range was kept count 0)."""
        table = as_table(data)
        counts = np.zeros(len(self.features.numeric), dtype=np.int64)
        for i, feat in enumerate(self.features.numeric):
            state = self.state[feat.name]
            if "min" in state:
                x = numeric_column(table, feat.column, source)
                counts[i] = int(((x < state["min"]) | (x > state["max"])).sum())
        return counts

    def shift_counts(self, data: Any, sparse: np.ndarray, source: str = "data") -> ShiftCounts:
        """How many rows of ``data`` (encoded as ``sparse`` by :meth:`transform`) fall outside what the training
        split held, per column (:class:`ShiftCounts`; add the counts of several batches with ``+``)."""
        return ShiftCounts(len(sparse), self.out_of_range_counts(data, source), self.unseen_counts(sparse))

    def shift(self, counts: ShiftCounts) -> dict[str, dict[str, float]]:
        """Per column, the share of rows outside the training range (numeric features) and of values unseen in
        training (categorical features, beside the training split's own share, which the OOV bucket holds)."""
        rows = max(counts.rows, 1)
        numeric = self.features.numeric
        categorical = self.features.categorical
        return {
            "numeric_out_of_range": {f.column: float(c / rows) for f, c in zip(numeric, counts.out_of_range)},
            "categorical_unseen": {f.column: float(c / rows) for f, c in zip(categorical, counts.unseen)},
            "categorical_unseen_training": {f.column: self.state[f.name].get("unseen", 0.0) for f in categorical},
        }

    def warn_shift(self, counts: ShiftCounts, source: str) -> None:
        """Warn (:class:`~mtrank.data.errors.DataWarning`, one line) about the columns of ``source`` unlike the
        training split: numeric features with more than :data:`OUT_OF_RANGE_WARNING` of their rows (and at least
        :data:`OUT_OF_RANGE_MIN_ROWS`) outside the training range, categorical features whose share of unseen
        values is :data:`UNSEEN_SHARE_WARNING` above the training split's."""
        shares = self.shift(counts)
        high = []
        for column, share in shares["categorical_unseen"].items():
            trained = shares["categorical_unseen_training"][column]
            if share - trained > UNSEEN_SHARE_WARNING:
                high.append(f"{column!r} {share:.0%} of rows (training: {trained:.0%})")
        outside = [
            f"{feat.column!r} {count / max(counts.rows, 1):.1%}"
            for feat, count in zip(self.features.numeric, counts.out_of_range)
            if count / max(counts.rows, 1) > OUT_OF_RANGE_WARNING and count >= OUT_OF_RANGE_MIN_ROWS
        ]
        parts = []
        if high:
            parts.append(
                f"categorical values the training split did not have: {', '.join(high)}; check for changed "
                "spellings, case or ids (surrounding spaces are ignored); the model treats them as one unknown value"
            )
        if outside:
            parts.append(
                f"numeric values outside the training split's range: {', '.join(outside)} of rows; the model "
                "extrapolates there (a later period, a changed unit or a bug upstream?)"
            )
        if parts:
            warn(f"{source}: {'; '.join(parts)}")

    def _check_columns(self, table: pa.Table, source: str) -> None:
        present = set(table.column_names)
        read = [(f, f.column) for f in self.features.all()]
        read += [(f, c) for f in self.features.sequence for c in f.extra_columns]
        for feat, column in read:
            if column not in present:
                close = difflib.get_close_matches(column, table.column_names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise data_error(
                    source,
                    column,
                    f"feature {feat.name!r} reads this column, which is missing (columns: {table.column_names[:20]})",
                    f"{hint}Fix the column name in the config's features section",
                    table,
                    0,
                )

    # ----------------------------------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: feature specs and fitted state (no pickle)."""
        if not self.fitted:
            raise RuntimeError("FeatureEncoder.to_dict called before fit")
        state = {name: {k: v for k, v in s.items() if not k.startswith("_")} for name, s in self.state.items()}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "features": {
                "categorical": [dataclasses.asdict(f) for f in self.features.categorical],
                "numeric": [dataclasses.asdict(f) for f in self.features.numeric],
                "multi_categorical": [dataclasses.asdict(f) for f in self.features.multi_categorical],
                "sequence": [dataclasses.asdict(f) for f in self.features.sequence],
            },
            "state": state,
            "feature_names": self.feature_names,
            "num_dense": self.num_dense,
            "vocab_sizes": self.vocab_sizes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureEncoder:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise DataError(f"not an mtrank encoder description (format={found!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"encoder format_version {data.get('format_version')!r} is not supported (expects {FORMAT_VERSION})"
            )
        try:
            spec = FeaturesSpec.from_dict(data["features"], "features")
        except ConfigError as err:
            raise DataError(f"encoder description: {err}") from None
        encoder = cls(spec)
        encoder.state = {name: dict(s) for name, s in data["state"].items()}
        missing = [f.name for f in spec.all() if f.name not in encoder.state]
        if missing:
            raise DataError(f"encoder description has no fitted state for feature {missing[0]!r}")
        return encoder

    def save(self, directory: str | Path) -> Path:
        """Write ``encoders.json`` into ``directory`` (the model directory); returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / ENCODERS_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> FeatureEncoder:
        """Read ``encoders.json`` from a model directory (or the file itself)."""
        path = Path(directory)
        if path.is_dir():
            path = path / ENCODERS_FILE
        if not path.is_file():
            raise DataError(
                f"{path}: no fitted encoders (encoders.json) in this model directory; "
                "train with `mtrank train CONFIG` to write one"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: corrupt JSON ({err})") from None
        try:
            return cls.from_dict(data)
        except DataError as err:
            raise DataError(f"{path}: {err}") from None
