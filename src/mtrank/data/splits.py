"""Splits: the experiment's files (or a DataFrame) -> train / valid / test tables -> encoded tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mtrank.config import ConfigError
from mtrank.config.experiment import ExperimentConfig
from mtrank.data.encoders import FeatureEncoder
from mtrank.data.errors import DataError, warn
from mtrank.data.readers import encode_labels, encode_weights, read_table, validate_table
from mtrank.data.tensors import TensorData


def load_splits(
    config: ExperimentConfig, dataframe: Any = None, include_train: bool = True
) -> dict[str, tuple[pa.Table, str]]:
    """``{"train": (table, source), "valid": ..., "test": ...}`` per ``data.split`` (test may be absent).

    ``include_train=False`` (streaming training, ``split.method: files``): the validation and test tables only;
    the training files are not read (validation rows drawn from the test file are still split off it).
    """
    spec = config.data
    if dataframe is None and not spec.train:
        raise ConfigError(
            f"{config.source or 'config'}: data.train: required (a CSV / Parquet file or a directory "
            "of shards), or pass a DataFrame to mtrank.fit"
        )
    split = spec.split
    if split.method == "files":
        out = {}
        roles = ("train", "valid", "test") if include_train else ("valid", "test")
        for role in roles:
            path = dataframe if role == "train" and dataframe is not None else getattr(spec, role)
            if path is not None and (not isinstance(path, str) or path):
                out[role] = read_table(path, config)
                validate_table(out[role][0], config, out[role][1])
        if split.valid_from and not spec.valid:  # validation rows drawn from the train or the test file
            donor, donor_source = out[split.valid_from]
            order = np.random.default_rng(split.seed).permutation(donor.num_rows)
            cut = int(round(split.valid_fraction * donor.num_rows))
            out["valid"] = (donor.take(order[:cut]), f"{donor_source} [valid part]")
            out[split.valid_from] = (donor.take(order[cut:]), f"{donor_source} [{split.valid_from} part]")
        return out
    table, source = read_table(spec.train if dataframe is None else dataframe, config)
    validate_table(table, config, source)
    n = table.num_rows
    if split.method == "random":
        order = np.random.default_rng(split.seed).permutation(n)
    else:  # time: stable sort by the time column, earliest rows train
        order = np.asarray(pa.compute.sort_indices(table, [(split.time_column, "ascending")]))
    n_train = int(round(split.fractions[0] * n))
    n_valid = int(round(split.fractions[1] * n))
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, n)}
    out = {}
    for role, (lo, hi) in bounds.items():
        if hi > lo:
            out[role] = (table.take(order[lo:hi]), f"{source} [{role} split]")
    return out


def encode_table(
    encoder: FeatureEncoder, table: pa.Table, config: ExperimentConfig, source: str, with_labels: bool = True
) -> TensorData:
    """Rows -> :class:`TensorData` (labels NaN-filled when ``with_labels`` is False); a numeric value that does
    not encode to a finite number fails naming the column and row."""
    dense, sparse = encoder.transform(table, source)
    encoder.check_finite(dense, table, source)
    if with_labels:
        labels = encode_labels(table, config.tasks, source)
        weights = encode_weights(table, config.data.weight_column, source)
    else:
        labels = np.full((table.num_rows, len(config.tasks)), np.nan, dtype=np.float32)
        weights = None
    return TensorData(
        torch.from_numpy(dense),
        torch.from_numpy(sparse),
        torch.from_numpy(labels),
        None if weights is None else torch.from_numpy(weights),
    )


def check_train_labels(data: TensorData, config: ExperimentConfig, source: str) -> None:
    present = (~torch.isnan(data.labels)).sum(0)
    for k, task in enumerate(config.tasks):
        if int(present[k]) == 0:
            raise DataError(
                f"{source}: column {task.column!r}: task {task.name!r} has no labels in the training "
                f"split (all missing or masked by {task.mask_column or 'nothing'}); fix the column or "
                "drop the task"
            )


def warn_label_leaks(config: ExperimentConfig) -> None:
    """Warn when a task's label column is also read as a feature: the model sees the answer, and its validation
    metrics (AUC 1.0) say nothing about new rows."""
    features = {f.column: f.name for f in config.features.all()}
    for k, task in enumerate(config.tasks):
        if task.column in features:
            warn(
                f"{config.source or 'config'}: tasks[{k}] ({task.name!r}) reads its label from column "
                f"{task.column!r}, which feature {features[task.column]!r} also reads: the model sees the label; "
                "remove the feature (or the task)"
            )


def warn_constant_labels(data: TensorData, config: ExperimentConfig, source: str, split: str) -> None:
    """Warn about a binary task whose labels in this split are all 0 or all 1: its AUC is undefined (nan), and
    on the training split the task can only learn a constant."""
    for k, task in enumerate(config.tasks):
        labels = data.labels[:, k]
        labels = labels[~torch.isnan(labels)]
        if task.type != "binary" or labels.numel() == 0 or bool((labels != labels[0]).any()):
            continue
        monitor = config.train.monitor
        monitored = f", and so is train.monitor {monitor!r}" if monitor == f"auc/{task.name}" else ""
        warn(
            f"{source}: column {task.column!r}: every label of task {task.name!r} in the {split} split is "
            f"{labels[0].item():g} ({labels.numel():,} rows), so its AUC is undefined (nan){monitored}; check the "
            "column, its positive / positive_values, mask_column and the split"
        )
