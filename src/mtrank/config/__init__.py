"""Typed configuration for mtrank models and training.

Configs are plain dataclasses. They are validated once, at the edge (``from_dict`` / ``validate``), with
messages that name the bad field; inside the library they are trusted plain Python objects.

Blocks (one mechanism, many configurations; see :mod:`mtrank.nn.multitask`):

================  =========================================================================
``single_task``   one bottom per task, no sharing (K experts, task k sees only expert k)
``shared_bottom`` one bottom shared by every task (1 expert, every gate fixed to it)
``omoe``          one softmax gate over E shared experts, the same for all tasks
``mmoe``          one softmax gate per task over E shared experts (Ma et al., 2018)
``cgc``           per-task experts plus shared experts; task k's gate sees its own + shared (Tang et al., 2020)
``ple``           ``levels`` stacked CGC levels, with a shared gate feeding the next level's shared experts
================  =========================================================================
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

BLOCKS = ("single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple")
TASK_TYPES = ("binary", "regression")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16")
ACTIVATIONS = ("relu", "gelu", "silu")
EXPERT_TYPES = ("mlp", "dcn")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is expected."""


@dataclass
class TaskConfig:
    """One prediction task.

    Args:
        name: task name, used in metrics, reports and exports.
        type: ``"binary"`` (logits, BCE-with-logits) or ``"regression"`` (MSE).
        weight: weight of this task's loss in the total loss.
    """

    name: str
    type: str = "binary"
    weight: float = 1.0


@dataclass
class GateConfig:
    """How each task's gate turns its logits into expert weights.

    Args:
        temperature: softmax temperature (weights = softmax(logits / temperature)).
        dropout: in training, drop each expert's weight with this probability and renormalise
            (YouTube, Zhao et al. 2019, use 0.1 against gate polarisation).
        top_k: keep only the k largest gate logits (noisy top-k gating, Shazeer et al. 2017); 0 = dense.
        noisy: add learned, input-dependent Gaussian noise to the gate logits in training (with top_k).
        load_balance_weight: weight of the importance + load balancing loss (with top_k).
        hidden: hidden units of the gate network; 0 = one linear projection (the paper's gate).
    """

    temperature: float = 1.0
    dropout: float = 0.0
    top_k: int = 0
    noisy: bool = True
    load_balance_weight: float = 0.01
    hidden: int = 0


@dataclass
class ModelConfig:
    """Architecture of a multi-task ranker.

    Args:
        num_dense: number of dense (numeric) input features.
        vocab_sizes: vocabulary size of each categorical feature (ids in ``[0, vocab)``).
        embedding_dim: embedding width of every categorical feature.
        tasks: the tasks, in output order.
        block: one of :data:`BLOCKS`.
        num_experts: shared experts (``omoe``, ``mmoe``, ``cgc``).
        task_experts: experts owned by each task (``cgc``, ``ple``).
        levels: extraction levels stacked by ``ple``.
        expert_hidden: hidden layer widths of each expert (its output width is the last).
        tower_hidden: hidden layer widths of each task tower (a final linear layer gives one logit).
        shared_hidden: widths of a shared hidden layer under the experts (YouTube's placement); empty = none.
        activation: activation between layers.
        dropout: dropout after each hidden layer of experts and towers.
        gate: gate settings, see :class:`GateConfig`.
        expert_type: ``"mlp"`` or ``"dcn"`` (DCNv2 cross layers, then the MLP; Pinterest's best experts).
        cross_layers: cross layers of each DCN expert.
        cross_rank: rank of the cross weights (0 = full rank ``[d, d]``).
        mixer_layers: transformer layers of a feature mixer over the feature tokens (0 = none); its output is
            concatenated to the block input (Pinterest Closeup).
        mixer_heads: attention heads of the mixer (must divide ``embedding_dim``).
        bias_features: indices (into ``vocab_sizes``) of categorical features read only by YouTube's shallow
            bias tower (e.g. position, device); the main model does not see them.
        bias_hidden: hidden widths of the bias tower.
        bias_dropout: in training, drop a row's bias logit with this probability.
        bias_tasks: tasks whose logits get the bias logit (default: every binary task).
        bag_lengths: multi-valued categorical features embedded as bags (DeepCTR's VarLenSparseFeat): bag b
            takes ``bag_lengths[b]`` sparse columns, and the bags are the last ``sum(bag_lengths)`` columns of
            ``vocab_sizes`` (all columns of a bag have its vocabulary size; its last id is padding). The
            model embeds each column with the bag's one table slice and pools the non-padding ones.
        bag_pooling: ``"mean"`` or ``"sum"`` for each bag.
    """

    num_dense: int = 0
    vocab_sizes: list[int] = field(default_factory=list)
    embedding_dim: int = 16
    tasks: list[TaskConfig] = field(default_factory=lambda: [TaskConfig("task1"), TaskConfig("task2")])
    block: str = "mmoe"
    num_experts: int = 8
    task_experts: int = 1
    levels: int = 2
    expert_hidden: list[int] = field(default_factory=lambda: [16])
    tower_hidden: list[int] = field(default_factory=lambda: [8])
    shared_hidden: list[int] = field(default_factory=list)
    activation: str = "relu"
    dropout: float = 0.0
    gate: GateConfig = field(default_factory=GateConfig)
    expert_type: str = "mlp"
    cross_layers: int = 2
    cross_rank: int = 0
    mixer_layers: int = 0
    mixer_heads: int = 2
    bias_features: list[int] = field(default_factory=list)
    bias_hidden: list[int] = field(default_factory=list)
    bias_dropout: float = 0.1
    bias_tasks: list[str] = field(default_factory=list)
    bag_lengths: list[int] = field(default_factory=list)
    bag_pooling: list[str] = field(default_factory=list)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def main_features(self) -> list[int]:
        """Indices of the categorical features the main model reads (all but the bias features)."""
        return [i for i in range(len(self.vocab_sizes)) if i not in set(self.bias_features)]

    @property
    def num_tokens(self) -> int:
        """Embedded features the main model reads: single categoricals (not bias) plus one per bag."""
        return len(self.main_features) - sum(self.bag_lengths) + len(self.bag_lengths)

    @property
    def input_dim(self) -> int:
        return self.num_dense + self.num_tokens * self.embedding_dim

    def validate(self) -> ModelConfig:
        _check(self.block in BLOCKS, "model.block", f"unknown block {self.block!r}; expected one of {BLOCKS}")
        _check(len(self.tasks) >= 1, "model.tasks", "at least one task is required")
        names = [t.name for t in self.tasks]
        _check(len(set(names)) == len(names), "model.tasks", f"task names must be unique, got {names}")
        for i, task in enumerate(self.tasks):
            _check(
                task.type in TASK_TYPES,
                f"model.tasks[{i}].type",
                f"unknown task type {task.type!r} for task {task.name!r}; expected one of {TASK_TYPES}",
            )
            _check(task.weight >= 0, f"model.tasks[{i}].weight", f"must be >= 0, got {task.weight}")
        _check(self.num_dense >= 0, "model.num_dense", f"must be >= 0, got {self.num_dense}")
        _check(
            self.input_dim > 0,
            "model.num_dense",
            "the model has no inputs: give dense or categorical features",
        )
        for i, v in enumerate(self.vocab_sizes):
            _check(int(v) >= 1, f"model.vocab_sizes[{i}]", f"must be >= 1, got {v}")
        if self.vocab_sizes:
            _check(self.embedding_dim >= 1, "model.embedding_dim", f"must be >= 1, got {self.embedding_dim}")
        if self.block in ("omoe", "mmoe"):
            _check(self.num_experts >= 1, "model.num_experts", f"must be >= 1, got {self.num_experts}")
        if self.block in ("cgc", "ple"):
            _check(self.levels >= 1, "model.levels", f"must be >= 1, got {self.levels}")
            _check(self.num_experts >= 0, "model.num_experts", f"must be >= 0, got {self.num_experts}")
            _check(self.task_experts >= 1, "model.task_experts", f"must be >= 1, got {self.task_experts}")
        _check(len(self.expert_hidden) >= 1, "model.expert_hidden", "an expert needs at least one layer")
        for name in ("expert_hidden", "tower_hidden", "shared_hidden"):
            for i, width in enumerate(getattr(self, name)):
                _check(int(width) >= 1, f"model.{name}[{i}]", f"layer width must be >= 1, got {width}")
        _check(self.activation in ACTIVATIONS, "model.activation", f"expected one of {ACTIVATIONS}")
        _check(0 <= self.dropout < 1, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(
            self.expert_type in EXPERT_TYPES, "model.expert_type", f"unknown {self.expert_type!r}; use {EXPERT_TYPES}"
        )
        if self.expert_type == "dcn":
            _check(self.cross_layers >= 1, "model.cross_layers", f"must be >= 1, got {self.cross_layers}")
            _check(self.cross_rank >= 0, "model.cross_rank", f"must be >= 0, got {self.cross_rank}")
        _check(self.mixer_layers >= 0, "model.mixer_layers", f"must be >= 0, got {self.mixer_layers}")
        if self.mixer_layers:
            _check(len(self.main_features) > 0, "model.mixer_layers", "the mixer needs categorical features")
            _check(
                self.mixer_heads >= 1 and self.embedding_dim % self.mixer_heads == 0,
                "model.mixer_heads",
                f"must divide embedding_dim={self.embedding_dim}, got {self.mixer_heads}",
            )
        for i, index in enumerate(self.bias_features):
            _check(
                0 <= index < len(self.vocab_sizes),
                f"model.bias_features[{i}]",
                f"index {index} is not a categorical feature (there are {len(self.vocab_sizes)})",
            )
        _check(len(set(self.bias_features)) == len(self.bias_features), "model.bias_features", "duplicate index")
        _check(
            len(self.bag_pooling) == len(self.bag_lengths),
            "model.bag_pooling",
            f"one pooling per bag: {len(self.bag_lengths)} bags, {len(self.bag_pooling)} poolings",
        )
        first_bag_column = len(self.vocab_sizes) - sum(self.bag_lengths)
        _check(
            first_bag_column >= 0,
            "model.bag_lengths",
            f"the bags take {sum(self.bag_lengths)} columns; vocab_sizes has {len(self.vocab_sizes)}",
        )
        start = first_bag_column
        for b, (length, pooling) in enumerate(zip(self.bag_lengths, self.bag_pooling)):
            _check(int(length) >= 1, f"model.bag_lengths[{b}]", f"must be >= 1, got {length}")
            _check(pooling in ("mean", "sum"), f"model.bag_pooling[{b}]", f"expected mean or sum, got {pooling!r}")
            sizes = set(self.vocab_sizes[start : start + length])
            _check(
                len(sizes) == 1 and min(sizes) >= 2,
                f"model.bag_lengths[{b}]",
                f"the bag's columns {start}..{start + length - 1} need one vocabulary size >= 2 (ids + padding), "
                f"got {sorted(sizes)}",
            )
            start += length
        for i, index in enumerate(self.bias_features):
            _check(
                index < first_bag_column,
                f"model.bias_features[{i}]",
                f"index {index} is a bag column; the bias tower reads single categorical features",
            )
        for i, name in enumerate(self.bias_tasks):
            _check(name in names, f"model.bias_tasks[{i}]", f"unknown task {name!r}; tasks are {names}")
        _check(0 <= self.bias_dropout < 1, "model.bias_dropout", f"must be in [0, 1), got {self.bias_dropout}")
        g = self.gate
        _check(g.temperature > 0, "model.gate.temperature", f"must be > 0, got {g.temperature}")
        _check(0 <= g.dropout < 1, "model.gate.dropout", f"must be in [0, 1), got {g.dropout}")
        _check(g.top_k >= 0, "model.gate.top_k", f"must be >= 0, got {g.top_k}")
        _check(g.hidden >= 0, "model.gate.hidden", f"must be >= 0, got {g.hidden}")
        if g.top_k and self.block in ("omoe", "mmoe"):
            _check(
                g.top_k <= self.num_experts,
                "model.gate.top_k",
                f"top_k={g.top_k} exceeds num_experts={self.num_experts}",
            )
        return self


@dataclass
class TrainConfig:
    """How a model is trained.

    Args:
        optimizer: ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        weight_decay: weight decay (decoupled for AdamW).
        batch_size: rows per step.
        epochs: passes over the training data (ignored when ``steps`` > 0).
        steps: total optimisation steps; 0 = use ``epochs``.
        schedule: learning-rate schedule: ``constant``, ``cosine`` or ``linear`` decay.
        warmup_steps: linear warm-up steps.
        eval_every: evaluate on validation every this many steps; 0 = once per epoch.
        early_stopping_patience: stop after this many evaluations without improvement; 0 = never.
        monitor: validation metric for early stopping and best-checkpoint selection, e.g. ``"loss"`` or
            ``"auc/income"`` (``metric/task``); ``"loss"`` is minimised, AUC/R² maximised.
        precision: ``"fp32"`` or ``"bf16"`` (autocast where the hardware supports it).
        seed: seed of initialisation, shuffling and dropout.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        grad_clip: clip the global gradient norm to this value; 0 = no clipping.
        checkpoint_dir: write checkpoints here (and resume from the latest one); empty = none.
        checkpoint_every: steps between checkpoints (0 = at each evaluation).
        progress: show a progress bar.
        distill: distillation from teacher logits attached to the data (``TensorData.teacher``): ``"none"``,
            ``"pointwise"``, ``"pairwise"`` or ``"score_l2"`` (see :func:`mtrank.train.losses.distillation_loss`).
        distill_weight: weight of the distillation term added to the label loss.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    epochs: int = 10
    steps: int = 0
    schedule: str = "constant"
    warmup_steps: int = 0
    eval_every: int = 0
    early_stopping_patience: int = 0
    monitor: str = "loss"
    precision: str = "fp32"
    seed: int = 0
    device: str = "cpu"
    grad_clip: float = 0.0
    checkpoint_dir: str = ""
    checkpoint_every: int = 0
    progress: bool = True
    distill: str = "none"
    distill_weight: float = 1.0

    def validate(self) -> TrainConfig:
        _check(self.optimizer in OPTIMIZERS, "train.optimizer", f"unknown {self.optimizer!r}; use {OPTIMIZERS}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.epochs >= 1 or self.steps >= 1, "train.epochs", "give epochs >= 1 or steps >= 1")
        _check(self.schedule in SCHEDULES, "train.schedule", f"unknown {self.schedule!r}; use {SCHEDULES}")
        _check(self.precision in PRECISIONS, "train.precision", f"unknown {self.precision!r}; use {PRECISIONS}")
        _check(self.device in ("cpu", "cuda", "auto"), "train.device", f"unknown {self.device!r}")
        modes = ("none", "pointwise", "pairwise", "score_l2")
        _check(self.distill in modes, "train.distill", f"unknown {self.distill!r}; use {modes}")
        _check(self.distill_weight >= 0, "train.distill_weight", f"must be >= 0, got {self.distill_weight}")
        _check(self.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0")
        return self


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the field path in the message."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown field; expected one of {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        if name == "tasks":
            if not isinstance(value, list):
                raise ConfigError(f"{path}.tasks: expected a list of tasks")
            value = [_build(TaskConfig, t, f"{path}.tasks[{i}]") for i, t in enumerate(value)]
        elif name == "gate":
            value = _build(GateConfig, value, f"{path}.gate")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{path}: {err}") from None


def model_config_from_dict(data: dict, path: str = "model") -> ModelConfig:
    """Build and validate a :class:`ModelConfig` from plain data (e.g. parsed JSON or YAML)."""
    return _build(ModelConfig, data, path).validate()


def train_config_from_dict(data: dict, path: str = "train") -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from plain data."""
    return _build(TrainConfig, data, path).validate()


def to_dict(config: Any) -> dict:
    """A config as plain JSON-ready data."""
    return dataclasses.asdict(config)


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)
