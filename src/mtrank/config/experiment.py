"""The experiment: which columns are features, labels and weights, how to read and split the files, the model
and its training. One YAML file (see ``configs/*.yaml`` and ``docs/data.md``) or the same data from Python.

:func:`load_experiment` / :func:`experiment_from_dict` build it with the one config builder
(:mod:`mtrank.config.base`): unknown keys get a did-you-mean hint, values are type-checked, messages name the
field (``features.numeric[2].clip: ...``). Relative data paths resolve against the YAML file's folder.

Sections::

    data:      where the rows are (train / valid / test paths, format, CSV options, split, streaming)
    features:  categorical (vocabulary or hashing), numeric (fill, clip, log1p, standardise),
               multi_categorical (list columns, mean or sum pooled)
    tasks:     label column, binary / regression, loss weight, optional mask column, derived binary labels
    model:     :class:`mtrank.config.ModelConfig` sections; ``inputs`` (but ``embedding_dim``) and ``tasks``
               are derived from the features and tasks above
    train:     :class:`mtrank.config.TrainConfig`
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
from mtrank.config.model import InputsConfig, ModelConfig, TaskConfig
from mtrank.config.train import TrainConfig, check_monitor

FORMATS = ("auto", "csv", "parquet", "movielens-grouplens", "movielens-recbole")
_COMPARISON = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(-?[0-9.eE+-]+)\s*$")
SECTIONS = ("data", "features", "tasks", "model", "train", "output", "name", "plugins")
DERIVED_INPUTS = ("num_dense", "vocab_sizes", "bags", "names")


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
    is ``stable_hash(str(value)) mod N`` (vocab size N; collisions share an id).

    Args:
        name: feature name (in ``feature_names`` and serving requests).
        column: input column; defaults to ``name``.
        min_count: values seen fewer times in the training split go to the OOV bucket.
        max_vocab: keep at most this many values (most frequent); 0 = no cap.
        hash_buckets: hash into this many buckets instead of fitting a vocabulary; 0 = vocabulary.
    """

    hash_buckets: int = 0

    def check(self, path: str) -> None:
        super().check(path)
        check(self.hash_buckets >= 0, join(path, "hash_buckets"), f"must be >= 0, got {self.hash_buckets}")


@dataclass
class NumericFeature(ColumnFeature):
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

    fill: float | Literal["mean", "median", "zero"] = "mean"
    clip: list[float] | None = None
    log1p: bool = False
    standardize: bool = True

    def check(self, path: str) -> None:
        super().check(path)
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
class FeaturesSpec(Config):
    """All input features, in this order: numeric, multi-categorical (both dense), categorical (ids)."""

    categorical: list[CategoricalFeature] = field(default_factory=list)
    numeric: list[NumericFeature] = field(default_factory=list)
    multi_categorical: list[MultiCategoricalFeature] = field(default_factory=list)

    def all(self) -> list[CategoricalFeature | NumericFeature | MultiCategoricalFeature]:
        return [*self.numeric, *self.multi_categorical, *self.categorical]

    def check(self, path: str) -> None:
        names: dict[str, str] = {}
        for kind in ("numeric", "multi_categorical", "categorical"):
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
    """

    shorthand: ClassVar[str] = "name"
    name: str
    column: str = ""
    type: Literal["binary", "regression"] = "binary"
    weight: float = 1.0
    positive: str = ""
    positive_values: list[Any] = field(default_factory=list)
    mask_column: str = ""

    def check(self, path: str) -> None:
        check(self.name != "", join(path, "name"), "must be a non-empty string")
        self.column = self.column or self.name
        check(0 <= self.weight < math.inf, join(path, "weight"), f"must be >= 0 and finite, got {self.weight}")
        if self.positive:
            parse_comparison(self.positive, join(path, "positive"))
        check(
            not (self.positive and self.positive_values),
            join(path, "positive"),
            "give positive or positive_values, not both",
        )
        if (self.positive or self.positive_values) and self.type != "binary":
            raise ConfigError(f"{join(path, 'type')}: a label derived with positive/positive_values must be binary")

    def task_config(self) -> TaskConfig:
        return TaskConfig(self.name, self.type, self.weight)


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
        workers: streaming reader processes (0 = read in the training process).
        read_batch_rows: rows per record batch read from disk.
        fit_rows: fit encoders on the first this-many training rows; 0 = all.
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
    workers: int = 1
    read_batch_rows: int = 65_536
    fit_rows: int = 0

    def check(self, path: str) -> None:
        s = self.split
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
        check(self.workers >= 0, join(path, "workers"), f"must be >= 0, got {self.workers}")
        check(self.read_batch_rows >= 1, join(path, "read_batch_rows"), f"must be >= 1, got {self.read_batch_rows}")
        check(self.fit_rows >= 0, join(path, "fit_rows"), f"must be >= 0, got {self.fit_rows}")


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
    output: str = "runs/model"
    name: str = ""
    plugins: list[str] = field(default_factory=list)
    source: str = ""

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

    def task_configs(self) -> list[TaskConfig]:
        return [t.task_config() for t in self.tasks]

    def check_monitor(self) -> None:
        """``train.monitor`` names a validation metric of the tasks (:func:`~mtrank.config.train.check_monitor`).
        Checked when training starts, not when a config is read, so a model directory written before the rule
        still opens."""
        try:
            check_monitor(self.train.monitor, {t.name: t.type for t in self.tasks})
        except ConfigError as err:
            raise ConfigError(f"{self.source}: {err}" if self.source else str(err)) from None

    def model_config(self, num_dense: int, vocab_sizes: list[int], bags: list[dict] | None = None) -> ModelConfig:
        """The :class:`ModelConfig` for fitted encoders: the ``model`` section + derived inputs and tasks.

        ``bags``: ``{"length": columns, "pooling": "mean" | "sum"}`` of each embedded multi-valued feature."""
        bags = list(bags or [])
        inputs = InputsConfig(
            num_dense=num_dense,
            vocab_sizes=list(vocab_sizes),
            embedding_dim=self.model.inputs.embedding_dim,
            bags=bags,
            names=[f.name for f in self.features.categorical],  # the single columns, in order: pepnet names them
        )
        model = dataclasses.replace(self.model, inputs=inputs, tasks=self.task_configs())
        return model.validate("model")

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :func:`experiment_from_dict` reads back (derived model fields left out)."""
        data = dataclasses.asdict(self)
        data.pop("source")
        data["model"].pop("tasks")
        data["model"]["inputs"] = {"embedding_dim": self.model.inputs.embedding_dim}
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
        model = _model_section(raw.get("model"), tasks, features)
        train = build(TrainConfig, raw.get("train") or {}, "train")
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
    return ExperimentConfig(data, features, tasks, model, train, output, name, plugins, source)


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
