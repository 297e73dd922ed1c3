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
from mtrank.data.encoders import FeatureEncoder, LabelTransforms, as_table
from mtrank.data.movielens import read_movielens
from mtrank.data.readers import check_columns, encode_labels, open_dataset, read_table
from mtrank.data.splits import (
    check_train_labels,
    encode_table,
    load_splits,
    warn_constant_labels,
    warn_label_leaks,
)
from mtrank.data.streaming import EncodedStream
from mtrank.data.tensors import TensorData
from mtrank.evaluate.baseline import baseline_differences, fit_baseline
from mtrank.evaluate.conflict import report_section as conflict_report_section
from mtrank.evaluate.metrics import evaluate, predict_batches, task_metrics
from mtrank.evaluate.report import markdown_table, write_json
from mtrank.model import MultiTaskModel
from mtrank.train.callbacks import default_callbacks
from mtrank.train.distributed import rank_and_world
from mtrank.train.grouping import resolve_mixer_groups
from mtrank.train.memory_plan import check_training_fits
from mtrank.train.sources import StreamSource
from mtrank.train.step import resolve_device
from mtrank.train.trainer import Trainer, TrainResult


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model, its encoder, metrics per split (regression metrics on the
    labels' own scale) and the model directory; ``baseline``: the gradient-boosting baseline
    (:func:`mtrank.evaluate.baseline.fit_baseline`) when it was trained; ``shift``: per split, the share of rows
    per column outside what the training split held (:meth:`FeatureEncoder.shift`); ``hashing``: per hashed
    feature, its buckets, distinct training values and collision rate (:meth:`FeatureEncoder.hashing`);
    ``step``: the training step's path and why (``eager``, ``cuda_graph``)."""

    model: MultiTaskModel
    encoder: FeatureEncoder
    metrics: dict[str, dict[str, float]]
    train_result: TrainResult
    model_dir: Path | None
    rows: dict[str, int] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    shift: dict[str, dict] = field(default_factory=dict)
    hashing: dict[str, dict] = field(default_factory=dict)
    step: str = ""


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
    baseline: bool | None = None,
) -> FitResult:
    """Train a model from an experiment config (object, dict or YAML path), on ``dataframe`` if given.

    ``output``: the model directory (default: the config's ``output``; None = write nothing). ``baseline``:
    train the gradient-boosting baseline (default: ``baseline.enabled`` when a model directory is written).

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
    warn_label_leaks(config)
    streaming = config.data.streaming and dataframe is None
    splits = load_splits(config, dataframe, include_train=not streaming)
    return fit_splits(config, splits, output, progress, baseline)


def fit_splits(
    config: ExperimentConfig,
    splits: dict[str, tuple[pa.Table, str]],
    output: str | Path | None = "",
    progress: bool | None = None,
    baseline: bool | None = None,
    roles: tuple[str, ...] = ("valid", "test"),
    callbacks: list | None = None,
) -> FitResult:
    """:func:`fit` on splits already read (:func:`~mtrank.data.splits.load_splits`; no ``"train"`` when
    streaming): what ``mtrank tune`` calls once per trial with ``roles=("valid",)``, so a trial neither encodes
    nor scores the test split. ``callbacks`` join the training loop's."""
    train_config = config.train
    if progress is not None:
        train_config = dataclasses.replace(train_config, progress=progress)
    model_dir = None if output is None else Path(output or config.output)
    if model_dir is not None and not train_config.log_dir:  # history.jsonl beside the model, written live
        train_config = dataclasses.replace(train_config, log_dir=str(model_dir))
    started = time.perf_counter()
    streaming = "train" not in splits
    if streaming:
        fit_table, fit_source = read_table(config.data.train, config, max_rows=config.data.fit_rows or 1_000_000)
        fit_source = f"{fit_source} (first {fit_table.num_rows:,} rows)"
    else:
        train_table, fit_source = splits["train"]
        fit_table = train_table.slice(0, config.data.fit_rows) if config.data.fit_rows else train_table
    fit_labels = encode_labels(fit_table, config.tasks, fit_source)
    labels = LabelTransforms(config.tasks).fit(fit_labels)
    encoder = FeatureEncoder(config.features).fit(fit_table, fit_source, labels=labels.transform(fit_labels))
    roles = tuple(role for role in roles if role in splits)
    encoded = ("train",) if not streaming else ()
    data = {role: encode_table(encoder, splits[role][0], config, splits[role][1]) for role in (*encoded, *roles)}
    for role in ("train", "valid"):
        if role in data:
            warn_constant_labels(data[role], config, splits[role][1], role)
    shift = {role: _shift(encoder, *splits[role], data[role]) for role in roles}
    model_config = config.model_config(
        encoder.num_dense,
        encoder.vocab_sizes,
        encoder.bag_inputs,
        encoder.numeric_inputs,
        labels.task_stats(),
        encoder.sequence_inputs,
    )
    if model_config.mixer.layers and model_config.mixer.groups == "auto":  # learned groups, fixed before the build
        warmup = data["train"] if not streaming else encode_table(encoder, fit_table, config, fit_source)
        model_config = resolve_mixer_groups(
            model_config, on_model_scale(warmup, labels), train_config, config.train.seed
        )
    device = resolve_device(train_config.device)
    if streaming:  # the first epoch's readers start now, forked, and read while the model is built
        stream = EncodedStream(
            config.data.train, config, encoder, train_config.batch_size, seed=train_config.seed, labels=labels
        )
        train: Any = StreamSource(stream, config.data.workers, device)
        train.start()
        rows = {"train": train.rows}
    try:
        check_training_fits(model_config, train_config, device)  # before any allocation
        model = MultiTaskModel(model_config, seed=config.train.seed)
        if callbacks:  # beside the progress bar and history the config asks for
            callbacks = default_callbacks(train_config) + list(callbacks)
        trainer = Trainer(model, train_config, callbacks=callbacks or None)
    except BaseException:
        if streaming:  # refused by the memory planner, or the model failed to build: the readers stop now
            train.close()
        raise
    if not streaming:
        check_train_labels(data["train"], config, fit_source)
        train = on_model_scale(data["train"], labels)
        rows = {"train": len(train)}
    valid = data.get("valid")
    train_result = trainer.fit(train, None if valid is None else on_model_scale(valid, labels))
    metrics = {role: evaluate_on_label_scale(model, data[role]) for role in roles}
    rows.update({role: len(data[role]) for role in roles})
    if baseline is None:
        baseline = config.baseline.enabled and model_dir is not None
    baseline_result = None
    if baseline:
        if streaming:
            fit_data = encode_table(encoder, fit_table, config, fit_source)
            train, note = on_model_scale(fit_data, labels), f"trained on the first {len(fit_data):,} training rows"
        else:
            note = ""
        evaluated = {role: data[role] for role in roles}
        seed = config.train.seed
        baseline_result = fit_baseline(config.baseline, config.tasks, encoder, labels, train, evaluated, seed, note)
        baseline_result["difference"] = baseline_differences(metrics, baseline_result)
    step = f"{trainer.step_path} ({trainer.step_path_reason})"
    result = FitResult(
        model, encoder, metrics, train_result, model_dir, rows, baseline_result, shift, encoder.hashing(), step
    )
    if model_dir is not None and rank_and_world()[0] == 0:  # data-parallel: one writer
        _write_model_dir(config, result, started)
    return result


def on_model_scale(data: TensorData, labels: LabelTransforms) -> TensorData:
    """``data`` with its labels on the scale the model learns (:class:`LabelTransforms`; the same object when
    no task transforms its labels)."""
    if not labels.active:
        return data
    scaled = torch.from_numpy(labels.transform(data.labels.numpy()))
    return dataclasses.replace(data, labels=scaled)


def evaluate_on_label_scale(model: MultiTaskModel, data: TensorData) -> dict[str, float]:
    """Per-task metrics of ``model`` on ``data`` with its labels as read: a regression task's predictions are
    mapped back from the model's scale (its ``label_transform``) first, as :meth:`MultiTaskModel.scores` maps
    them for predict, export and the service."""
    if not model.label_transformed:
        return evaluate(model, data)
    logits, _ = predict_batches(model, data)
    values = torch.where(model.binary_mask.cpu(), logits, model.scores(logits.to(model.device)).cpu())
    weights = None if data.weights is None else data.weights.cpu()
    return task_metrics(model.tasks, values, data.labels.cpu(), weights)


def _shift(encoder: FeatureEncoder, table: pa.Table, source: str, data: TensorData) -> dict:
    """The shift of one split against the training split (:meth:`FeatureEncoder.shift`), for the report (warnings
    are for ``evaluate`` and ``predict``, on files the training never saw)."""
    counts = encoder.shift_counts(table, data.sparse.numpy(), source)
    return {"rows": counts.rows, **encoder.shift(counts)}


def _write_model_dir(config: ExperimentConfig, result: FitResult, started: float) -> None:
    model_dir, train_result = result.model_dir, result.train_result
    extra = {"experiment": config.to_dict(), "encoders": "encoders.json"}
    save_model(result.model, model_dir, extra, config.plugins, seal=False)
    result.encoder.save(model_dir)
    summary = {
        "metrics": result.metrics,
        "baseline": result.baseline,
        "shift": result.shift,
        "rows": result.rows,
        "best_step": train_result.best_step,
        "steps": train_result.steps,
        "train_seconds": train_result.seconds,
        "samples_per_second": train_result.samples_per_second,
        "step": result.step,
        "hashing": result.hashing,
        "total_seconds": time.perf_counter() - started,
        "history": train_result.history,
    }
    write_json(model_dir / "metrics.json", summary)
    report = report_markdown(config, result)
    conflict = conflict_report_section(train_result.history, model_dir)  # "" without conflict measurements
    (model_dir / "report.md").write_text(report + (f"\n{conflict}" if conflict else ""))
    seal_model_dir(model_dir)  # last: the manifest names every file above with its SHA-256


def report_markdown(config: ExperimentConfig, result: FitResult) -> str:
    """Tables: metrics per task and split; the gradient-boosting baseline and the network's difference; the
    columns unlike the training split; data and model summary."""
    encoder, train_result = result.encoder, result.train_result
    lines = [f"# {config.name or 'mtrank model'}", ""]
    lines.append(
        f"Rows: {', '.join(f'{k} {v:,}' for k, v in result.rows.items())}. Inputs: {encoder.num_dense} dense "
        f"columns, {len(encoder.vocab_sizes)} categorical (vocabularies {encoder.vocab_sizes}). "
        f"Block `{config.model.block.type}`; {train_result.steps} steps, best at "
        f"{train_result.best_step}, {train_result.seconds:.1f} s."
    )
    if result.hashing:
        lines.append(f"Hashed features: {hashing_summary(result.hashing)}.")
    transformed = [f"`{t.name}` ({t.label_transform})" for t in config.tasks if t.label_transform != "none"]
    if transformed:
        lines.append(
            f"Regression labels learned on a transformed scale: {', '.join(transformed)}; metrics on the labels' "
            "own scale."
        )
    lines += ["", metrics_table(result.metrics)]
    if result.baseline is not None:
        lines += ["", baseline_section(result.metrics, result.baseline)]
    if result.shift:
        lines += ["", shift_section(result.shift)]
    return "\n".join(lines) + "\n"


def hashing_summary(hashing: dict[str, dict]) -> str:
    """``user: 1,000 buckets, 812 distinct training values, 33.1% share their id with another``, per feature."""
    return "; ".join(
        f"{name}: {h['buckets']:,} buckets, {h['distinct']:,} distinct training values, "
        f"{100 * h['collision_rate']:.1f}% share their id with another"
        for name, h in hashing.items()
    )


def baseline_section(metrics: dict, baseline: dict) -> str:
    """The baseline's table: per split and task, the network's and the baseline's AUC (binary) or R²
    (regression) and their difference."""
    rows = []
    for role, values in baseline["metrics"].items():
        for key in values:
            metric, _, task = key.partition("/")
            if metric in ("auc", "r2") and key in metrics.get(role, {}):
                net, gbdt = float(metrics[role][key]), float(values[key])
                rows.append([role, task, {"auc": "AUC", "r2": "R²"}[metric], net, gbdt, f"{net - gbdt:+.4f}"])
    rounds = ", ".join(f"{task} {n}" for task, n in baseline["rounds"].items())
    note = [f"{baseline['library']}, one model per task ({rounds} rounds, early-stopped on valid)"]
    if baseline.get("note"):
        note.append(baseline["note"])
    if baseline.get("left_out"):
        note.append(f"features left out: {', '.join(baseline['left_out'])}")
    head = "## Gradient-boosting baseline\n\n" + "; ".join(note) + f"; {baseline['seconds']:.1f} s.\n\n"
    return head + markdown_table(["split", "task", "metric", "mtrank", "GBDT", "mtrank - GBDT"], rows)


def shift_section(shift: dict) -> str:
    """Per split, the columns with rows outside the training range or with values unseen in training."""
    rows = []
    for role, values in shift.items():
        for column, share in values["numeric_out_of_range"].items():
            if share > 0:
                rows.append([role, column, "outside the training range", f"{share:.2%}", ""])
        for column, share in values["categorical_unseen"].items():
            if share > 0:
                trained = values["categorical_unseen_training"][column]
                rows.append([role, column, "unseen in training", f"{share:.2%}", f"{trained:.2%}"])
    if not rows:
        return "## Shift\n\nNo split has numeric values outside the training range or unseen categorical values."
    header = ["split", "column", "rows", "share", "training split's share (OOV)"]
    return "## Shift against the training split\n\n" + markdown_table(header, rows)


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
    return evaluate_on_label_scale(loaded.model, encode_for_model_dir(loaded, data, "evaluation"))


def encode_for_model_dir(loaded: Any, data: Any, purpose: str) -> TensorData:
    """A labelled file / directory / DataFrame encoded by a loaded model directory's encoders (warnings for
    unseen categories and constant labels name the source and ``purpose``)."""
    encoder, config = loaded.encoder, loaded.require_experiment()
    table, source = read_table(data, config)
    encoded = encode_table(encoder, table, config, source)
    encoder.warn_shift(encoder.shift_counts(table, encoded.sparse.numpy(), source), source)
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
    rows, shift = 0, None
    for batch in batches:
        if batch.num_rows == 0:
            continue
        dense, sparse = encoder.transform(batch, source)
        encoder.check_finite(dense, batch, source, first_row=rows)
        counts = encoder.shift_counts(batch, sparse, source)
        rows, shift = rows + batch.num_rows, counts if shift is None else shift + counts
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
    if shift is not None:
        encoder.warn_shift(shift, source)
    if writer is not None:
        writer.close()
        return Path(output)
    return pa.concat_tables(parts) if parts else pa.table({})
