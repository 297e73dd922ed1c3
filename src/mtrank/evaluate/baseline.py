"""The gradient-boosting baseline of every training report: one GBDT per task on the network's split and features.

A ranking team compares a new model with the gradient-boosted trees it already runs; the training report makes
that comparison for them. :func:`fit_baseline` trains, per task, scikit-learn's ``HistGradientBoosting``
classifier (binary) or regressor (regression), or LightGBM's / XGBoost's scikit-learn estimators
(``baseline.library``), on exactly the rows and encoded features the network trained on:

* numeric features as encoded (a monotone map of the raw value, so the trees split the same way), multi-hot
  blocks as numbers;
* categorical features as native categories: the ids of the fitted vocabulary (most frequent first), the 254
  most frequent kept and the rest in the out-of-vocabulary id 0, as the trees' binning allows at most 255
  categories; hashed features of more than 255 buckets as plain numbers (the ids carry no order, so the trees
  can only carve ranges of buckets); embedding-bag columns are left out (named in the report);
* regression labels on the scale the network learns (``label_transform``), predictions mapped back;
* sample weights (``data.weight_column``) in fitting and metrics;
* boosting stops early on the validation split's loss (``baseline.patience`` rounds without improvement),
  where the network selects its best step. LightGBM and XGBoost then predict with the best round;
  scikit-learn keeps the rounds up to the stop.

Metrics come from :func:`mtrank.evaluate.metrics.task_metrics`, the network's own.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

import numpy as np
import torch

from mtrank.config.experiment import BaselineSpec, TaskSpec
from mtrank.data.encoders import FeatureEncoder, LabelTransforms
from mtrank.data.tensors import TensorData
from mtrank.evaluate.metrics import task_metrics

MAX_CATEGORIES = 255  # the trees' binning holds at most this many categories per feature (ids 0..254)
LIBRARY_NAMES = {
    "sklearn": "scikit-learn HistGradientBoosting",
    "lightgbm": "LightGBM",
    "xgboost": "XGBoost",
}


def baseline_features(encoder: FeatureEncoder, data: TensorData) -> tuple[np.ndarray, list[bool], list[str]]:
    """``X [N, F]`` (float64), which of its columns are categorical, and the names of the columns left out.

    Columns: the dense features, then each single categorical feature (ids of a vocabulary capped at
    :data:`MAX_CATEGORIES`; a hashed feature of more buckets as a number)."""
    dense = data.dense.double().numpy()
    single = len(encoder.features.categorical)
    ids = data.sparse[:, :single].numpy()
    categorical = []
    columns = [dense]
    for j, feat in enumerate(encoder.features.categorical):
        state = encoder.state[feat.name]
        if state.get("hash") and state["size"] > MAX_CATEGORIES:
            columns.append(ids[:, j : j + 1].astype(np.float64))
            categorical.append(False)
        else:
            columns.append(np.where(ids[:, j : j + 1] < MAX_CATEGORIES - 1, ids[:, j : j + 1], 0).astype(np.float64))
            categorical.append(True)
    left_out = [feat.name for feat in [*encoder.bags, *encoder.features.sequence]]
    return np.concatenate(columns, 1), [False] * dense.shape[1] + categorical, left_out


def _estimator(library: str, binary: bool, categorical: list[bool], params: dict, spec: BaselineSpec, seed: int):
    """An unfitted estimator of ``library`` with early stopping set up; ``params`` override the defaults."""
    if library == "sklearn":
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

        cls = HistGradientBoostingClassifier if binary else HistGradientBoostingRegressor
        options = {
            "max_iter": spec.max_iter,
            "early_stopping": True,
            "n_iter_no_change": spec.patience,
            "categorical_features": np.asarray(categorical) if any(categorical) else None,
            "random_state": seed,
        }
    elif library == "lightgbm":
        import lightgbm

        cls = lightgbm.LGBMClassifier if binary else lightgbm.LGBMRegressor
        options = {"n_estimators": spec.max_iter, "random_state": seed, "verbose": -1}
    else:
        import xgboost

        cls = xgboost.XGBClassifier if binary else xgboost.XGBRegressor
        options = {
            "n_estimators": spec.max_iter,
            "early_stopping_rounds": spec.patience,
            "enable_categorical": False,
            "random_state": seed,
        }
    return cls(**{**options, **params})


def _fit(estimator, library: str, x, y, w, x_val, y_val, w_val, categorical: list[bool], patience: int) -> int:
    """Fit with early stopping on the validation rows (when given); returns the rounds kept."""
    if library == "sklearn":
        if x_val is None:
            estimator.set_params(early_stopping=False)
            estimator.fit(x, y, sample_weight=w)
        else:
            estimator.fit(x, y, sample_weight=w, X_val=x_val, y_val=y_val, sample_weight_val=w_val)
        return int(estimator.n_iter_)
    if library == "lightgbm":
        import lightgbm

        kwargs: dict[str, Any] = {
            "sample_weight": w,
            "categorical_feature": [i for i, c in enumerate(categorical) if c],
        }
        if x_val is not None:
            names = inspect.signature(estimator.fit).parameters
            if "eval_X" in names:  # LightGBM >= 4.6
                kwargs.update(eval_X=(x_val,), eval_y=(y_val,), eval_sample_weight=[w_val])
            else:
                kwargs.update(eval_set=[(x_val, y_val)], eval_sample_weight=[w_val])
            kwargs["callbacks"] = [lightgbm.early_stopping(patience, verbose=False)]
        estimator.fit(x, y, **kwargs)
        return int(estimator.best_iteration_ or estimator.n_estimators)
    if x_val is None:
        estimator.set_params(early_stopping_rounds=None)
        estimator.fit(x, y, sample_weight=w, verbose=False)
        return int(estimator.n_estimators)
    estimator.fit(x, y, sample_weight=w, eval_set=[(x_val, y_val)], sample_weight_eval_set=[w_val], verbose=False)
    return int(estimator.best_iteration + 1)


def _predict(estimator, binary: bool, x: np.ndarray) -> np.ndarray:
    """Logits (binary) or predictions on the model's scale, float64 ``[N]``."""
    if not binary:
        return np.asarray(estimator.predict(x), dtype=np.float64)
    p = np.clip(np.asarray(estimator.predict_proba(x))[:, 1].astype(np.float64), 1e-15, 1 - 1e-15)
    return np.log(p / (1 - p))


def fit_baseline(
    spec: BaselineSpec,
    tasks: list[TaskSpec],
    encoder: FeatureEncoder,
    labels: LabelTransforms,
    train: TensorData,
    splits: dict[str, TensorData],
    seed: int = 0,
    train_note: str = "",
    only: list[str] | None = None,
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """One GBDT per task trained on ``train`` (labels on the model's scale), early-stopped on ``splits["valid"]``
    (labels on their own scale, as every split here), scored on every split of ``splits``; ``only``: these tasks.

    Returns ``{"library", "params", "rounds": {task: n}, "metrics": {split: {...}}, "left_out": [...],
    "seconds", "rows", "note"}``; ``metrics`` has the keys of :func:`~mtrank.evaluate.metrics.task_metrics`.
    With ``keep_predictions``, also ``predictions``: per split, ``[N, K]`` probabilities (binary) and
    predictions on the labels' scale (regression), NaN for tasks not trained.
    """
    started = time.perf_counter()
    library = spec.library
    x, categorical, left_out = baseline_features(encoder, train)
    features = {role: baseline_features(encoder, data)[0] for role, data in splits.items()}
    y_train = train.labels.double().numpy()
    w_train = None if train.weights is None else train.weights.double().numpy()
    valid = splits.get("valid")
    y_valid = None if valid is None else labels.transform(valid.labels.numpy()).astype(np.float64)
    w_valid = None if valid is None or valid.weights is None else valid.weights.double().numpy()
    predictions = {role: np.full((len(data), len(tasks)), math.nan) for role, data in splits.items()}
    rounds, params_used = {}, {}
    chosen = [k for k, task in enumerate(tasks) if only is None or task.name in only]
    for k in chosen:
        task = tasks[k]
        binary = task.type == "binary"
        params = {**spec.params, **spec.task_params.get(task.name, {})}
        rows = ~np.isnan(y_train[:, k])
        estimator = _estimator(library, binary, categorical, params, spec, seed)
        val = None
        if valid is not None:
            present = ~np.isnan(y_valid[:, k])
            val = (features["valid"][present], y_valid[present, k], None if w_valid is None else w_valid[present])
        rounds[task.name] = _fit(
            estimator,
            library,
            x[rows],
            y_train[rows, k],
            None if w_train is None else w_train[rows],
            *(val or (None, None, None)),
            categorical,
            spec.patience,
        )
        params_used[task.name] = params
        for role, values in features.items():
            predictions[role][:, k] = _predict(estimator, binary, values)
    binary_mask = np.array([tasks[k].type == "binary" for k in chosen])
    metrics, kept = {}, {}
    model_tasks = [tasks[k].task_config() for k in chosen]
    for role, data in splits.items():
        values = np.where(binary_mask, predictions[role][:, chosen], labels.inverse(predictions[role])[:, chosen])
        weights = None if data.weights is None else data.weights.cpu()
        metrics[role] = task_metrics(model_tasks, torch.from_numpy(values), data.labels[:, chosen].cpu(), weights)
        kept[role] = np.full_like(predictions[role], math.nan)
        kept[role][:, chosen] = np.where(binary_mask, 1 / (1 + np.exp(-values)), values)
    extra = {"predictions": kept} if keep_predictions else {}
    return {
        **extra,
        "library": LIBRARY_NAMES[library],
        "params": params_used,
        "rounds": rounds,
        "metrics": metrics,
        "left_out": left_out,
        "rows": len(train),
        "note": train_note,
        "seconds": time.perf_counter() - started,
    }


def baseline_differences(network: dict, baseline: dict) -> dict[str, dict[str, float]]:
    """Per split, the network minus the baseline of every metric both have (``auc/<task>``, ``r2/<task>``, ...;
    for log loss and MSE a negative difference means the network is better)."""
    out = {}
    for role, values in baseline["metrics"].items():
        if role in network:
            out[role] = {key: float(network[role][key] - v) for key, v in values.items() if key in network[role]}
    return out
