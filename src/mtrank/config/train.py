"""How a model is trained: optimiser, schedule, evaluation, checkpoints, precision, logging."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mtrank.config.base import Config, ConfigError, Registry, check, join

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16")
DISTILL_MODES = ("none", "pointwise", "pairwise", "score_l2")
TASK_METRICS = {"binary": ("auc", "logloss"), "regression": ("mse", "r2")}  # what validation reports per task
SEED_END = 2**32  # train.seed: shuffles seed torch with seed * 1_000_003 + epoch, streams numpy with [seed, epoch]


class MethodRegistry(Registry):
    """A :class:`Registry` whose built-in names are declared here, in the config layer, with their config classes,
    so that a saved experiment (``config.json``) builds without importing the training code; their modules are
    registered by :mod:`mtrank.train.balancing` (``@BALANCERS.register(name, config)``, as a plugin does)."""

    def declare(self, name: str, config: type) -> type:
        self._configs[name] = config
        self._modules.setdefault(name, None)  # type: ignore[arg-type]
        return config

    def module(self, name: str, path: str = "type") -> type:
        found = super().module(name, path)
        if found is None:
            raise ConfigError(f"{path}: {self.kind} {name!r} has no implementation; import mtrank.train.balancing")
        return found


BALANCERS = MethodRegistry("balancing method")


@dataclass
class BalancingConfig(Config):
    """How the task losses become one update of the shared parameters (see :mod:`mtrank.train.balancing` and
    docs/balancing.md). ``type`` selects a registered method; each has its own options.

    ``fixed`` (default): ``sum_k w_k L_k`` with the tasks' configured weights; ``uncertainty`` (Kendall et al.
    2018), ``gradnorm`` (Chen et al. 2018), ``dwa`` (Liu et al. 2019), ``famo`` (Liu et al. 2023) learn or adapt
    the weights; ``pcgrad`` (Yu et al. 2020) and ``cagrad`` (Liu et al. 2021) combine the tasks' gradients on the
    shared parameters. Every method sees the weighted losses ``w_k L_k`` (the configured task weights first).

    Args:
        conflict_every: every this many steps, measure the tasks' gradient cosines on the shared parameters
            (:mod:`mtrank.evaluate.conflict`) on that step's batch; the last measurement joins each history
            record (``conflict/...``). 0 = off. One forward and K backward passes per measurement.
    """

    registry: ClassVar[Registry] = BALANCERS
    shorthand: ClassVar[str] = "type"
    type: str = "fixed"
    conflict_every: int = 0

    def check(self, path: str) -> None:
        check(
            self.conflict_every >= 0, join(path, "conflict_every"), f"must be >= 0 (0 = off), got {self.conflict_every}"
        )


@dataclass
class UncertaintyConfig(BalancingConfig):
    """Uncertainty weighting: learned log-variances ``s_k = log sigma_k^2``.

    Args:
        lr: learning rate of the log-variances (their own Adam, no weight decay); 0 = ``train.lr``.
        init: initial ``s_k`` (0: sigma = 1).
    """

    type: str = "uncertainty"
    lr: float = 0.0
    init: float = 0.0

    def check(self, path: str) -> None:
        super().check(path)
        check(self.lr >= 0, join(path, "lr"), f"must be >= 0 (0 = train.lr), got {self.lr}")


@dataclass
class GradientMethodConfig(BalancingConfig):
    """Options of the methods that need each task's gradient on the shared parameters.

    Args:
        task_gradients: how the K per-task gradients are computed: ``loop`` (K backward passes through the
            retained graph), ``batched`` (one backward pass vmapped over the K tasks,
            ``autograd.grad(..., is_grads_batched=True)``), or ``auto`` (the faster of the two on the device,
            as measured by benchmarks/balancing_cost.py).
    """

    task_gradients: Literal["auto", "loop", "batched"] = "auto"


@dataclass
class GradNormConfig(GradientMethodConfig):
    """GradNorm: task weights trained so that each task's gradient norm on the last shared layer follows its
    relative training rate.

    Args:
        alpha: restoring force (0: equal gradient norms; larger pulls slow tasks harder).
        lr: learning rate of the task weights (their own Adam); 0 = ``train.lr``.
    """

    type: str = "gradnorm"
    alpha: float = 1.5
    lr: float = 0.0

    def check(self, path: str) -> None:
        super().check(path)
        check(self.alpha >= 0, join(path, "alpha"), f"must be >= 0, got {self.alpha}")
        check(self.lr >= 0, join(path, "lr"), f"must be >= 0 (0 = train.lr), got {self.lr}")


@dataclass
class DWAConfig(BalancingConfig):
    """Dynamic Weight Average: weights from the ratio of each task's last two epoch-mean losses.

    Args:
        temperature: softmax temperature T (large: weights near 1).
        every: steps per period over which losses are averaged; 0 = one epoch (the paper's).
    """

    type: str = "dwa"
    temperature: float = 2.0
    every: int = 0

    def check(self, path: str) -> None:
        super().check(path)
        check(self.temperature > 0, join(path, "temperature"), f"must be > 0, got {self.temperature}")
        check(self.every >= 0, join(path, "every"), f"must be >= 0 (0 = one epoch), got {self.every}")


@dataclass
class FAMOConfig(BalancingConfig):
    """FAMO: task logits updated so that every task's log loss decreases at an equal rate.

    Args:
        lr: learning rate of the task logits (their own Adam; the paper's 0.025).
        weight_decay: the logits' weight decay gamma (the paper's 0.001).
    """

    type: str = "famo"
    lr: float = 0.025
    weight_decay: float = 0.001

    def check(self, path: str) -> None:
        super().check(path)
        check(self.lr > 0, join(path, "lr"), f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, join(path, "weight_decay"), f"must be >= 0, got {self.weight_decay}")


@dataclass
class PCGradConfig(GradientMethodConfig):
    """PCGrad: each task's shared gradient loses its component along any other task's gradient it conflicts with
    (negative inner product), tasks taken in a random order."""

    type: str = "pcgrad"


@dataclass
class CAGradConfig(GradientMethodConfig):
    """CAGrad: the update that maximises the worst task's improvement within a ball around the mean gradient.

    Args:
        c: radius of the ball relative to the mean gradient's norm (0: the mean gradient; the paper's 0.4).
        iterations: steps of the K-dimensional simplex solver (run on the device, batched over runs).
    """

    type: str = "cagrad"
    c: float = 0.4
    iterations: int = 50

    def check(self, path: str) -> None:
        super().check(path)
        check(self.c >= 0, join(path, "c"), f"must be >= 0, got {self.c}")
        check(self.iterations >= 1, join(path, "iterations"), f"must be >= 1, got {self.iterations}")


for _name, _config in [
    ("fixed", BalancingConfig),
    ("uncertainty", UncertaintyConfig),
    ("gradnorm", GradNormConfig),
    ("dwa", DWAConfig),
    ("famo", FAMOConfig),
    ("pcgrad", PCGradConfig),
    ("cagrad", CAGradConfig),
]:
    BALANCERS.declare(_name, _config)


SPARSE_OPTIMIZERS = ("dense", "rowwise_adagrad", "lazy_adam")


@dataclass
class SparseConfig(Config):
    """How the categorical embedding table is updated (:mod:`mtrank.train.optim`; docs/benchmarks.md, "Big
    embedding tables"). ``sparse: rowwise_adagrad`` is short for ``sparse: {optimizer: rowwise_adagrad}``.

    Args:
        optimizer: ``dense``: the table is one more parameter of ``train.optimizer`` (a dense gradient and two
            moments the size of the table); ``rowwise_adagrad``: sparse gradients, one float32 accumulator per
            row, only the batch's rows read and written; ``lazy_adam``: sparse gradients, Adam moments updated
            only for the batch's rows (two float32 tables of state). The rest of the model keeps
            ``train.optimizer``; ``train.weight_decay`` does not apply to a sparse table.
        lr: the table's learning rate; 0 = ``train.lr`` (row-wise Adagrad usually wants 10-100x Adam's). The
            learning-rate schedule scales it as it scales ``train.lr``. With ``optimizer: dense`` the table stays
            on ``train.optimizer`` as a parameter group with this lr (large batches: scale ``train.lr``, not the
            table's).
        stochastic_rounding: a ``bf16`` table is written back with stochastic rounding (unbiased, so updates
            below half a bf16 step are not lost); false = round to nearest.
    """

    shorthand: ClassVar[str] = "optimizer"
    optimizer: Literal["dense", "rowwise_adagrad", "lazy_adam"] = "dense"
    lr: float = 0.0
    stochastic_rounding: bool = True

    def check(self, path: str) -> None:
        check(0 <= self.lr < math.inf, join(path, "lr"), f"must be >= 0 and finite (0 = train.lr), got {self.lr}")

    @property
    def enabled(self) -> bool:
        return self.optimizer != "dense"


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass
class CompileConfig(Config):
    """``torch.compile`` of the step's forward + loss (:mod:`mtrank.train.step`; docs/architecture.md, "The
    compiled step"). ``compile: true`` is ``compile: {backend: inductor}``; ``compile: aot_eager`` names a backend.

    Args:
        backend: ``inductor`` (generated fused kernels: Triton on CUDA, C++ on CPU), ``aot_eager`` (the traced
            forward and AOTAutograd backward run by eager kernels: checks tracing, no fusion) or ``eager`` (Dynamo
            only).
        mode: inductor's mode: ``default`` or ``max-autotune-no-cudagraphs`` (autotuned GEMM and Triton
            configurations, a longer compile). The modes that use inductor's own CUDA graphs
            (``reduce-overhead``, ``max-autotune``) are refused: mtrank captures the whole step in its own graph.
        dynamic: compile for symbolic batch sizes (``torch.compile(dynamic=True)``); false (default) specialises
            on the full batch's shapes. Either way a short batch (an epoch's last) runs the step eagerly.
    """

    shorthand: ClassVar[str] = "backend"
    backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    mode: str = "default"
    dynamic: bool = False

    def check(self, path: str) -> None:
        graphs = self.mode in ("reduce-overhead", "max-autotune")
        check(
            not graphs,
            join(path, "mode"),
            f"{self.mode!r} uses inductor's own CUDA graphs, but mtrank captures the whole step in one CUDA graph; "
            f"use one of {list(COMPILE_MODES)}",
        )
        check(
            self.mode in COMPILE_MODES, join(path, "mode"), f"unknown {self.mode!r}; use one of {list(COMPILE_MODES)}"
        )
        check(
            self.mode == "default" or self.backend == "inductor",
            join(path, "mode"),
            f"{self.mode!r} is an inductor mode, but backend is {self.backend!r}; use mode: default or "
            "backend: inductor",
        )


@dataclass
class TrainConfig(Config):
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
            ``"auc/income"`` (``metric/task``); ``"loss"`` is minimised, AUC/R² maximised. A name that is not one
            of the tasks' metrics (:func:`monitor_choices`) fails when training starts.
        precision: ``"fp32"`` or ``"bf16"`` (autocast where the hardware supports it).
        seed: seed of initialisation, shuffling and dropout, in ``[0, 2^32)``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        grad_clip: clip the global gradient norm to this value; 0 = no clipping.
        checkpoint_dir: write checkpoints here (and resume from the latest one); empty = none.
        checkpoint_every: steps between checkpoints (0 = at each evaluation).
        keep_checkpoints: how many complete checkpoints to keep (>= 1; the resume falls back to an older one
            when the newest fails its checksums).
        resume: with a checkpoint in ``checkpoint_dir``: ``"auto"`` resumes it when it was written by the same
            configuration and refuses a different one (naming what changed); ``"overwrite"`` discards it and
            starts afresh; ``"require"`` resumes it and fails if there is none.
        progress: show a progress bar.
        log_dir: write the history as JSON lines (``history.jsonl``) here, live; empty = none.
        tensorboard: also write TensorBoard events to ``log_dir`` (needs the ``tensorboard`` package).
        distill: distillation from teacher logits attached to the data (``TensorData.teacher``): ``"none"``,
            ``"pointwise"``, ``"pairwise"`` or ``"score_l2"`` (see :func:`mtrank.train.losses.distillation_loss`).
        distill_weight: weight of the distillation term added to the label loss.
        balancing: how the task losses are weighted or their gradients combined (:class:`BalancingConfig`,
            e.g. ``balancing: pcgrad`` or ``balancing: {type: dwa, temperature: 2}``); default ``fixed``.
        sparse: the categorical embedding table's optimizer (:class:`SparseConfig`, e.g. ``sparse:
            rowwise_adagrad`` or ``sparse: {optimizer: rowwise_adagrad, lr: 0.05}``); default ``dense``.
        compile: ``torch.compile`` the step's forward + loss: ``false`` (default), ``true`` (inductor), a backend
            name, or a :class:`CompileConfig` mapping (``compile: {backend: inductor, mode:
            max-autotune-no-cudagraphs}``).
    """

    section: ClassVar[str] = "train"
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    epochs: int = 10
    steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    eval_every: int = 0
    early_stopping_patience: int = 0
    monitor: str = "loss"
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    grad_clip: float = 0.0
    checkpoint_dir: str = ""
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: Literal["auto", "overwrite", "require"] = "auto"
    progress: bool = True
    log_dir: str = ""
    tensorboard: bool = False
    distill: Literal["none", "pointwise", "pairwise", "score_l2"] = "none"
    distill_weight: float = 1.0
    balancing: BalancingConfig = field(default_factory=BalancingConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    compile: CompileConfig | bool = False  # (CompileConfig first: its messages name a bad mode or backend)

    def check(self, path: str) -> None:
        check(0 < self.lr < math.inf, join(path, "lr"), f"must be > 0 and finite, got {self.lr}")
        finite = 0 <= self.weight_decay < math.inf
        check(finite, join(path, "weight_decay"), f"must be >= 0 and finite, got {self.weight_decay}")
        check(self.batch_size >= 1, join(path, "batch_size"), f"must be >= 1, got {self.batch_size}")
        check(self.epochs >= 1 or self.steps >= 1, join(path, "epochs"), "give epochs >= 1 or steps >= 1")
        check(self.steps >= 0, join(path, "steps"), f"must be >= 0, got {self.steps}")
        check(self.warmup_steps >= 0, join(path, "warmup_steps"), f"must be >= 0, got {self.warmup_steps}")
        check(self.eval_every >= 0, join(path, "eval_every"), f"must be >= 0, got {self.eval_every}")
        check(self.early_stopping_patience >= 0, join(path, "early_stopping_patience"), "must be >= 0")
        check(self.grad_clip >= 0, join(path, "grad_clip"), f"must be >= 0, got {self.grad_clip}")
        check(self.checkpoint_every >= 0, join(path, "checkpoint_every"), "must be >= 0")
        check(self.keep_checkpoints >= 1, join(path, "keep_checkpoints"), f"must be >= 1, got {self.keep_checkpoints}")
        finite = 0 <= self.distill_weight < math.inf
        check(finite, join(path, "distill_weight"), f"must be >= 0 and finite, got {self.distill_weight}")
        check(0 <= self.seed < SEED_END, join(path, "seed"), f"must be in [0, 2^32), got {self.seed}")
        per_task = isinstance(self.balancing, GradientMethodConfig) or self.balancing.conflict_every
        check(
            not (self.sparse.enabled and per_task),
            join(path, "sparse"),
            f"{self.sparse.optimizer!r} gives the table sparse gradients, which train.balancing's per-task gradients "
            f"({self.balancing.type!r}, conflict_every) do not handle: use train.sparse: dense or another balancing",
        )

    @property
    def compile_options(self) -> CompileConfig | None:
        """The ``compile`` section as a :class:`CompileConfig` (``true`` = inductor's defaults); None when off."""
        if isinstance(self.compile, CompileConfig):
            return self.compile
        return CompileConfig() if self.compile else None


def monitor_choices(task_types: dict[str, str]) -> list[str]:
    """The validation metrics ``train.monitor`` may name: ``loss`` and ``metric/task`` for each task
    (``{"click": "binary"}`` -> ``["loss", "auc/click", "logloss/click"]``)."""
    return ["loss", *(f"{metric}/{task}" for task, kind in task_types.items() for metric in TASK_METRICS[kind])]


def check_monitor(monitor: str, task_types: dict[str, str], path: str = "train.monitor") -> None:
    """A ``monitor`` that no validation metric has (a typo would make early stopping count evaluations, not
    improvements) is a :class:`ConfigError` naming the choices."""
    choices = monitor_choices(task_types)
    if monitor not in choices:
        close = difflib.get_close_matches(str(monitor), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: {monitor!r} is not a validation metric{hint}; choose one of {choices}")
