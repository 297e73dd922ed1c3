"""Hyper-parameter search on the validation split: ``mtrank tune CONFIG --trials N`` (optuna).

Three layers, each usable alone:

* :func:`search`: the engine. A search space of :class:`~mtrank.config.experiment.SearchParam` by name, a
  function ``evaluate(params, report) -> value`` that trains and scores one setting on validation rows (and may
  call ``report(value, step)`` on intermediate values, which prunes a trial below the median of earlier trials
  at that step), and a study in an optuna storage: SQLite by default, so an interrupted search resumes where
  it stopped and several processes may share one study. Nothing here knows about models; the census audit's
  searches (:mod:`mtrank.experiments.census_audit`) are of this shape.
* :func:`tune_model`: the network of an experiment config (``tune.space`` holds dotted config keys:
  ``train.lr``, ``model.block.num_experts``, ``tasks.<name>.weight``, ``features.numeric.<name>.embedding.bins``
  ...). Each trial trains with :func:`mtrank.pipeline.fit_splits` on the split read once and is scored by the
  objective on the validation split only; the test split is neither encoded nor scored during the search.
* :func:`tune_baseline`: the gradient-boosting baseline of the report, one search per task with the same
  trial budget (``tune.baseline_space``, or :data:`BASELINE_SPACES`).

After the search, the best setting is written out as a config (``best.yaml``), the trials as a table
(``trials.csv``, ``trials.md``), and the chosen setting is trained once more and scored on the test split, once:
``result.json`` lists every test evaluation the study has made (one per chosen setting).

Files (``TUNE_DIR``: ``<output>/tune`` by default)::

    study.db      the optuna study (SQLite; another storage with --storage)
    trials.csv    every trial: number, state, value, parameters, validation metrics, seconds
    trials.md     the same, best first
    best.yaml     the config with the best trial's values (the baseline's: under baseline.task_params)
    result.json   the best trial, its validation metrics, and the test metrics of each chosen setting
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from mtrank.config import ConfigError
from mtrank.config.experiment import ExperimentConfig, SearchParam, experiment_from_dict
from mtrank.data.encoders import FeatureEncoder, LabelTransforms
from mtrank.data.readers import encode_labels
from mtrank.data.splits import encode_table, load_splits
from mtrank.evaluate.baseline import fit_baseline
from mtrank.evaluate.metrics import higher_is_better
from mtrank.evaluate.report import markdown_table, write_json
from mtrank.pipeline import fit_splits, on_model_scale
from mtrank.train.callbacks import Callback

RESULT_FILE = "result.json"
PRIMARY = {"binary": "auc", "regression": "r2"}  # each task's metric in the default objective
BASELINE_SPACES: dict[str, dict[str, dict]] = {  # the baseline's default search, per library
    "sklearn": {
        "learning_rate": {"low": 0.01, "high": 0.3, "log": True},
        "max_leaf_nodes": {"low": 7, "high": 255, "log": True},
        "min_samples_leaf": {"low": 5, "high": 200, "log": True},
        "l2_regularization": {"low": 1e-4, "high": 10.0, "log": True},
        "max_features": {"low": 0.5, "high": 1.0},
    },
    "lightgbm": {
        "learning_rate": {"low": 0.01, "high": 0.3, "log": True},
        "num_leaves": {"low": 7, "high": 255, "log": True},
        "min_child_samples": {"low": 5, "high": 200, "log": True},
        "reg_lambda": {"low": 1e-4, "high": 10.0, "log": True},
        "colsample_bytree": {"low": 0.5, "high": 1.0},
    },
    "xgboost": {
        "learning_rate": {"low": 0.01, "high": 0.3, "log": True},
        "max_depth": {"low": 3, "high": 10},
        "min_child_weight": {"low": 1.0, "high": 100.0, "log": True},
        "reg_lambda": {"low": 1e-4, "high": 10.0, "log": True},
        "colsample_bytree": {"low": 0.5, "high": 1.0},
    },
}


class TuneError(ValueError):
    """A search cannot run as asked (bad objective, storage, parameter path); the message says what to fix."""


# ---------------------------------------------------------------------------------------------- objective


@dataclass
class Objective:
    """A weighted sum of validation metrics (``{"auc/click": 1.0}``), maximised or minimised.

    Example:
        >>> Objective({"auc/a": 1.0, "auc/b": 1.0}, "maximize").value({"auc/a": 0.8, "auc/b": 0.6, "loss": 0.3})
        1.4
    """

    weights: dict[str, float]
    direction: str

    def value(self, metrics: dict[str, float]) -> float:
        """The objective of one split's metrics (NaN when a metric is missing or NaN)."""
        total = 0.0
        for key, weight in self.weights.items():
            total += weight * float(metrics.get(key, math.nan))
        return total

    def describe(self) -> str:
        terms = " + ".join(key if weight == 1 else f"{weight:g} * {key}" for key, weight in self.weights.items())
        return f"{self.direction} {terms} (validation)"


def make_objective(objective: str | dict[str, float], config: ExperimentConfig) -> Objective:
    """The objective of ``tune.objective`` (or ``--objective``): one metric, a weighted sum (all maximised or all
    minimised), or empty: the mean over the tasks of AUC (binary) and R² (regression)."""
    tasks = {t.name: t.type for t in config.tasks}
    if not objective:
        weights = {f"{PRIMARY[kind]}/{name}": 1.0 / len(tasks) for name, kind in tasks.items()}
    elif isinstance(objective, str):
        weights = {objective: 1.0}
    else:
        weights = {str(k): float(v) for k, v in objective.items()}
    for key in weights:
        metric, _, task = key.partition("/")
        known = {"binary": ("auc", "logloss"), "regression": ("mse", "r2")}
        if key != "loss" and (task not in tasks or metric not in known[tasks[task]]):
            choices = ["loss"] + [f"{m}/{n}" for n, kind in tasks.items() for m in known[kind]]
            raise TuneError(f"tune.objective: {key!r} is not a validation metric of the tasks; choose from {choices}")
    directions = {higher_is_better(key) for key in weights}
    if len(directions) > 1:
        raise TuneError(
            f"tune.objective: {sorted(weights)} mixes metrics to maximise (AUC, R²) and to minimise (log loss, MSE, "
            "loss); weight metrics of one kind"
        )
    return Objective(weights, "maximize" if directions.pop() else "minimize")


# ---------------------------------------------------------------------------------------------- the engine


def _optuna():
    try:
        import optuna
    except ImportError:
        raise TuneError("mtrank tune needs optuna: pip install 'mtrank[tune]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def suggest(trial: Any, name: str, param: SearchParam) -> Any:
    """A value for ``name`` from an optuna trial. Choices that are not numbers, strings or booleans (lists of
    layer widths) are drawn by their JSON text and decoded."""
    if param.type == "categorical":
        plain = all(isinstance(c, (int, float, str, bool)) or c is None for c in param.choices)
        if plain:
            return trial.suggest_categorical(name, list(param.choices))
        return json.loads(trial.suggest_categorical(name, [json.dumps(c) for c in param.choices]))
    if param.type == "int":
        step = int(param.step) if param.step is not None else 1
        return trial.suggest_int(name, int(param.low), int(param.high), step=step, log=param.log)
    return trial.suggest_float(name, float(param.low), float(param.high), step=param.step, log=param.log)


def open_study(storage: str, name: str, direction: str, seed: int, startup_trials: int, pruning: bool):
    """The optuna study ``name`` in ``storage`` (created, or loaded to resume): TPE seeded with ``seed``,
    random until ``startup_trials`` trials; with ``pruning``, the median pruner after as many."""
    optuna = _optuna()
    if storage.startswith(("sqlite:", "postgresql", "mysql")):
        if storage.startswith("sqlite:///"):
            Path(storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        # a trial whose process died stops being RUNNING after the grace period (another process may go on)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(storage, heartbeat_interval=30, grace_period=120)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(startup_trials, 1))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=startup_trials) if pruning else optuna.pruners.NopPruner()
    try:
        return optuna.create_study(
            storage=storage, study_name=name, direction=direction, sampler=sampler, pruner=pruner, load_if_exists=True
        )
    except ValueError as err:  # e.g. an existing study of the other direction
        raise TuneError(f"study {name!r} in {storage}: {err}") from None


def finished_trials(study: Any) -> list:
    """Trials that count against the budget: complete, pruned, or failed by a setting that cannot train (not
    those a killed process left running)."""
    state = _optuna().trial.TrialState
    return [
        t
        for t in study.trials
        if t.state in (state.COMPLETE, state.PRUNED) or (t.state == state.FAIL and "error" in t.user_attrs)
    ]


def search(
    space: dict[str, SearchParam],
    evaluate: Callable[[dict[str, Any], Callable[[float, int], None]], tuple[float, dict]],
    trials: int,
    storage: str,
    study_name: str,
    direction: str,
    seed: int = 0,
    startup_trials: int = 5,
    pruning: bool = True,
    progress: bool = False,
) -> Any:
    """Run trials of ``evaluate`` until the study holds ``trials`` finished ones; returns the optuna study.

    ``evaluate(params, report) -> (value, attributes)`` trains and scores one setting on validation rows;
    ``report(value, step)`` records an intermediate value and stops the trial (optuna's ``TrialPruned``) when
    the pruner says so; ``attributes`` (JSON-ready: validation metrics, seconds, ...) are kept with the trial.
    A setting that cannot be built (a :class:`~mtrank.config.ConfigError`, e.g. mixer heads that do not divide
    the embedding width) fails its trial, with the message, and counts against the budget.
    """
    optuna = _optuna()
    study = open_study(storage, study_name, direction, seed, startup_trials, pruning)

    def objective(trial: Any) -> float:
        params = {name: suggest(trial, name, param) for name, param in space.items()}

        def report(value: float, step: int) -> None:
            if math.isfinite(value):
                trial.report(value, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        started = time.perf_counter()
        try:
            value, attributes = evaluate(params, report)
        except ConfigError as err:
            trial.set_user_attr("error", str(err))
            return math.nan  # optuna records the trial as failed
        for key, item in {**attributes, "seconds": time.perf_counter() - started}.items():
            trial.set_user_attr(key, item)
        if not math.isfinite(value):
            trial.set_user_attr("error", f"the objective is {value} (a metric missing or NaN: one class in valid?)")
            return math.nan
        return value

    remaining = trials - len(finished_trials(study))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, show_progress_bar=progress)
    return study


def trials_table(study: Any, space: dict[str, SearchParam], objective: str = "value") -> list[dict[str, Any]]:
    """One row per trial, best first (finished trials by their value, then the rest by number)."""
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    rows = []
    for t in study.trials:
        row = {"trial": t.number, "state": t.state.name.lower(), objective: t.value}
        row.update({name: t.params.get(name) for name in space})
        row["seconds"] = t.user_attrs.get("seconds")
        row["last_step"] = max(t.intermediate_values) if t.intermediate_values else None
        row["error"] = t.user_attrs.get("error", "")
        rows.append(row)
    return sorted(rows, key=lambda r: (r[objective] is None, sign * (r[objective] or 0.0), r["trial"]))


def write_trials(study: Any, space: dict[str, SearchParam], out: Path, title: str) -> None:
    """``trials.csv`` and ``trials.md`` of a study (``out/<prefix>trials.*``)."""
    rows = trials_table(study, space)
    if not rows:
        return
    with open(out.with_suffix(".csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = list(rows[0])
    cells = [[_cell(row[key]) for key in header] for row in rows]
    out.with_suffix(".md").write_text(f"# {title}\n\n{markdown_table(header, cells)}\n")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else round(value, 4)
    return value


# ---------------------------------------------------------------------------------------------- configs


def set_path(raw: dict, key: str, value: Any) -> None:
    """Set a dotted key of a plain experiment config (:meth:`ExperimentConfig.to_dict`): sections by name,
    ``tasks.<task name>.<field>`` and ``features.<kind>.<feature name>.<field>`` by the item's name, list items
    by index too (``tasks.0.weight``).

    Example:
        >>> raw = {"tasks": [{"name": "click"}], "train": {}}
        >>> set_path(raw, "tasks.click.weight", 0.5); set_path(raw, "train.lr", 0.01); raw
        {'tasks': [{'name': 'click', 'weight': 0.5}], 'train': {'lr': 0.01}}
    """
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            names = [item.get("name") if isinstance(item, dict) else item for item in node]
            found = [j for j, name in enumerate(names) if part in (name, str(j))]
            if not found or not isinstance(node[found[0]], dict):
                where = ".".join(parts[:i])
                raise TuneError(f"tune.space.{key}: {where} has no item {part!r} (items: {names}; a name or an index)")
            node = node[found[0]]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise TuneError(f"tune.space.{key}: {'.'.join(parts[:i])} holds {node!r}, not a section")
    if not isinstance(node, dict):
        raise TuneError(f"tune.space.{key}: {'.'.join(parts[:-1])} is not a section; name an item of it")
    node[parts[-1]] = value


def with_params(config: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """``config`` with the dotted keys of ``params`` set, built and checked by the one config builder."""
    raw = config.to_dict()
    for key, value in params.items():
        set_path(raw, key, value)
    return experiment_from_dict(raw, source=config.source)


def check_space(config: ExperimentConfig) -> None:
    """Every key of ``tune.space`` sets something the config builder accepts (tried with each range's low end)."""
    if not config.tune.space:
        raise TuneError(
            f"{config.source or 'config'}: tune.space is empty; declare what to search, e.g. "
            "tune: {space: {train.lr: {low: 1e-4, high: 1e-2, log: true}}}"
        )
    for key, param in config.tune.space.items():
        sample = param.choices[0] if param.type == "categorical" else param.low
        try:
            with_params(config, {key: sample})
        except ConfigError as err:
            raise TuneError(f"tune.space.{key}: {sample!r} does not build a config: {err}") from None


# ---------------------------------------------------------------------------------------------- the network


class _PruningReport(Callback):
    """Reports the objective of each evaluation's validation metrics (``valid/<metric>``) to the search."""

    def __init__(self, objective: Objective, report: Callable[[float, int], None]) -> None:
        self.objective, self.report = objective, report

    def on_evaluate(self, step: int, records: list[dict | None]) -> None:
        record = records[0]
        if record is not None and any(key.startswith("valid/") for key in record):
            metrics = {key[len("valid/") :]: value for key, value in record.items() if key.startswith("valid/")}
            self.report(self.objective.value(metrics), step)


@dataclass
class TuneSettings:
    """Where and how a search runs (the command line's choices over the config's ``tune`` section)."""

    trials: int
    storage: str
    study: str
    out: Path
    objective: Objective
    progress: bool = False
    final: bool = True  # train the chosen setting once more and score it on test
    model_dir: Path | None = None


def settings_for(
    config: ExperimentConfig,
    trials: int | None = None,
    storage: str = "",
    study: str = "",
    objective: str | dict | None = None,
    out: str | Path | None = None,
    model_dir: str | Path | None = None,
    progress: bool = False,
    final: bool = True,
    suffix: str = "",
) -> TuneSettings:
    """The settings of a search: arguments over the config's ``tune`` section over the defaults (study
    ``<name>``, storage ``sqlite:///<output>.tune/study.db``). The study's folder sits beside the model
    directory, not in it: a model directory is sealed with exactly the model's files."""
    spec = config.tune
    model_dir = Path(model_dir or config.output)
    out = Path(out) if out else model_dir.with_name(f"{model_dir.name}.tune")
    name = study or spec.study or config.name or Path(config.source or "mtrank").stem
    storage = storage or spec.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    return TuneSettings(
        trials=trials or spec.trials,
        storage=storage,
        study=f"{name}{suffix}",
        out=out,
        objective=make_objective(spec.objective if objective is None else objective, config),
        progress=progress,
        final=final,
        model_dir=model_dir,
    )


def tune_model(config: ExperimentConfig, settings: TuneSettings, splits: dict | None = None) -> dict[str, Any]:
    """Search ``config.tune.space`` for the network; write the trials, ``best.yaml`` and ``result.json``; train the
    best setting once more into ``settings.model_dir`` and score it on test (once per chosen setting).

    ``splits`` (:func:`~mtrank.data.splits.load_splits`' output) are read from the config's files when not
    given. Returns ``result.json``'s content."""
    check_space(config)
    space = config.tune.space
    spec = config.tune
    if splits is None:
        splits = load_splits(config)
    if "valid" not in splits:
        raise TuneError(f"{config.source or 'config'}: the search scores the validation split; the data has none")
    objective = settings.objective

    def evaluate(params: dict[str, Any], report: Callable[[float, int], None]) -> tuple[float, dict]:
        trial_config = with_params(config, params)
        trial_config.check_monitor()
        callbacks = [_PruningReport(objective, report)] if spec.pruning else []
        result = fit_splits(trial_config, splits, None, False, False, ("valid",), callbacks)
        valid = result.metrics["valid"]
        attributes = {"valid": valid, "best_step": result.train_result.best_step}
        return objective.value(valid), attributes

    settings.out.mkdir(parents=True, exist_ok=True)
    study = search(
        space,
        evaluate,
        settings.trials,
        settings.storage,
        settings.study,
        objective.direction,
        spec.seed,
        spec.startup_trials,
        spec.pruning,
        settings.progress,
    )
    write_trials(study, space, settings.out / "trials", f"{settings.study}: {objective.describe()}")
    best = _best_trial(study, settings)
    best_config = with_params(config, best.params_values)
    _write_config(best_config, settings.out / "best.yaml")
    result = _result(settings, best, objective, {"space": list(space)})
    if settings.final:
        key = json.dumps(best.params_values, sort_keys=True)
        done = {json.dumps(e["params"], sort_keys=True): e for e in result["test_evaluations"]}
        if key not in done:
            fitted = fit_splits(best_config, splits, settings.model_dir, settings.progress)
            entry = {
                "trial": best.number,
                "params": best.params_values,
                "valid": fitted.metrics.get("valid"),
                "test": fitted.metrics.get("test"),
                "baseline": None if fitted.baseline is None else fitted.baseline["metrics"],
                "model_dir": str(settings.model_dir),
            }
            result["test_evaluations"].append(entry)
        result["test"] = (done.get(key) or result["test_evaluations"][-1])["test"]
    write_json(settings.out / RESULT_FILE, result)
    return result


@dataclass
class _Best:
    number: int
    value: float
    params_values: dict[str, Any]
    attributes: dict[str, Any]


def _best_trial(study: Any, settings: TuneSettings) -> _Best:
    complete = [t for t in study.trials if t.state.name == "COMPLETE" and t.value is not None]
    if not complete:
        errors = sorted({t.user_attrs.get("error", "") for t in study.trials} - {""})
        hint = f"; the trials failed with: {errors[0]}" if errors else ""
        raise TuneError(f"study {settings.study!r}: no trial finished with a value{hint}")
    best = study.best_trial
    params = {name: _decode(value) for name, value in best.params.items()}
    return _Best(best.number, float(best.value), params, dict(best.user_attrs))


def _decode(value: Any) -> Any:
    """A categorical choice drawn by its JSON text (:func:`suggest`) back to its value."""
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def _result(settings: TuneSettings, best: _Best, objective: Objective, extra: dict) -> dict[str, Any]:
    """``result.json``: the study, the best trial, and the test evaluations made so far (kept across reruns)."""
    path = settings.out / RESULT_FILE
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    return {
        "study": settings.study,
        "storage": settings.storage,
        "objective": objective.describe(),
        "objective_weights": objective.weights,
        "direction": objective.direction,
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params_values,
        "best_valid": best.attributes.get("valid"),
        **extra,
        "test_evaluations": earlier.get("test_evaluations", []),
    }


def _write_config(config: ExperimentConfig, path: Path) -> None:
    data = config.to_dict()
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# ---------------------------------------------------------------------------------------------- the baseline


@dataclass
class BaselineData:
    """The encoded splits the baseline trains and is scored on (encoded once for every trial)."""

    encoder: FeatureEncoder
    labels: LabelTransforms
    train: Any  # TensorData, labels on the model's scale
    splits: dict[str, Any]  # role -> TensorData, labels as read


def baseline_data(config: ExperimentConfig, splits: dict) -> BaselineData:
    """Fit the encoders and label transforms on the training split and encode the other splits, as
    :func:`~mtrank.pipeline.fit_splits` does for the network."""
    table, source = splits["train"]
    raw_labels = encode_labels(table, config.tasks, source)
    labels = LabelTransforms(config.tasks).fit(raw_labels)
    encoder = FeatureEncoder(config.features).fit(table, source, labels=labels.transform(raw_labels))
    train = on_model_scale(encode_table(encoder, table, config, source), labels)
    roles = [role for role in ("valid", "test") if role in splits]
    encoded = {role: encode_table(encoder, splits[role][0], config, splits[role][1]) for role in roles}
    return BaselineData(encoder, labels, train, encoded)


def baseline_space(config: ExperimentConfig) -> dict[str, SearchParam]:
    """``tune.baseline_space``, or the default space of the baseline's library (:data:`BASELINE_SPACES`)."""
    if config.tune.baseline_space:
        return config.tune.baseline_space
    return {
        k: SearchParam.from_dict(v, f"tune.baseline_space.{k}")
        for k, v in BASELINE_SPACES[config.baseline.library].items()
    }


def tune_baseline(config: ExperimentConfig, settings: TuneSettings, splits: dict | None = None) -> dict[str, Any]:
    """One search per task of the gradient-boosting baseline's estimator arguments (``settings.trials`` trials
    each, study ``<study>-gbdt-<task>``), on the task's validation metric (AUC, R²); the best arguments go to
    ``baseline.task_params`` of ``best-baseline.yaml`` and the tuned baseline is scored on test once. Returns
    ``result-baseline.json``'s content (``tasks``: per task, the best trial and its validation metrics)."""
    if splits is None:
        splits = load_splits(config)
    data = baseline_data(config, splits)
    if "valid" not in data.splits:
        raise TuneError(f"{config.source or 'config'}: the search scores the validation split; the data has none")
    settings.out.mkdir(parents=True, exist_ok=True)
    space = baseline_space(config)
    result: dict[str, Any] = {"space": list(space), "tasks": {}, "library": config.baseline.library}
    for task in config.tasks:
        result["tasks"][task.name] = _tune_baseline_task(config, task, data, space, settings)
    task_params = {name: entry["best_params"] for name, entry in result["tasks"].items()}
    tuned = replace(config, baseline=replace(config.baseline, task_params=task_params))
    _write_config(tuned, settings.out / "best-baseline.yaml")
    if settings.final:
        seed = config.train.seed
        fitted = fit_baseline(tuned.baseline, config.tasks, data.encoder, data.labels, data.train, data.splits, seed)
        result["valid"], result["test"] = fitted["metrics"].get("valid"), fitted["metrics"].get("test")
    write_json(settings.out / "result-baseline.json", result)
    return result


def _tune_baseline_task(
    config: ExperimentConfig, task: Any, data: BaselineData, space: dict[str, SearchParam], settings: TuneSettings
) -> dict[str, Any]:
    """The baseline's search for one task (validation rows only); the best trial."""
    metric = f"{PRIMARY[task.type]}/{task.name}"
    valid = {"valid": data.splits["valid"]}  # the search sees no test row

    def evaluate(params: dict[str, Any], report: Callable) -> tuple[float, dict]:
        spec = replace(config.baseline, task_params={task.name: params})
        seed = config.train.seed
        fitted = fit_baseline(spec, config.tasks, data.encoder, data.labels, data.train, valid, seed, only=[task.name])
        metrics = fitted["metrics"]["valid"]
        return metrics[metric], {"valid": metrics, "rounds": fitted["rounds"][task.name]}

    study_name = f"{settings.study}-gbdt-{task.name}"
    tune = config.tune
    study = search(
        space,
        evaluate,
        settings.trials,
        settings.storage,
        study_name,
        "maximize",
        tune.seed,
        tune.startup_trials,
        False,
        settings.progress,
    )
    write_trials(study, space, settings.out / f"gbdt-{task.name}-trials", f"{study_name}: maximize {metric}")
    best = _best_trial(study, replace(settings, study=study_name))
    return {
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params_values,
        "best_valid": best.attributes.get("valid"),
        "rounds": best.attributes.get("rounds"),
    }
