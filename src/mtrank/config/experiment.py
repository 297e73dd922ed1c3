"""The experiment: which columns are features, labels and weights, how to read and split the files, the model
and its training. One YAML file (see ``configs/*.yaml`` and ``docs/data.md``) or the same data from Python.

:func:`load_experiment` / :func:`experiment_from_dict` build it with the one config builder
(:mod:`mtrank.config.base`): unknown keys get a did-you-mean hint, values are type-checked, messages name the
field (``features.numeric[2].clip: ...``). Relative data paths resolve against the YAML file's folder.

Sections::

    data:      where the rows are (train / valid / test paths, format, CSV options, split, streaming)
    features:  categorical (vocabulary or hashing), numeric (fill, clip, log1p, standardise or quantile
               normalisation, PLE / periodic embeddings), multi_categorical (list columns, mean or sum pooled)
    tasks:     label column, binary / regression, loss weight, optional mask column, derived binary labels
    model:     :class:`mtrank.config.ModelConfig` sections; ``inputs`` (but ``embedding_dim``) and ``tasks``
               are derived from the features and tasks above
    train:     :class:`mtrank.config.TrainConfig`
    baseline:  the gradient-boosting baseline of every training report (:class:`BaselineSpec`)
    tune:      ``mtrank tune``'s search space, objective and study (:class:`TuneSpec`)
    plugins:   modules to import first (they register expert or gate types), e.g. ``[my_experts]``; a module
               next to the YAML file is found there
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from mtrank.config.base import (
    Config,
    ConfigError,
    apply_overrides,
    build,
    check,
    did_you_mean,
    join,
    read_yaml,
)
from mtrank.config.model import InputsConfig, LabelTransform, ModelConfig, TaskConfig
from mtrank.config.train import TrainConfig, check_monitor

FORMATS = ("auto", "csv", "parquet", "movielens-grouplens", "movielens-recbole")
_COMPARISON = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(-?[0-9.eE+-]+)\s*$")
SECTIONS = ("data", "features", "tasks", "model", "train", "baseline", "tune", "output", "name", "plugins")
DERIVED_INPUTS = ("num_dense", "vocab_sizes", "bags", "numeric", "sequences", "names")


@dataclass
class ColumnFeature(Config):
    """A feature read from one column: ``name`` (in feature lists and requests), ``column`` (default ``name``)."""

    shorthand: ClassVar[str] = "name"
    name: str
    column: str = ""

    def check(self, path: str) -> None:
        self.column = self.column or self.name


@dataclass
class VocabularyFeature(ColumnFeature):
    """A column of categories: a vocabulary of the values seen ``min_count`` times, at most ``max_vocab``."""

    min_count: int = 1
    max_vocab: int = 0
    smallest_cap: ClassVar[int] = 0

    def check(self, path: str) -> None:
        super().check(path)
        check(self.min_count >= 1, join(path, "min_count"), f"must be >= 1, got {self.min_count}")
        cap = self.smallest_cap
        check(self.max_vocab >= cap, join(path, "max_vocab"), f"must be >= {cap}, got {self.max_vocab}")


@dataclass
class CategoricalFeature(VocabularyFeature):
    """A categorical column -> one id per row.

    Ids: ``0`` is the out-of-vocabulary bucket (unseen values, values rarer than ``min_count``, beyond
    ``max_vocab``); ``1..V`` the vocabulary fitted on the training split, most frequent first. Missing values
    are a category of their own (``<NA>``). With ``hash_buckets = N > 0`` there is no vocabulary: a value's id
    is ``stable_hash(str(value)) mod N`` (vocab size N; collisions share an id; the share of the training
    split's distinct values that share their id is measured at fit time and reported).

    Args:
        name: feature name (in ``feature_names`` and serving requests).
        column: input column; defaults to ``name``.
        min_count: values seen fewer times in the training split go to the OOV bucket.
        max_vocab: keep at most this many values (most frequent); 0 = no cap.
        hash_buckets: hash into this many buckets instead of fitting a vocabulary; 0 = vocabulary; unset = the
            features section's ``hash_buckets``.
    """

    hash_buckets: int | None = None

    def check(self, path: str) -> None:
        super().check(path)
        if self.hash_buckets is not None:
            check(self.hash_buckets >= 0, join(path, "hash_buckets"), f"must be >= 0, got {self.hash_buckets}")


@dataclass
class NumericEmbeddingSpec(Config):
    """How the model embeds a numeric feature (Gorishniy et al., NeurIPS 2022): ``none`` (the value enters the
    block as it is), ``ple`` (piecewise-linear encoding over ``bins`` bins, then linear + ReLU to an
    ``embedding_dim`` token) or ``periodic`` (``sin`` / ``cos`` of ``frequencies`` learned frequencies, then
    linear + ReLU). ``embedding: ple`` is short for ``embedding: {type: ple}``.

    Args:
        type: ``none``, ``ple`` or ``periodic``.
        bins: ``ple``: at most this many bins (fewer when the training values have fewer distinct quantiles).
        bin_method: ``ple``: ``quantile`` (equal-frequency bins of the training values) or ``target`` (the
            thresholds of a regression tree of at most ``bins`` leaves fitted to the tasks' training labels).
        frequencies / sigma: ``periodic``: how many frequencies, their initial standard deviation (the paper
            tunes sigma in [0.01, 100]; the encoded value is standardised or quantile-normalised).
    """

    shorthand: ClassVar[str] = "type"
    type: Literal["none", "ple", "periodic"] = "none"
    bins: int = 16
    bin_method: Literal["quantile", "target"] = "quantile"
    frequencies: int = 16
    sigma: float = 1.0

    def check(self, path: str) -> None:
        check(self.bins >= 2, join(path, "bins"), f"must be >= 2, got {self.bins}")
        check(self.frequencies >= 1, join(path, "frequencies"), f"must be >= 1, got {self.frequencies}")
        check(0 < self.sigma < math.inf, join(path, "sigma"), f"must be > 0 and finite, got {self.sigma}")


@dataclass
class NumericFeature(ColumnFeature):
    """A numeric column -> one float32 value per row: ``fill -> clip -> log1p -> standardise`` (or ``quantile``
    normalisation), optionally embedded by the model (``embedding``).

    ``log1p`` is signed, ``sign(x) log(1 + |x|)``, so it is defined for every value; standardising uses the
    mean and standard deviation of the transformed training values.

    Args:
        name: feature name.
        column: input column; defaults to ``name``.
        fill: value for missing entries: ``mean`` / ``median`` of the training split, ``zero``, or a number.
        clip: ``[low, high]`` bounds applied before ``log1p``; null = none.
        log1p: apply the signed ``log1p``.
        standardize: subtract the training mean and divide by the training std (std 0 -> 1).
        quantile: instead of standardising, map the value through the training split's quantiles to a standard
            normal (scikit-learn's ``QuantileTransformer(output_distribution="normal")``, at most
            ``quantiles`` reference points): heavy tails and skew are gone, ties keep one value.
        quantiles: reference points of ``quantile``.
        embedding: see :class:`NumericEmbeddingSpec`; bins are fitted on the encoded training values.
    """

    fill: float | Literal["mean", "median", "zero"] = "mean"
    clip: list[float] | None = None
    log1p: bool = False
    standardize: bool = True
    quantile: bool = False
    quantiles: int = 1000
    embedding: NumericEmbeddingSpec = field(default_factory=NumericEmbeddingSpec)

    def check(self, path: str) -> None:
        super().check(path)
        check(self.quantiles >= 2, join(path, "quantiles"), f"must be >= 2, got {self.quantiles}")
        if self.clip is not None:
            check(
                len(self.clip) == 2 and self.clip[0] <= self.clip[1],
                join(path, "clip"),
                f"expected [low, high] with low <= high, got {self.clip!r}",
            )


@dataclass
class MultiCategoricalFeature(VocabularyFeature):
    """A multi-valued categorical column (a list column, or a string split on ``separator``), pooled.

    Encoded as ``V + 1`` dense columns (vocabulary + OOV): mean pooling gives the normalised multi-hot vector
    ``(1/n) sum_i onehot(v_i)``, sum pooling the counts. A linear first layer on these columns equals a
    mean- / sum-pooled embedding bag followed by a linear layer (``W^T (1/n) sum_i e_{v_i} = (1/n) sum_i
    W^T e_{v_i}``), so no model change is needed; ``max_vocab`` keeps the width bounded (default 64).

    With ``embed: true`` it is a bag instead (DeepCTR's VarLenSparseFeat): ``max_values`` id columns (the row's
    first values, padded), embedded from one table slice and mean- / sum-pooled inside the model, so the
    width no longer grows with the vocabulary (use it for tags, categories, histories of thousands of values).

    Args:
        name: feature name (dense columns are named ``name=value`` and ``name=<oov>``).
        column: input column; defaults to ``name``.
        separator: separator of values in a string column (ignored for list columns).
        pooling: ``mean`` or ``sum``.
        min_count: values seen fewer times go to the OOV column.
        max_vocab: keep at most this many values (most frequent).
        embed: a pooled embedding bag instead of multi-hot columns.
        max_values: with ``embed``, values kept per row (the first ones; the rest are dropped).
    """

    max_vocab: int = 64
    separator: str = "|"
    pooling: Literal["mean", "sum"] = "mean"
    embed: bool = False
    max_values: int = 8
    smallest_cap: ClassVar[int] = 1

    def check(self, path: str) -> None:
        super().check(path)
        check(self.max_values >= 1, join(path, "max_values"), f"must be >= 1, got {self.max_values}")


@dataclass
class SequenceFeature(VocabularyFeature):
    """A user action sequence: a list of item ids per row, oldest first (a list column, or a string split on
    ``separator``), optionally with one action per item (``actions_column``, e.g. the rating given), encoded by
    the model into one token (:class:`mtrank.nn.sequence.SequenceEncoder`).

    The ``max_length`` most recent items are kept (the list's last values), left-padded. Item ids: with
    ``target`` (a single categorical feature, e.g. the candidate ``item_id``), the target's fitted vocabulary,
    so a history item and the candidate share ids and embeddings (needed by ``pooling: target``); without, a
    vocabulary of the list values (``min_count``, ``max_vocab``). Unseen ids are 0, as for every categorical
    feature; actions get their own vocabulary.

    Args:
        name: feature name; column: the list column (default ``name``).
        max_length: items kept per row (the most recent).
        target: the categorical feature whose vocabulary the items use and which ``pooling: target`` attends
            from; empty = the sequence's own vocabulary.
        actions_column: a list column of the same lengths (one action per item); empty = none.
        times_column: a list column of the same lengths: each item's event time (numbers, e.g. Unix seconds);
            the model reads the age ``time_column - time`` in log2 buckets (0..31); empty = none.
        time_column: the row's own time (a number on the same scale), needed by ``times_column``.
        separator: separator of a string column.
        layers / heads: transformer layers over the sequence (0 = none) and their attention heads.
        pooling: ``mean`` (over the encoded items) or ``target`` (DIN: attention from the candidate's embedding).
    """

    max_length: int = 20
    target: str = ""
    actions_column: str = ""
    times_column: str = ""
    time_column: str = ""
    separator: str = "|"
    layers: int = 1
    heads: int = 2
    pooling: Literal["mean", "target"] = "mean"

    @property
    def extra_columns(self) -> list[str]:
        """The columns read besides the items' (actions, item times, the row's time)."""
        return [c for c in (self.actions_column, self.times_column, self.time_column) if c]

    def check(self, path: str) -> None:
        super().check(path)
        check(self.max_length >= 1, join(path, "max_length"), f"must be >= 1, got {self.max_length}")
        check(self.layers >= 0, join(path, "layers"), f"must be >= 0, got {self.layers}")
        check(self.heads >= 1, join(path, "heads"), f"must be >= 1, got {self.heads}")
        check(
            not self.times_column or bool(self.time_column),
            join(path, "time_column"),
            "times_column needs the row's own time to age the items: name its column",
        )
        check(
            self.pooling != "target" or bool(self.target),
            join(path, "pooling"),
            "'target' attends from the candidate: name it in target (a categorical feature, e.g. item_id)",
        )


@dataclass
class FeaturesSpec(Config):
    """All input features, in this order: numeric, multi-categorical (both dense), categorical (ids), sequences
    (ids, after the categorical ones).

    Args:
        hash_buckets: the categorical features' ``hash_buckets`` where a feature does not set its own (0: fit
            vocabularies; a feature's ``hash_buckets: 0`` keeps its vocabulary under a global N).
    """

    categorical: list[CategoricalFeature] = field(default_factory=list)
    numeric: list[NumericFeature] = field(default_factory=list)
    multi_categorical: list[MultiCategoricalFeature] = field(default_factory=list)
    hash_buckets: int = 0
    sequence: list[SequenceFeature] = field(default_factory=list)

    def all(self) -> list[CategoricalFeature | NumericFeature | MultiCategoricalFeature | SequenceFeature]:
        return [*self.numeric, *self.multi_categorical, *self.categorical, *self.sequence]

    def check(self, path: str) -> None:
        check(self.hash_buckets >= 0, join(path, "hash_buckets"), f"must be >= 0, got {self.hash_buckets}")
        for feat in self.categorical:
            if feat.hash_buckets is None:
                feat.hash_buckets = self.hash_buckets
        names: dict[str, str] = {}
        single = {f.name: f for f in self.categorical}
        for i, feat in enumerate(self.sequence):
            where = f"{join(path, 'sequence')}[{i}].target"
            target = single.get(feat.target)
            check(
                not feat.target or target is not None,
                where,
                f"{feat.target!r} is not a categorical feature; name one of {sorted(single)}",
            )
            check(target is None or not target.hash_buckets, where, f"{feat.target!r} is hashed; it needs a vocabulary")
        for kind in ("numeric", "multi_categorical", "categorical", "sequence"):
            for i, feat in enumerate(getattr(self, kind)):
                where = f"{join(path, kind)}[{i}]"
                check(feat.name != "", f"{where}.name", "must be a non-empty string")
                check(
                    feat.name not in names, f"{where}.name", f"{feat.name!r} is already used by {names.get(feat.name)}"
                )
                names[feat.name] = where
        check(bool(names), path, "no features: give at least one categorical, numeric or multi_categorical feature")


@dataclass
class TaskSpec(Config):
    """One task: where its label comes from.

    Args:
        name: task name.
        column: label column; defaults to ``name``.
        type: ``binary`` or ``regression``.
        weight: loss weight.
        positive: derive a binary label by comparing the column with a number: ``">= 4"``, ``"== 5"``.
        positive_values: derive a binary label: 1 where the value is one of these (e.g. ``" 50000+."``).
        mask_column: rows where this column is 0, false or missing have no label for this task.
        depends_on: the task this one follows in a funnel (``cvr`` after ``ctr``); its label then exists only
            where the parent's column is 1 (``mask_column`` defaults to the parent's column). See
            :class:`~mtrank.config.model.FunnelConfig`.
        label_transform: regression only: the scale the model learns (and its loss is computed) on, fitted on
            the training split and inverted in every prediction: ``none``, ``standardize`` (``(y - mean) /
            std``), ``log1p`` (signed, ``sign(y) log(1 + |y|)``) or ``log1p_standardize`` (both). Metrics are
            reported on the labels' own scale.
    """

    shorthand: ClassVar[str] = "name"
    name: str
    column: str = ""
    type: Literal["binary", "regression"] = "binary"
    weight: float = 1.0
    positive: str = ""
    positive_values: list[Any] = field(default_factory=list)
    mask_column: str = ""
    depends_on: str = ""
    label_transform: LabelTransform = "none"

    def check(self, path: str) -> None:
        check(self.name != "", join(path, "name"), "must be a non-empty string")
        self.column = self.column or self.name
        check(0 <= self.weight < math.inf, join(path, "weight"), f"must be >= 0 and finite, got {self.weight}")
        check(
            self.type == "regression" or self.label_transform == "none",
            join(path, "label_transform"),
            f"{self.label_transform!r} is for regression tasks (this one is {self.type}); remove it",
        )
        if self.positive:
            parse_comparison(self.positive, join(path, "positive"))
        check(
            not (self.positive and self.positive_values),
            join(path, "positive"),
            "give positive or positive_values, not both",
        )
        if (self.positive or self.positive_values) and self.type != "binary":
            raise ConfigError(f"{join(path, 'type')}: a label derived with positive/positive_values must be binary")

    def task_config(self, label_stats: dict[str, float] | None = None) -> TaskConfig:
        """The model's task; ``label_stats`` (``{"mean", "std"}`` of the transformed training labels) from the
        fitted label transform."""
        stats = label_stats or {}
        return TaskConfig(
            self.name,
            self.type,
            self.weight,
            depends_on=self.depends_on,
            label_transform=self.label_transform,
            label_mean=stats.get("mean", 0.0),
            label_std=stats.get("std", 1.0),
        )


@dataclass
class SplitSpec(Config):
    """How the training file becomes train / valid / test.

    Args:
        method: ``random`` (seeded shuffle), ``time`` (sorted by ``time_column``; last rows: valid, test),
            or ``files`` (``data.valid`` / ``data.test`` give the other splits).
        fractions: train, valid, test fractions (``random`` / ``time``); must sum to 1.
        seed: seed of the random split.
        time_column: the column that orders rows in time (``time``).
        valid_from: with ``files`` and no ``data.valid``: take validation rows at random (``seed``) from the
            ``train`` or the ``test`` file, ``valid_fraction`` of it (MMoE's census protocol: half of test).
        valid_fraction: see ``valid_from``.
    """

    method: Literal["random", "time", "files"] = "random"
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0
    time_column: str = ""
    valid_from: Literal["", "train", "test"] = ""
    valid_fraction: float = 0.5

    def check(self, path: str) -> None:
        check(self.seed >= 0, join(path, "seed"), f"must be >= 0, got {self.seed}")
        if self.method in ("random", "time"):
            ok = len(self.fractions) == 3 and all(f >= 0 for f in self.fractions)
            check(
                ok and abs(sum(self.fractions) - 1) < 1e-6 and self.fractions[0] > 0,
                join(path, "fractions"),
                f"expected [train, valid, test] fractions >= 0 summing to 1, got {self.fractions!r}",
            )
        if self.method == "time":
            check(bool(self.time_column), join(path, "time_column"), "required when split.method is 'time'")
        if self.method == "files":
            check(
                0 < self.valid_fraction < 1,
                join(path, "valid_fraction"),
                f"must be in (0, 1), got {self.valid_fraction}",
            )


@dataclass
class DataSpec(Config):
    """Where the rows are and how to read them.

    Args:
        train: a CSV file, a Parquet file, or a directory of Parquet / CSV shards (or a MovieLens folder).
        valid: validation file (``split.method = files``).
        test: test file (``split.method = files``).
        format: ``auto`` (by content: Parquet magic bytes, else CSV), ``csv``, ``parquet``,
            ``movielens-grouplens`` (``u.data``, ``u.user``, ``u.item``), ``movielens-recbole`` (atomic).
        csv_header: the CSV's first line names the columns.
        csv_columns: column names of a header-less CSV.
        csv_delimiter: field separator.
        null_values: extra strings read as missing (besides ``""``, ``NA``, ``NaN``, ``null``...).
        weight_column: per-row sample weight column; empty = none.
        split: see :class:`SplitSpec`.
        streaming: train from record batches streamed from disk (bounded memory) instead of loading the train
            split; needs ``split.method = files`` (validation and test are read into memory).
        shuffle_buffer: rows in the streaming shuffle buffer.
        shuffle_start: the fraction of ``shuffle_buffer`` a reader's buffer holds before its first rows go out;
            from then on half of each record batch read goes out until the buffer has been full once (then it
            emits at capacity, down to half): a reader's first items come sooner, each epoch (1.0: only once the
            buffer is full, as without an early start).
        workers: streaming reader processes (0 = read in the training process).
        read_batch_rows: rows per record batch read from disk.
        fit_rows: fit encoders on the first this-many training rows; 0 = all.
        history: with a MovieLens format, add each rating's preceding history of that user, at most this many
            most recent items (``history_items``, ``history_ratings``; :func:`mtrank.data.movielens.add_history`);
            0 = none.
    """

    train: str = ""
    valid: str = ""
    test: str = ""
    format: Literal["auto", "csv", "parquet", "movielens-grouplens", "movielens-recbole"] = "auto"
    csv_header: bool = True
    csv_columns: list[str] = field(default_factory=list)
    csv_delimiter: str = ","
    null_values: list[str] = field(default_factory=list)
    weight_column: str = ""
    split: SplitSpec = field(default_factory=SplitSpec)
    streaming: bool = False
    shuffle_buffer: int = 100_000
    shuffle_start: float = 0.5
    workers: int = 1
    read_batch_rows: int = 65_536
    fit_rows: int = 0
    history: int = 0

    def check(self, path: str) -> None:
        s = self.split
        check(self.history >= 0, join(path, "history"), f"must be >= 0, got {self.history}")
        check(
            not self.history or self.format.startswith("movielens"),
            join(path, "history"),
            f"built from MovieLens ratings only; format is {self.format!r}",
        )
        if s.method == "files":
            check(
                bool(self.valid) or bool(s.valid_from),
                join(path, "valid"),
                "required when split.method is 'files' (or set split.valid_from: train | test)",
            )
            check(
                not (s.valid_from == "test" and not self.test),
                join(path, "test"),
                "required when split.valid_from is 'test'",
            )
        if self.streaming:
            check(
                s.method == "files" and s.valid_from != "train",
                join(path, "streaming"),
                "streaming reads the train files from disk as they are: use split.method 'files' with data.valid "
                "(or split.valid_from: test)",
            )
            check(self.format in ("auto", "csv", "parquet"), join(path, "format"), "streaming reads csv or parquet")
        if not self.csv_header:
            check(bool(self.csv_columns), join(path, "csv_columns"), "required when csv_header is false")
        check(self.shuffle_buffer >= 1, join(path, "shuffle_buffer"), f"must be >= 1, got {self.shuffle_buffer}")
        check(0 < self.shuffle_start <= 1, join(path, "shuffle_start"), f"must be in (0, 1], got {self.shuffle_start}")
        check(self.workers >= 0, join(path, "workers"), f"must be >= 0, got {self.workers}")
        check(self.read_batch_rows >= 1, join(path, "read_batch_rows"), f"must be >= 1, got {self.read_batch_rows}")
        check(self.fit_rows >= 0, join(path, "fit_rows"), f"must be >= 0, got {self.fit_rows}")


BASELINE_LIBRARIES = ("sklearn", "lightgbm", "xgboost")


@dataclass
class BaselineSpec(Config):
    """The gradient-boosting baseline trained beside the network in every training report (one model per task,
    the same split and encoded features; :mod:`mtrank.evaluate.baseline`).

    Args:
        enabled: train it (``mtrank train --no-baseline`` turns it off for one run).
        library: ``sklearn`` (``HistGradientBoostingClassifier`` / ``Regressor``), ``lightgbm`` or ``xgboost``
            (their scikit-learn estimators; the package must be installed).
        params: estimator arguments for every task (``{learning_rate: 0.05, max_leaf_nodes: 63}``).
        task_params: per task name, arguments over ``params`` (what ``mtrank tune --baseline`` writes).
        max_iter: boosting rounds at most; rounds stop early when the validation split's loss has not improved
            for ``patience`` rounds (the network selects its best step on the same split).
        patience: see ``max_iter``.
    """

    enabled: bool = True
    library: Literal["sklearn", "lightgbm", "xgboost"] = "sklearn"
    params: dict[str, Any] = field(default_factory=dict)
    task_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_iter: int = 1000
    patience: int = 20

    def check(self, path: str) -> None:
        check(self.max_iter >= 1, join(path, "max_iter"), f"must be >= 1, got {self.max_iter}")
        check(self.patience >= 1, join(path, "patience"), f"must be >= 1, got {self.patience}")


@dataclass
class SearchParam(Config):
    """One searched value of ``tune.space``: a range (``low``, ``high``; ``log``, ``step``) or ``choices``.

    ``type: auto`` is ``categorical`` with ``choices``, ``int`` when ``low`` and ``high`` are written as integers
    (``2``, not ``2.0``), else ``float``. Choices are numbers, strings, booleans or lists (``[[32], [64, 32]]``
    for layer widths).
    """

    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: list[Any] = field(default_factory=list)
    type: Literal["auto", "float", "int", "categorical"] = "auto"

    def check(self, path: str) -> None:
        if self.choices or self.type == "categorical":
            check(bool(self.choices), join(path, "choices"), "give at least one choice")
            check(self.low is None and self.high is None, join(path, "low"), "give choices or low/high, not both")
            self.type = "categorical"
            return
        for name in ("low", "high", "step"):
            value = getattr(self, name)
            if value is None and name == "step":
                continue
            number = _search_number(value)
            check(number is not None, join(path, name), f"expected a number, got {value!r}")
            setattr(self, name, number)
        if self.type == "auto":
            integral = all(isinstance(v, int) for v in (self.low, self.high))
            self.type = "int" if integral else "float"
        if self.type == "int":
            check(self.low == int(self.low), join(path, "low"), f"expected an integer, got {self.low!r}")
            check(self.high == int(self.high), join(path, "high"), f"expected an integer, got {self.high!r}")
            self.low, self.high = int(self.low), int(self.high)
        check(self.low < self.high, join(path, "high"), f"must be > low ({self.low}), got {self.high}")
        check(not self.log or self.low > 0, join(path, "low"), f"must be > 0 on a log scale, got {self.low}")
        check(not (self.log and self.step is not None), join(path, "step"), "a log scale takes no step; remove one")


def _search_number(value: Any) -> int | float | None:
    """``value`` as written (an int stays an int), or a number written as text (YAML reads ``1e-3`` as text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


@dataclass
class TuneSpec(Config):
    """``mtrank tune``: a hyper-parameter search on the validation split (:mod:`mtrank.tune`).

    Args:
        trials: finished (complete or pruned) trials the study should hold; a rerun goes on to this many.
        space: dotted config keys -> :class:`SearchParam` (``train.lr: {low: 1e-4, high: 1e-2, log: true}``);
            ``tasks.<name>.weight`` sets a task's loss weight, ``features.numeric.<name>.<key>`` a feature's
            option; ``data.*`` cannot be searched (every trial reads the same split).
        objective: a validation metric (``auc/click``), a weighted sum of several (``{auc/click: 1.0,
            auc/buy: 0.5}``, all maximised or all minimised), or empty: the mean over the tasks of AUC
            (binary) and R² (regression).
        storage: optuna storage URL; empty: ``sqlite:///<output>/tune/study.db`` (a rerun resumes the study).
        study: study name; empty: the config's ``name``, else its file name.
        seed: the sampler's seed (TPE).
        pruning: stop a trial whose intermediate validation objective is below the median of earlier trials at
            the same step (optuna's ``MedianPruner``), after ``startup_trials`` trials.
        startup_trials: trials before pruning (and TPE) start; random sampling until then.
        baseline_space: the gradient-boosting baseline's search (``mtrank tune --baseline``): estimator
            argument -> :class:`SearchParam`; empty: a default space for the baseline's library.
    """

    trials: int = 20
    space: dict[str, SearchParam] = field(default_factory=dict)
    objective: str | dict[str, float] = ""
    storage: str = ""
    study: str = ""
    seed: int = 0
    pruning: bool = True
    startup_trials: int = 5
    baseline_space: dict[str, SearchParam] = field(default_factory=dict)

    def check(self, path: str) -> None:
        check(self.trials >= 1, join(path, "trials"), f"must be >= 1, got {self.trials}")
        check(self.startup_trials >= 0, join(path, "startup_trials"), f"must be >= 0, got {self.startup_trials}")
        for key in self.space:
            check(not key.startswith("data."), f"{join(path, 'space')}.{key}", "every trial reads the same data: "
                  "the data section cannot be searched")  # fmt: skip
        if isinstance(self.objective, dict):
            check(bool(self.objective), join(path, "objective"), "give at least one metric and its weight")


@dataclass
class ExperimentConfig:
    """A whole experiment: data, features, tasks, model and training. ``output`` is the model directory.

    ``model`` holds every model section but the derived ones: ``tasks`` come from :attr:`tasks` and the
    inputs (but ``embedding_dim``) from the fitted encoders (:meth:`model_config`). ``source`` is the YAML
    file it came from (for messages), not a config key.
    """

    data: DataSpec
    features: FeaturesSpec
    tasks: list[TaskSpec]
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baseline: BaselineSpec = field(default_factory=BaselineSpec)
    tune: TuneSpec = field(default_factory=TuneSpec)
    output: str = "runs/model"
    name: str = ""
    plugins: list[str] = field(default_factory=list)
    source: str = ""

    def label_columns(self) -> list[str]:
        return [t.column for t in self.tasks]

    def input_columns(self) -> list[str]:
        """Every column the experiment reads, feature columns first."""
        cols = [f.column for f in self.features.all()]
        cols += [c for f in self.features.sequence for c in f.extra_columns]
        cols += [t.column for t in self.tasks] + [t.mask_column for t in self.tasks if t.mask_column]
        if self.data.weight_column:
            cols.append(self.data.weight_column)
        if self.data.split.method == "time" and self.data.split.time_column:
            cols.append(self.data.split.time_column)
        return list(dict.fromkeys(cols))

    def task_configs(self, label_stats: dict[str, dict[str, float]] | None = None) -> list[TaskConfig]:
        """The model's tasks; ``label_stats``: per task name, the fitted label transform's ``mean`` and ``std``."""
        return [t.task_config((label_stats or {}).get(t.name)) for t in self.tasks]

    def check_monitor(self) -> None:
        """``train.monitor`` names a validation metric of the tasks (:func:`~mtrank.config.train.check_monitor`).
        Checked when training starts, not when a config is read, so a model directory written before the rule
        still opens."""
        try:
            check_monitor(self.train.monitor, {t.name: t.type for t in self.tasks})
        except ConfigError as err:
            raise ConfigError(f"{self.source}: {err}" if self.source else str(err)) from None

    def model_config(
        self,
        num_dense: int,
        vocab_sizes: list[int],
        bags: list[dict] | None = None,
        numeric: list[dict] | None = None,
        label_stats: dict[str, dict[str, float]] | None = None,
        sequences: list[dict] | None = None,
    ) -> ModelConfig:
        """The :class:`ModelConfig` for fitted encoders: the ``model`` section + derived inputs and tasks.

        ``bags``: ``{"length": columns, "pooling": "mean" | "sum"}`` of each embedded multi-valued feature;
        ``numeric``: the embedded numeric columns (:class:`~mtrank.config.model.NumericEmbeddingConfig` fields);
        ``label_stats``: per task, the fitted label transform (``{"mean", "std"}``); ``sequences``: the action
        sequences (:class:`~mtrank.config.model.SequenceConfig` fields, :attr:`FeatureEncoder.sequence_inputs`)."""
        inputs = InputsConfig(
            num_dense=num_dense,
            vocab_sizes=list(vocab_sizes),
            embedding_dim=self.model.inputs.embedding_dim,
            bags=list(bags or []),
            numeric=list(numeric or []),
            sequences=list(sequences or []),
            names=[f.name for f in self.features.categorical],  # the single columns, in order: pepnet names them
            pad_to=self.model.inputs.pad_to,
            table_dtype=self.model.inputs.table_dtype,
        )
        model = dataclasses.replace(self.model, inputs=inputs, tasks=self.task_configs(label_stats))
        return model.validate("model")

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :func:`experiment_from_dict` reads back (derived model fields left out)."""
        data = dataclasses.asdict(self)
        data.pop("source")
        data["model"].pop("tasks")
        data["model"]["inputs"] = {"embedding_dim": self.model.inputs.embedding_dim}
        if self.model.inputs.pad_to != 1:
            data["model"]["inputs"]["pad_to"] = self.model.inputs.pad_to
        if self.model.inputs.table_dtype != "fp32":  # (absent at the default: saved configs stay as they were)
            data["model"]["inputs"]["table_dtype"] = self.model.inputs.table_dtype
        return data


def parse_comparison(text: str, field_name: str) -> tuple[str, float]:
    """``">= 4"`` -> ``(">=", 4.0)``; errors name the field."""
    match = _COMPARISON.match(str(text))
    if not match:
        raise ConfigError(f"{field_name}: expected a comparison like '>= 4', '== 5' or '> 0', got {text!r}")
    try:
        return match.group(1), float(match.group(2))
    except ValueError:
        raise ConfigError(f"{field_name}: {match.group(2)!r} is not a number") from None


def import_plugins(modules: list[str], base_dir: str | Path | None = None, path: str = "plugins") -> None:
    """Import the modules that register expert / gate types (``plugins:`` of a config, or a model directory).

    A module next to the YAML file (``base_dir``) is importable by its name.
    """
    if base_dir is not None and modules and str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except ImportError as err:
            where = f" (looked in {base_dir} and on sys.path)" if base_dir is not None else " (on sys.path)"
            raise ConfigError(f"{path}[{i}]: cannot import module {name!r}{where}: {err}") from None


def experiment_from_dict(raw: Any, source: str = "", base_dir: str | Path | None = None) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig`; relative data paths resolve against ``base_dir``."""
    prefix = f"{source}: " if source else ""
    try:
        if not isinstance(raw, dict):
            raise ConfigError(f"(top level): expected a mapping with data, features, tasks, got {type(raw).__name__}")
        for key in raw:
            if key not in SECTIONS:
                raise ConfigError(f"{key}: unknown section{did_you_mean(key, list(SECTIONS))}")
        for key in ("features", "tasks"):
            check(key in raw, key, "required section is missing")
        plugins = build_plugins(raw.get("plugins"))
        import_plugins(plugins, base_dir)
        data = build(DataSpec, raw.get("data") or {}, "data")
        features = build(FeaturesSpec, raw["features"], "features")
        tasks_raw = raw["tasks"]
        check(isinstance(tasks_raw, list), "tasks", f"expected a list of tasks, got {type(tasks_raw).__name__}")
        tasks = [build(TaskSpec, t, f"tasks[{i}]") for i, t in enumerate(tasks_raw)]
        check(len(tasks) >= 1, "tasks", "at least one task is required")
        names = [t.name for t in tasks]
        for i, name in enumerate(names):
            check(name not in names[:i], f"tasks[{i}].name", f"task name {name!r} is used twice")
        for task in tasks:  # a dependent task's label exists where its parent's is 1 (unknown parents: model check)
            if task.depends_on in names and not task.mask_column:
                task.mask_column = tasks[names.index(task.depends_on)].column
        model = _model_section(raw.get("model"), tasks, features)
        train = build(TrainConfig, raw.get("train") or {}, "train")
        baseline = build(BaselineSpec, raw.get("baseline") or {}, "baseline")
        tune = build(TuneSpec, raw.get("tune") or {}, "tune")
        output = raw.get("output", "runs/model")
        check(isinstance(output, str), "output", f"expected a path, got {output!r}")
        name = raw.get("name", "")
        check(isinstance(name, str), "name", f"expected a string, got {name!r}")
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None
    if base_dir is not None:
        for key in ("train", "valid", "test"):
            value = getattr(data, key)
            if value and not Path(value).is_absolute():
                setattr(data, key, str(Path(base_dir) / value))
    return ExperimentConfig(data, features, tasks, model, train, baseline, tune, output, name, plugins, source)


def build_plugins(raw: Any) -> list[str]:
    if raw is None:
        return []
    check(isinstance(raw, list) and all(isinstance(m, str) for m in raw), "plugins", "expected a list of module names")
    return list(raw)


def _model_section(raw: Any, tasks: list[TaskSpec], features: FeaturesSpec) -> ModelConfig:
    raw = copy.deepcopy(raw) if raw is not None else {}
    check(isinstance(raw, dict), "model", "expected a mapping of model sections (block, experts, gate, towers, ...)")
    check("tasks" not in raw, "model.tasks", "derived from the tasks section; remove it from the model section")
    for key in ("num_dense", "vocab_sizes", "bag_lengths", "bag_pooling"):  # mtrank 0.1's flat names too
        check(key not in raw, f"model.{key}", "derived from the features section; remove it")
    inputs = raw.get("inputs") or {}
    if isinstance(inputs, dict):
        for key in DERIVED_INPUTS:
            check(key not in inputs, f"model.inputs.{key}", "derived from the features section; remove it")
    # built with a placeholder input, so that every model rule is checked now, before any data is read
    names = [f.name for f in features.categorical]  # single categorical columns: model sections may name them
    placeholder_inputs = {**inputs, "num_dense": 1, "names": names, "vocab_sizes": [2] * len(names)}
    placeholder = {**raw, "inputs": placeholder_inputs, "tasks": [t.task_config().to_dict() for t in tasks]}
    model = build(ModelConfig, placeholder, "model")
    model.inputs.num_dense, model.inputs.vocab_sizes, model.inputs.names = 0, [], []
    return model


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config. Relative data paths (and plugin modules) are relative to its folder.

    ``overrides`` maps dotted keys to values (``{"train.epochs": 1, "data.train": "x.csv"}``).
    """
    path = Path(path)
    raw = read_yaml(path)
    if isinstance(raw, dict):
        overrides = dict(overrides or {})
        for key in ("data.train", "data.valid", "data.test"):  # a path given on the command line: from the cwd
            if isinstance(overrides.get(key), str) and overrides[key]:
                overrides[key] = str(Path(overrides[key]).resolve())
        apply_overrides(raw, overrides)
    return experiment_from_dict(raw, source=str(path), base_dir=path.resolve().parent)
