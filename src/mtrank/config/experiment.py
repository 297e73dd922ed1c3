"""The experiment schema: which columns are features, labels and weights, and how to read and split the files.

A YAML experiment config (see ``configs/*.yaml`` and ``docs/data.md``) is parsed into these dataclasses by
:func:`load_experiment` / :func:`experiment_from_dict`, which reject unknown keys and bad values with messages
naming the field (``features.numeric[2].clip: ...``). Everything downstream trusts them.

Sections::

    data:      where the rows are (train / valid / test paths, format, CSV options, split, streaming)
    features:  categorical (vocabulary or hashing), numeric (fill, clip, log1p, standardise),
               multi_categorical (list columns, mean or sum pooled)
    tasks:     label column, binary / regression, loss weight, optional mask column, derived binary labels
    model:     :class:`mtrank.config.ModelConfig` fields except num_dense / vocab_sizes / tasks (derived here)
    train:     :class:`mtrank.config.TrainConfig`
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtrank.config import (
    ConfigError,
    ModelConfig,
    TaskConfig,
    TrainConfig,
    model_config_from_dict,
    train_config_from_dict,
)

FORMATS = ("auto", "csv", "parquet", "movielens-grouplens", "movielens-recbole")
SPLITS = ("random", "time", "files")
FILLS = ("mean", "median", "zero")
POOLINGS = ("mean", "sum")
_COMPARISON = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(-?[0-9.eE+-]+)\s*$")


@dataclass
class CategoricalFeature:
    """A categorical column -> one id per row.

    Ids: ``0`` is the out-of-vocabulary bucket (unseen values, values rarer than ``min_count``, beyond
    ``max_vocab``); ``1..V`` the vocabulary fitted on the training split, most frequent first. Missing values
    are a category of their own (``<NA>``). With ``hash_buckets = N > 0`` there is no vocabulary: a value's id
    is ``stable_hash(str(value)) mod N`` (vocab size N; collisions share an id).

    Args:
        name: feature name (in ``feature_names`` and serving requests).
        column: input column; defaults to ``name``.
        min_count: values seen fewer times in the training split go to the OOV bucket.
        max_vocab: keep at most this many values (most frequent); 0 = no cap.
        hash_buckets: hash into this many buckets instead of fitting a vocabulary; 0 = vocabulary.
    """

    name: str
    column: str = ""
    min_count: int = 1
    max_vocab: int = 0
    hash_buckets: int = 0


@dataclass
class NumericFeature:
    """A numeric column -> one float32 value per row: ``fill -> clip -> log1p -> standardise``.

    ``log1p`` is signed, ``sign(x) log(1 + |x|)``, so it is defined for every value; standardising uses the
    mean and standard deviation of the transformed training values.

    Args:
        name: feature name.
        column: input column; defaults to ``name``.
        fill: value for missing entries: ``mean`` / ``median`` of the training split, ``zero``, or a number.
        clip: ``[low, high]`` bounds applied before ``log1p``; null = none.
        log1p: apply the signed ``log1p``.
        standardize: subtract the training mean and divide by the training std (std 0 -> 1).
    """

    name: str
    column: str = ""
    fill: Any = "mean"
    clip: list[float] | None = None
    log1p: bool = False
    standardize: bool = True


@dataclass
class MultiCategoricalFeature:
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

    name: str
    column: str = ""
    separator: str = "|"
    pooling: str = "mean"
    min_count: int = 1
    max_vocab: int = 64
    embed: bool = False
    max_values: int = 8


@dataclass
class FeaturesSpec:
    """All input features, in this order: numeric, multi-categorical (both dense), categorical (ids)."""

    categorical: list[CategoricalFeature] = field(default_factory=list)
    numeric: list[NumericFeature] = field(default_factory=list)
    multi_categorical: list[MultiCategoricalFeature] = field(default_factory=list)

    def all(self) -> list[CategoricalFeature | NumericFeature | MultiCategoricalFeature]:
        return [*self.numeric, *self.multi_categorical, *self.categorical]


@dataclass
class TaskSpec:
    """One task: where its label comes from.

    Args:
        name: task name.
        column: label column; defaults to ``name``.
        type: ``binary`` or ``regression``.
        weight: loss weight.
        positive: derive a binary label by comparing the column with a number: ``">= 4"``, ``"== 5"``.
        positive_values: derive a binary label: 1 where the value is one of these (e.g. ``" 50000+."``).
        mask_column: rows where this column is 0, false or missing have no label for this task.
    """

    name: str
    column: str = ""
    type: str = "binary"
    weight: float = 1.0
    positive: str = ""
    positive_values: list[Any] = field(default_factory=list)
    mask_column: str = ""


@dataclass
class SplitSpec:
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

    method: str = "random"
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0
    time_column: str = ""
    valid_from: str = ""
    valid_fraction: float = 0.5


@dataclass
class DataSpec:
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
        workers: streaming reader processes (0 = read in the training process).
        read_batch_rows: rows per record batch read from disk.
        fit_rows: fit encoders on the first this-many training rows; 0 = all.
    """

    train: str = ""
    valid: str = ""
    test: str = ""
    format: str = "auto"
    csv_header: bool = True
    csv_columns: list[str] = field(default_factory=list)
    csv_delimiter: str = ","
    null_values: list[str] = field(default_factory=list)
    weight_column: str = ""
    split: SplitSpec = field(default_factory=SplitSpec)
    streaming: bool = False
    shuffle_buffer: int = 100_000
    workers: int = 1
    read_batch_rows: int = 65_536
    fit_rows: int = 0


@dataclass
class ExperimentConfig:
    """A whole experiment: data, features, tasks, model and training. ``output`` is the model directory."""

    data: DataSpec
    features: FeaturesSpec
    tasks: list[TaskSpec]
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: str = "runs/model"
    name: str = ""
    source: str = ""  # the YAML file it came from (for messages); not a config key

    def label_columns(self) -> list[str]:
        return [t.column for t in self.tasks]

    def input_columns(self) -> list[str]:
        """Every column the experiment reads, feature columns first."""
        cols = [f.column for f in self.features.all()]
        cols += [t.column for t in self.tasks] + [t.mask_column for t in self.tasks if t.mask_column]
        if self.data.weight_column:
            cols.append(self.data.weight_column)
        if self.data.split.method == "time" and self.data.split.time_column:
            cols.append(self.data.split.time_column)
        return list(dict.fromkeys(cols))

    def model_config(
        self,
        num_dense: int,
        vocab_sizes: list[int],
        bag_lengths: list[int] | None = None,
        bag_pooling: list[str] | None = None,
    ) -> ModelConfig:
        """The :class:`ModelConfig` for fitted encoders: ``model`` section + derived inputs and tasks."""
        for derived in ("num_dense", "vocab_sizes", "tasks", "bag_lengths", "bag_pooling"):
            if derived in self.model:
                raise ConfigError(f"model.{derived}: derived from features/tasks; remove it from the config")
        tasks = [{"name": t.name, "type": t.type, "weight": t.weight} for t in self.tasks]
        data = {**self.model, "num_dense": num_dense, "vocab_sizes": list(vocab_sizes), "tasks": tasks}
        data.update(bag_lengths=list(bag_lengths or []), bag_pooling=list(bag_pooling or []))
        return model_config_from_dict(data)

    def task_configs(self) -> list[TaskConfig]:
        return [TaskConfig(t.name, t.type, t.weight) for t in self.tasks]


# ---------------------------------------------------------------------------------------------- building


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, naming the field path of any unknown key or missing field."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__} {data!r}")
    known = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {known}"
            raise ConfigError(f"{path}.{key}: unknown field{hint}")
    try:
        return cls(**data)
    except TypeError as err:
        missing = re.findall(r"'(\w+)'", str(err))
        where = f"{path}.{missing[0]}" if missing else path
        raise ConfigError(f"{where}: required field is missing") from None


def _list_of(cls: type, data: Any, path: str) -> list:
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list, got {type(data).__name__}")
    items = []
    for i, item in enumerate(data):
        if isinstance(item, str):  # shorthand: a bare column name
            item = {"name": item}
        items.append(_build(cls, item, f"{path}[{i}]"))
    return items


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def parse_comparison(text: str, field_name: str) -> tuple[str, float]:
    """``">= 4"`` -> ``(">=", 4.0)``; errors name the field."""
    match = _COMPARISON.match(str(text))
    if not match:
        raise ConfigError(f"{field_name}: expected a comparison like '>= 4', '== 5' or '> 0', got {text!r}")
    try:
        return match.group(1), float(match.group(2))
    except ValueError:
        raise ConfigError(f"{field_name}: {match.group(2)!r} is not a number") from None


def validate_features(features: FeaturesSpec, path: str = "features") -> None:
    names: dict[str, str] = {}
    for kind in ("numeric", "multi_categorical", "categorical"):
        for i, feat in enumerate(getattr(features, kind)):
            where = f"{path}.{kind}[{i}]"
            _check(isinstance(feat.name, str) and feat.name != "", f"{where}.name", "must be a non-empty string")
            feat.column = feat.column or feat.name
            _check(
                feat.name not in names,
                f"{where}.name",
                f"{feat.name!r} is already used by {names.get(feat.name)}",
            )
            names[feat.name] = where
            if kind == "categorical":
                _check(feat.min_count >= 1, f"{where}.min_count", f"must be >= 1, got {feat.min_count}")
                _check(feat.max_vocab >= 0, f"{where}.max_vocab", f"must be >= 0, got {feat.max_vocab}")
                _check(feat.hash_buckets >= 0, f"{where}.hash_buckets", f"must be >= 0, got {feat.hash_buckets}")
            elif kind == "numeric":
                fill_ok = feat.fill in FILLS or (
                    isinstance(feat.fill, (int, float)) and not isinstance(feat.fill, bool)
                )
                _check(fill_ok, f"{where}.fill", f"expected one of {FILLS} or a number, got {feat.fill!r}")
                if feat.clip is not None:
                    ok = isinstance(feat.clip, list) and len(feat.clip) == 2
                    ok = ok and all(isinstance(v, (int, float)) for v in feat.clip) and feat.clip[0] <= feat.clip[1]
                    _check(ok, f"{where}.clip", f"expected [low, high] with low <= high, got {feat.clip!r}")
                _check(isinstance(feat.log1p, bool), f"{where}.log1p", "expected true or false")
                _check(isinstance(feat.standardize, bool), f"{where}.standardize", "expected true or false")
            else:
                _check(
                    feat.pooling in POOLINGS,
                    f"{where}.pooling",
                    f"expected one of {POOLINGS}, got {feat.pooling!r}",
                )
                _check(feat.min_count >= 1, f"{where}.min_count", f"must be >= 1, got {feat.min_count}")
                _check(feat.max_vocab >= 1, f"{where}.max_vocab", f"must be >= 1, got {feat.max_vocab}")
                _check(isinstance(feat.embed, bool), f"{where}.embed", "expected true or false")
                _check(feat.max_values >= 1, f"{where}.max_values", f"must be >= 1, got {feat.max_values}")
    _check(bool(names), path, "no features: give at least one categorical, numeric or multi_categorical feature")


def validate_tasks(tasks: list[TaskSpec], path: str = "tasks") -> None:
    _check(len(tasks) >= 1, path, "at least one task is required")
    seen = set()
    for i, task in enumerate(tasks):
        where = f"{path}[{i}]"
        _check(isinstance(task.name, str) and task.name != "", f"{where}.name", "must be a non-empty string")
        _check(task.name not in seen, f"{where}.name", f"task name {task.name!r} is used twice")
        seen.add(task.name)
        task.column = task.column or task.name
        _check(
            task.type in ("binary", "regression"),
            f"{where}.type",
            f"expected binary or regression, got {task.type!r}",
        )
        _check(
            isinstance(task.weight, (int, float)) and task.weight >= 0,
            f"{where}.weight",
            "must be a number >= 0",
        )
        if task.positive:
            parse_comparison(task.positive, f"{where}.positive")
        _check(
            not (task.positive and task.positive_values),
            f"{where}.positive",
            "give positive or positive_values, not both",
        )
        _check(isinstance(task.positive_values, list), f"{where}.positive_values", "expected a list of values")
        if (task.positive or task.positive_values) and task.type != "binary":
            raise ConfigError(f"{where}.type: a label derived with positive/positive_values must be binary")


def validate_data(data: DataSpec, path: str = "data") -> None:
    _check(data.format in FORMATS, f"{path}.format", f"expected one of {FORMATS}, got {data.format!r}")
    s = data.split
    _check(s.method in SPLITS, f"{path}.split.method", f"expected one of {SPLITS}, got {s.method!r}")
    if s.method in ("random", "time"):
        ok = isinstance(s.fractions, list) and len(s.fractions) == 3 and all(f >= 0 for f in s.fractions)
        _check(
            ok and abs(sum(s.fractions) - 1) < 1e-6 and s.fractions[0] > 0,
            f"{path}.split.fractions",
            f"expected [train, valid, test] fractions >= 0 summing to 1, got {s.fractions!r}",
        )
    if s.method == "time":
        _check(bool(s.time_column), f"{path}.split.time_column", "required when split.method is 'time'")
    if s.method == "files":
        _check(
            s.valid_from in ("", "train", "test"),
            f"{path}.split.valid_from",
            f"expected train, test or empty, got {s.valid_from!r}",
        )
        _check(
            bool(data.valid) or bool(s.valid_from),
            f"{path}.valid",
            "required when split.method is 'files' (or set split.valid_from: train | test)",
        )
        _check(
            not (s.valid_from == "test" and not data.test),
            f"{path}.test",
            "required when split.valid_from is 'test'",
        )
        _check(
            0 < s.valid_fraction < 1,
            f"{path}.split.valid_fraction",
            f"must be in (0, 1), got {s.valid_fraction}",
        )
    if data.streaming:
        _check(
            s.method == "files" and s.valid_from != "train",
            f"{path}.streaming",
            "streaming reads the train files from disk as they are: use split.method 'files' with data.valid",
        )
        _check(data.format in ("auto", "csv", "parquet"), f"{path}.format", "streaming reads csv or parquet")
    if not data.csv_header:
        _check(bool(data.csv_columns), f"{path}.csv_columns", "required when csv_header is false")
    _check(data.shuffle_buffer >= 1, f"{path}.shuffle_buffer", f"must be >= 1, got {data.shuffle_buffer}")
    _check(data.workers >= 0, f"{path}.workers", f"must be >= 0, got {data.workers}")
    _check(data.read_batch_rows >= 1, f"{path}.read_batch_rows", f"must be >= 1, got {data.read_batch_rows}")
    _check(data.fit_rows >= 0, f"{path}.fit_rows", f"must be >= 0, got {data.fit_rows}")


def experiment_from_dict(raw: Any, source: str = "", base_dir: str | Path | None = None) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig`; relative data paths resolve against ``base_dir``."""
    prefix = f"{source}: " if source else ""
    try:
        if not isinstance(raw, dict):
            raise ConfigError(f"(top level): expected a mapping with data, features, tasks, got {type(raw).__name__}")
        known = ("data", "features", "tasks", "model", "train", "output", "name")
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                raise ConfigError(
                    f"{key}: unknown section"
                    + (f"; did you mean {close[0]!r}?" if close else f"; expected one of {list(known)}")
                )
        for key in ("features", "tasks"):
            _check(key in raw, key, "required section is missing")
        data_raw = raw.get("data") or {}
        data_raw = dict(data_raw) if isinstance(data_raw, dict) else data_raw
        if isinstance(data_raw, dict) and "split" in data_raw:
            data_raw["split"] = _build(SplitSpec, data_raw["split"], "data.split")
        data = _build(DataSpec, data_raw, "data")
        feats_raw = raw["features"]
        _check(isinstance(feats_raw, dict), "features", "expected a mapping with categorical / numeric / ...")
        for key in feats_raw:
            _check(
                key in ("categorical", "numeric", "multi_categorical"),
                f"features.{key}",
                "unknown feature kind; expected categorical, numeric or multi_categorical",
            )
        features = FeaturesSpec(
            categorical=_list_of(CategoricalFeature, feats_raw.get("categorical"), "features.categorical"),
            numeric=_list_of(NumericFeature, feats_raw.get("numeric"), "features.numeric"),
            multi_categorical=_list_of(
                MultiCategoricalFeature, feats_raw.get("multi_categorical"), "features.multi_categorical"
            ),
        )
        tasks = _list_of(TaskSpec, raw["tasks"], "tasks")
        model = raw.get("model") or {}
        _check(isinstance(model, dict), "model", "expected a mapping of ModelConfig fields")
        train = train_config_from_dict(raw.get("train") or {}, "train")
        validate_data(data)
        validate_features(features)
        validate_tasks(tasks)
        config = ExperimentConfig(
            data,
            features,
            tasks,
            model,
            train,
            str(raw.get("output", "runs/model")),
            str(raw.get("name", "")),
            source,
        )
        config.model_config(1, [])  # validates the model section (field names and values) now
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None
    if base_dir is not None:
        for key in ("train", "valid", "test"):
            value = getattr(data, key)
            if value and not Path(value).is_absolute():
                setattr(data, key, str(Path(base_dir) / value))
    return config


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config. Relative data paths are relative to the current directory.

    ``overrides`` maps dotted keys to values (``{"train.epochs": 1, "data.train": "x.csv"}``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    for key, value in (overrides or {}).items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    config = experiment_from_dict(raw, source=str(path))
    return config
