"""The pipeline: experiment config -> read -> split -> fit encoders -> encode -> train -> model directory.

``mtrank.fit(config, dataframe)`` from Python, ``mtrank train CONFIG`` from the shell. A model directory
holds::

    model.safetensors   weights                          (mtrank.artifacts.save_model)
    config.json         ModelConfig + the experiment config (to read new files the same way)
    encoders.json       the fitted FeatureEncoder          (mtrank.data.encoders)
    metrics.json        validation / test metrics per task, training history, rows, seconds
    report.md           the same as readable tables

In-memory training uses :class:`mtrank.train.Trainer` as is. With ``data.streaming``, batches come from
:class:`mtrank.data.streaming.EncodedStream` and :func:`train_streaming` drives the same model, loss
(:func:`mtrank.train.multitask_loss` through ``Trainer._loss``), optimizer, schedule and metrics.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from mtrank.artifacts import open_model_dir, save_model
from mtrank.config import ConfigError, TrainConfig
from mtrank.config.experiment import ExperimentConfig, experiment_from_dict, load_experiment
from mtrank.data.encoders import FeatureEncoder, as_table
from mtrank.data.movielens import read_movielens
from mtrank.data.readers import (
    check_columns,
    open_dataset,
    read_table,
    validate_table,
)
from mtrank.data.splits import check_train_labels, encode_table, load_splits
from mtrank.data.streaming import EncodedStream, stream_loader
from mtrank.data.tensors import TensorData
from mtrank.evaluate.metrics import evaluate, predict_batches
from mtrank.evaluate.report import markdown_table, write_json
from mtrank.model import MultiTaskModel
from mtrank.train.cuda_graph import clip_gradients
from mtrank.train.trainer import Trainer, TrainResult, lr_lambda, resume


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
    if progress is not None:
        config.train.progress = progress
    started = time.perf_counter()
    if config.data.streaming and dataframe is None:
        return _fit_streaming(config, output, started)
    splits = load_splits(config, dataframe)
    train_table, train_source = splits["train"]
    fit_table = train_table.slice(0, config.data.fit_rows) if config.data.fit_rows else train_table
    encoder = FeatureEncoder(config.features).fit(fit_table, train_source)
    data = {role: encode_table(encoder, table, config, source) for role, (table, source) in splits.items()}
    check_train_labels(data["train"], config, train_source)
    model = MultiTaskModel(
        config.model_config(encoder.num_dense, encoder.vocab_sizes, encoder.bag_lengths, encoder.bag_pooling),
        seed=config.train.seed,
    )
    train_result = Trainer(model, config.train).fit(data["train"], data.get("valid"))
    metrics = {role: evaluate(model, data[role]) for role in ("valid", "test") if role in data}
    rows = {role: len(d) for role, d in data.items()}
    return _finish(config, model, encoder, metrics, train_result, rows, output, started)


def _finish(config, model, encoder, metrics, train_result, rows, output, started) -> FitResult:
    model_dir = None
    if output is not None:
        model_dir = Path(output or config.output)
        save_model(model, model_dir, {"experiment": config.to_dict(), "encoders": "encoders.json"}, config.plugins)
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
        (model_dir / "report.md").write_text(report_markdown(config, encoder, metrics, rows, train_result))
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


# ------------------------------------------------------------------------------------------------ streaming


def _fit_streaming(config: ExperimentConfig, output, started: float) -> FitResult:
    spec = config.data
    if not spec.train:
        raise ConfigError("data.train: required for streaming (a Parquet / CSV file or a directory of shards)")
    fit_rows = spec.fit_rows or 1_000_000
    fit_table, source = read_table(spec.train, config, max_rows=fit_rows)
    encoder = FeatureEncoder(config.features).fit(fit_table, f"{source} (first {fit_table.num_rows:,} rows)")
    del fit_table
    data = {}
    for role in ("valid", "test"):
        if getattr(spec, role):
            table, role_source = read_table(getattr(spec, role), config)
            validate_table(table, config, role_source)
            data[role] = encode_table(encoder, table, config, role_source)
    model = MultiTaskModel(
        config.model_config(encoder.num_dense, encoder.vocab_sizes, encoder.bag_lengths, encoder.bag_pooling),
        seed=config.train.seed,
    )
    stream = EncodedStream(spec.train, config, encoder, config.train.batch_size, seed=config.train.seed)
    train_rows = stream.count_rows()
    train_result = train_streaming(model, config.train, stream, data.get("valid"), spec.workers, train_rows)
    metrics = {role: evaluate(model, d) for role, d in data.items()}
    rows = {"train": train_rows, **{role: len(d) for role, d in data.items()}}
    return _finish(config, model, encoder, metrics, train_result, rows, output, started)


def train_streaming(
    model: MultiTaskModel,
    cfg: TrainConfig,
    stream,
    valid: TensorData | None = None,
    workers: int = 1,
    rows: int | None = None,
) -> TrainResult:
    """Train ``model`` on batches streamed by ``stream`` (an :class:`~mtrank.data.streaming.EncodedStream`).

    The same optimizer, schedule, loss and metrics as :class:`mtrank.train.Trainer`; validation every
    ``eval_every`` steps (or once per epoch), the best-on-validation weights restored at the end, early
    stopping with ``early_stopping_patience``. Steps: ``cfg.steps`` if > 0, else ``cfg.epochs`` passes over
    the files.

    With ``cfg.checkpoint_dir`` set, a checkpoint is written at every evaluation (or every
    ``checkpoint_every`` steps), holding, besides the Trainer's state, the stream position (epoch and
    batches consumed in it). A rerun resumes there: it replays that epoch's stream, which is deterministic
    for a given seed, epoch and number of reader processes, skipping the batches already trained on, so it
    ends with the weights of an uninterrupted run. (Skipped batches are read and encoded again; with a
    different ``workers`` the batch order differs from the interrupted run's and a warning says so.)
    """
    trainer = Trainer(model, cfg)  # device, optimizer, bf16, task weights and the loss, as in-memory training
    rows = rows if rows is not None else stream.count_rows()
    steps_per_epoch = max(1, math.ceil(rows / cfg.batch_size))
    total_steps = cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch
    eval_every = cfg.eval_every or steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lr_lambda(cfg, total_steps))
    result = TrainResult()
    torch.manual_seed(cfg.seed)
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    run = resume(ckpt_dir, model, trainer.optimizer, scheduler, result)
    epoch, skip = run.extra.get("epoch", 0), run.extra.get("batch", 0)
    if run.step and run.extra.get("workers", workers) != workers:
        warnings.warn(
            f"resuming a streaming run with {workers} reader processes; the checkpoint was written with "
            f"{run.extra['workers']}: the rest of the epoch is read in a different batch order",
            stacklevel=2,
        )
    resumed_samples = run.samples
    running, running_steps = 0.0, 0
    model.train()
    bar = tqdm(
        total=total_steps, initial=run.step, disable=not cfg.progress, desc="train (stream)", unit="step", leave=False
    )
    start = time.perf_counter()
    while run.step < total_steps and not run.stopped:
        stream.set_epoch(epoch)
        batch_in_epoch = 0
        for batch in stream_loader(stream, workers):
            batch_in_epoch += 1
            if batch_in_epoch <= skip:  # trained on before the interruption
                continue
            batch = batch.to(trainer.device)
            loss = trainer._loss(batch)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                clip_gradients(trainer.optimizer, cfg.grad_clip)
            trainer.optimizer.step()
            scheduler.step()
            run.step += 1
            run.samples += len(batch)
            running += float(loss.detach())
            running_steps += 1
            bar.update(1)
            if run.step % eval_every == 0 or run.step == total_steps:
                train_loss = running / max(running_steps, 1)
                running, running_steps = 0.0, 0
                run.extra = {"epoch": epoch, "batch": batch_in_epoch, "workers": workers}  # the stream position
                trainer.evaluate_and_checkpoint(run, result, valid, train_loss, steps_per_epoch, total_steps, ckpt_dir)
            if run.step >= total_steps or run.stopped:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    result.steps = run.step
    result.samples = run.samples - resumed_samples
    result.seconds = time.perf_counter() - start
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    return result


# ------------------------------------------------------------------------------------------------ model dirs


def evaluate_model_dir(model_dir: str | Path, data: Any) -> dict[str, float]:
    """Metrics per task of a saved model on a labelled file / directory / DataFrame."""
    loaded = open_model_dir(model_dir)
    model, encoder, config = loaded.model, loaded.encoder, loaded.require_experiment()
    table, source = read_table(data, config)
    return evaluate(model, encode_table(encoder, table, config, source))


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
    for batch in batches:
        if batch.num_rows == 0:
            continue
        dense, sparse = encoder.transform(batch, source)
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
    if writer is not None:
        writer.close()
        return Path(output)
    return pa.concat_tables(parts) if parts else pa.table({})
