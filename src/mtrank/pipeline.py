"""The pipeline: experiment config -> read -> split -> fit encoders -> encode -> train -> model directory.

``mtrank.fit(config, dataframe)`` from Python, ``mtrank train CONFIG`` from the shell. A model directory
holds::

    model.safetensors   weights                          (mtrank.artifacts.save_model)
    config.json         ModelConfig + the experiment config (to read new files the same way)
    encoders.json       the fitted FeatureEncoder          (mtrank.data.encoders)
    metrics.json        validation / test metrics per task, training history, rows, seconds
    report.md           the same as readable tables
    history.jsonl       the training history, written live
    manifest.json       written last: size and SHA-256 of every file (checked by everything that loads it)

Training is :class:`mtrank.train.Trainer` on the encoded training split, or, with ``data.streaming``, on
batches streamed from the training files (:class:`mtrank.train.sources.StreamSource`): the same loop, step,
evaluation, checkpoints. Validation and test splits are read into memory either way. The training history
is written live to ``MODEL_DIR/history.jsonl`` (``train.log_dir`` elsewhere).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from mtrank.artifacts import open_model_dir, save_model, seal_model_dir
from mtrank.config.experiment import ExperimentConfig, experiment_from_dict, load_experiment
from mtrank.data.encoders import FeatureEncoder, as_table
from mtrank.data.movielens import read_movielens
from mtrank.data.readers import (
    check_columns,
    open_dataset,
    read_table,
)
from mtrank.data.splits import (
    check_train_labels,
    encode_table,
    load_splits,
    warn_constant_labels,
    warn_label_leaks,
)
from mtrank.data.streaming import EncodedStream
from mtrank.data.tensors import TensorData
from mtrank.evaluate.conflict import report_section as conflict_report_section
from mtrank.evaluate.metrics import evaluate, predict_batches
from mtrank.evaluate.report import markdown_table, write_json
from mtrank.model import MultiTaskModel
from mtrank.train.distributed import rank_and_world
from mtrank.train.sources import StreamSource
from mtrank.train.trainer import Trainer, TrainResult


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model, its encoder, metrics per split and the model directory."""

    model: MultiTaskModel
    encoder: FeatureEncoder
    metrics: dict[str, dict[str, float]]
    train_result: TrainResult
    model_dir: Path | None
    rows: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ config


def as_experiment(config: ExperimentConfig | dict | str | Path) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from itself, a plain dict, or a YAML path."""
    if isinstance(config, ExperimentConfig):
        return config
    if isinstance(config, dict):
        return experiment_from_dict(copy.deepcopy(config))
    return load_experiment(config)


# ------------------------------------------------------------------------------------------------ fit


def fit(
    config: ExperimentConfig | dict | str | Path,
    dataframe: Any = None,
    output: str | Path | None = "",
    progress: bool | None = None,
) -> FitResult:
    """Train a model from an experiment config (object, dict or YAML path), on ``dataframe`` if given.

    ``output``: the model directory (default: the config's ``output``; None = write nothing).

    Example:
        >>> import pandas as pd, mtrank
        >>> df = pd.DataFrame({"city": list("abcab") * 40, "age": range(200), "click": [0, 1] * 100})
        >>> cfg = {"features": {"categorical": ["city"], "numeric": ["age"]}, "tasks": [{"name": "click"}],
        ...        "model": {"block": {"num_experts": 2}}, "train": {"epochs": 1, "progress": False}}
        >>> result = mtrank.fit(cfg, df, output=None)
        >>> sorted(result.metrics)
        ['test', 'valid']
    """
    config = as_experiment(config)
    config.check_monitor()  # before any data is read
    train_config = config.train
    if progress is not None:
        train_config = dataclasses.replace(train_config, progress=progress)
    model_dir = None if output is None else Path(output or config.output)
    if model_dir is not None and not train_config.log_dir:  # history.jsonl beside the model, written live
        train_config = dataclasses.replace(train_config, log_dir=str(model_dir))
    started = time.perf_counter()
    warn_label_leaks(config)
    streaming = config.data.streaming and dataframe is None
    splits = load_splits(config, dataframe, include_train=not streaming)
    if streaming:
        encoder = _fit_encoder_on_stream(config)
    else:
        train_table, train_source = splits["train"]
        fit_table = train_table.slice(0, config.data.fit_rows) if config.data.fit_rows else train_table
        encoder = FeatureEncoder(config.features).fit(fit_table, train_source)
    data = {role: encode_table(encoder, table, config, source) for role, (table, source) in splits.items()}
    for role in ("train", "valid"):
        if role in data:
            warn_constant_labels(data[role], config, splits[role][1], role)
    model = MultiTaskModel(
        config.model_config(encoder.num_dense, encoder.vocab_sizes, encoder.bag_inputs),
        seed=config.train.seed,
    )
    trainer = Trainer(model, train_config)
    if streaming:
        stream = EncodedStream(config.data.train, config, encoder, train_config.batch_size, seed=train_config.seed)
        train: Any = StreamSource(stream, config.data.workers, trainer.device)
        rows = {"train": train.rows}
    else:
        train = data.pop("train")
        check_train_labels(train, config, train_source)
        rows = {"train": len(train)}
    train_result = trainer.fit(train, data.get("valid"))
    metrics = {role: evaluate(model, d) for role, d in data.items()}
    rows.update({role: len(d) for role, d in data.items()})
    return _finish(config, model, encoder, metrics, train_result, rows, model_dir, started)


def _fit_encoder_on_stream(config: ExperimentConfig) -> FeatureEncoder:
    """Encoders fitted on the first ``data.fit_rows`` (default 1,000,000) rows of the training files."""
    fit_table, source = read_table(config.data.train, config, max_rows=config.data.fit_rows or 1_000_000)
    return FeatureEncoder(config.features).fit(fit_table, f"{source} (first {fit_table.num_rows:,} rows)")


def _finish(config, model, encoder, metrics, train_result, rows, model_dir, started) -> FitResult:
    if model_dir is not None and rank_and_world()[0] == 0:  # data-parallel: one writer
        extra = {"experiment": config.to_dict(), "encoders": "encoders.json"}
        save_model(model, model_dir, extra, config.plugins, seal=False)
        encoder.save(model_dir)
        summary = {
            "metrics": metrics,
            "rows": rows,
            "best_step": train_result.best_step,
            "steps": train_result.steps,
            "train_seconds": train_result.seconds,
            "samples_per_second": train_result.samples_per_second,
            "total_seconds": time.perf_counter() - started,
            "history": train_result.history,
        }
        write_json(model_dir / "metrics.json", summary)
        report = report_markdown(config, encoder, metrics, rows, train_result)
        conflict = conflict_report_section(train_result.history, model_dir)  # "" without conflict measurements
        (model_dir / "report.md").write_text(report + (f"\n{conflict}" if conflict else ""))
        seal_model_dir(model_dir)  # last: the manifest names every file above with its SHA-256
    return FitResult(model, encoder, metrics, train_result, model_dir, rows)


def report_markdown(
    config: ExperimentConfig, encoder: FeatureEncoder, metrics: dict, rows: dict, train_result: TrainResult
) -> str:
    """Tables: metrics per task and split; data and model summary."""
    lines = [f"# {config.name or 'mtrank model'}", ""]
    lines.append(
        f"Rows: {', '.join(f'{k} {v:,}' for k, v in rows.items())}. Inputs: {encoder.num_dense} dense "
        f"columns, {len(encoder.vocab_sizes)} categorical (vocabularies {encoder.vocab_sizes}). "
        f"Block `{config.model.block.type}`; {train_result.steps} steps, best at "
        f"{train_result.best_step}, {train_result.seconds:.1f} s."
    )
    lines.append("")
    lines.append(metrics_table(metrics))
    return "\n".join(lines) + "\n"


def metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """One row per (split, task): AUC / log loss for binary tasks, MSE / R² for regression (columns that no
    task has are left out)."""
    names = {"auc": "AUC", "logloss": "log loss", "mse": "MSE", "r2": "R²"}
    present = [m for m in names if any(k.startswith(f"{m}/") for values in metrics.values() for k in values)]
    rows = []
    for split, values in metrics.items():
        tasks = list(dict.fromkeys(k.split("/", 1)[1] for k in values if "/" in k))
        for task in tasks:
            cells = [split, task]
            for metric in present:
                value = values.get(f"{metric}/{task}")
                cells.append("" if value is None else float(value))
            rows.append(cells)
    return markdown_table(["split", "task", *[names[m] for m in present]], rows)


# ------------------------------------------------------------------------------------------------ model dirs


def evaluate_model_dir(model_dir: str | Path, data: Any) -> dict[str, float]:
    """Metrics per task of a saved model on a labelled file / directory / DataFrame."""
    loaded = open_model_dir(model_dir)
    return evaluate(loaded.model, encode_for_model_dir(loaded, data, "evaluation"))


def encode_for_model_dir(loaded: Any, data: Any, purpose: str) -> TensorData:
    """A labelled file / directory / DataFrame encoded by a loaded model directory's encoders (warnings for
    unseen categories and constant labels name the source and ``purpose``)."""
    encoder, config = loaded.encoder, loaded.require_experiment()
    table, source = read_table(data, config)
    encoded = encode_table(encoder, table, config, source)
    encoder.warn_unseen(encoder.unseen_counts(encoded.sparse.numpy()), len(encoded), source)
    warn_constant_labels(encoded, config, source, purpose)
    return encoded


def predict_model_dir(
    model_dir: str | Path,
    data: Any,
    output: str | Path | None = None,
    batch_rows: int = 65_536,
    progress: bool = True,
) -> pa.Table | Path:
    """Scores per task for every row of ``data`` (labels not needed): a Table, or written to ``output``
    (Parquet; returns its path) if given.

    The output holds the input's columns (as read) and one ``score_<task>`` column per task: probabilities for
    binary tasks, predictions for regression tasks. Files are scored in record batches of ``batch_rows``.
    """
    loaded = open_model_dir(model_dir)
    model, encoder, config = loaded.model, loaded.encoder, loaded.require_experiment()
    names = [f"score_{t.name}" for t in config.tasks]
    writer = None
    parts = []
    if isinstance(data, (str, Path)) and not config.data.format.startswith("movielens"):
        dataset = open_dataset(data, config.data, config)
        missing = [c for c in encoder.input_columns if c not in dataset.schema.names]
        if missing:
            check_columns(dataset.schema.names, config, str(data))
        batches = dataset.to_batches(batch_size=batch_rows)
        total = dataset.count_rows()
        source = str(data)
    else:
        if isinstance(data, (str, Path)):
            table = read_movielens(data, config.data.format.split("-")[1])
        else:
            table = as_table(data)
        batches, total, source = table.to_batches(max_chunksize=batch_rows), table.num_rows, "dataframe"
    bar = tqdm(total=total, disable=not progress, desc="predict", unit="row", leave=False)
    rows, unseen = 0, np.zeros(len(encoder.features.categorical), dtype=np.int64)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        dense, sparse = encoder.transform(batch, source)
        encoder.check_finite(dense, batch, source, first_row=rows)
        rows, unseen = rows + batch.num_rows, unseen + encoder.unseen_counts(sparse)
        empty = torch.full((batch.num_rows, len(names)), math.nan)
        logits, _ = predict_batches(model, TensorData(torch.from_numpy(dense), torch.from_numpy(sparse), empty))
        scores = model.scores(logits).numpy()
        out = pa.Table.from_batches([batch])
        for k, name in enumerate(names):
            out = out.append_column(name, pa.array(scores[:, k].astype(np.float32)))
        if output is not None:
            if writer is None:
                Path(output).parent.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(str(output), out.schema)
            writer.write_table(out)
        else:
            parts.append(out)
        bar.update(batch.num_rows)
    bar.close()
    encoder.warn_unseen(unseen, rows, source)
    if writer is not None:
        writer.close()
        return Path(output)
    return pa.concat_tables(parts) if parts else pa.table({})
