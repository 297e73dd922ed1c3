"""The trainer: batches are slices of in-memory tensors, metrics are global, selection is on validation."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mtrank.artifacts import save_model
from mtrank.config import TrainConfig
from mtrank.data.tensors import TensorData
from mtrank.evaluate.metrics import evaluate, higher_is_better
from mtrank.model import MultiTaskModel
from mtrank.train.checkpoint import load_checkpoint, optimizer_from_tensors, save_checkpoint
from mtrank.train.cuda_graph import GraphedTrainStep, clip_gradients, cuda_graph_plan
from mtrank.train.distributed import barrier, rank_and_world
from mtrank.train.losses import distillation_loss, multitask_loss


@dataclass
class TrainResult:
    """What a training run leaves: the evaluation history and the selected (best-on-validation) step."""

    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_value: float = math.nan
    best_metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    samples: int = 0  # rows trained on in this call (after any resume)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


@dataclass
class RunState:
    """The loop counters a checkpoint carries besides weights, optimizer and history (see :func:`resume`)."""

    step: int = 0
    samples: int = 0
    bad_evals: int = 0
    stopped: bool = False
    best_state: dict[str, torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)  # path-specific position, e.g. the stream's epoch and batch


def resume(
    ckpt_dir: Path | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    result: TrainResult,
) -> RunState:
    """Restore ``ckpt_dir/last`` (weights, optimizer, lr schedule, RNG, history, best weights) if it exists."""
    state = RunState()
    loaded = load_checkpoint(ckpt_dir / "last") if ckpt_dir is not None else None
    if loaded is None:
        return state
    model_state, opt_tensors, saved = loaded
    model.load_state_dict(model_state)
    torch.set_rng_state(opt_tensors.pop("rng_state"))
    cuda_rng = opt_tensors.pop("cuda_rng_state", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    optimizer_from_tensors(optimizer, opt_tensors, saved["optimizer"])
    scheduler.last_epoch = saved["step"]  # the optimizer state already holds the matching lr
    state.step = result.resumed_from = saved["step"]
    result.history = saved["history"]
    result.best_step, result.best_value = saved["best_step"], saved["best_value"]
    result.best_metrics = saved["best_metrics"]
    state.bad_evals, state.samples = saved["bad_evals"], saved.get("samples", 0)
    state.stopped, state.extra = bool(saved.get("stopped")), saved.get("extra", {})
    if (ckpt_dir / "best" / "model.safetensors").is_file():
        state.best_state = load_file(str(ckpt_dir / "best" / "model.safetensors"))
    return state


def write_checkpoint(
    ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, result: TrainResult, state: RunState
) -> None:
    """``ckpt_dir/last``: everything :func:`resume` needs to continue exactly where this step left off."""
    save_checkpoint(
        ckpt_dir / "last",
        model,
        optimizer,
        {
            "step": state.step,
            "history": result.history,
            "best_step": result.best_step,
            "best_value": result.best_value,
            "best_metrics": result.best_metrics,
            "bad_evals": state.bad_evals,
            "samples": state.samples,
            "stopped": state.stopped,
            "extra": state.extra,
        },
        torch.get_rng_state(),
        torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def make_optimizer(
    params: Iterable[torch.Tensor], config: TrainConfig, device: torch.device, capturable: bool = False
) -> torch.optim.Optimizer:
    """Adam / AdamW over ``params``, fused on CPU and CUDA (the Trainer's and the ensemble's, one definition:
    the same update arithmetic in single runs, ensembles, eager and graphed steps)."""
    params = list(params)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if capturable:  # its step can be recorded in a CUDA graph (step counters on the device)
        kwargs["capturable"] = True
    if device.type in ("cuda", "cpu"):
        # one fused kernel for all parameters instead of ~8 ops per tensor (CPU too: ~2x less optimizer time)
        kwargs["fused"] = True
    if device.type == "cuda" and all(p.dtype == torch.float32 for p in params):
        # the learning rate as a tensor on the GPU: a schedule updates it in place (LRScheduler fills tensor lrs),
        # so a captured CUDA graph, which reads it at every replay, follows the schedule; eager steps use the
        # same tensor, hence the same arithmetic. (The fused CUDA kernel takes a float32 lr tensor with float32
        # parameters only; other dtypes keep a float lr, and cuda_graph_plan then refuses schedules.)
        kwargs["lr"] = torch.tensor(float(config.lr), dtype=torch.float32, device=device)
    return cls(params, **kwargs)


def lr_lambda(config: TrainConfig, total_steps: int):
    """Multiplier of the base learning rate at a step: linear warm-up, then constant / cosine / linear decay."""

    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


class Trainer:
    """Trains a :class:`MultiTaskModel` on :class:`TensorData`.

    * Each epoch shuffles with a generator seeded by ``(seed, epoch)``; a batch is a gather of rows from tensors
      already on the training device.
    * Validation metrics are computed over the whole split every ``eval_every`` steps (or each epoch); the
      weights at the best ``monitor`` value are restored at the end (early stopping with ``patience``).
    * With ``checkpoint_dir`` set, a checkpoint (safetensors + JSON) is written at every evaluation and an
      interrupted run resumes from it, continuing exactly where it stopped.

    Example:
        >>> from mtrank.config import ModelConfig, TrainConfig
        >>> from mtrank.data import make_synthetic
        >>> data = make_synthetic(n=2000, seed=0)
        >>> train, valid = data.split((0.8, 0.2))
        >>> model = MultiTaskModel(ModelConfig(num_dense=100, tasks=[TaskConfig("y1", "regression"),
        ...                                                          TaskConfig("y2", "regression")]))
        >>> result = Trainer(model, TrainConfig(epochs=2, progress=False)).fit(train, valid)
    """

    def __init__(self, model: MultiTaskModel, config: TrainConfig, cuda_graphs: bool | None = None) -> None:
        self.config = config.validate()
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        # fast path: on CUDA, the whole step in one CUDA graph where that is exact (see mtrank.train.cuda_graph);
        # cuda_graphs=None selects it automatically, False forces the eager step
        self.rank, self.world = rank_and_world()
        possible, reason = cuda_graph_plan(self.model, config, self.device)
        if possible and self.world > 1:
            possible, reason = False, "data-parallel (DDP) training"
        self.cuda_graphs = possible and cuda_graphs is not False
        self.step_path = "cuda_graph" if self.cuda_graphs else "eager"
        self.step_path_reason = reason
        if possible and not self.cuda_graphs:
            self.step_path_reason = "disabled by cuda_graphs=False"
        self.optimizer = make_optimizer(self.model.parameters(), config, self.device, capturable=self.cuda_graphs)
        self.use_bf16 = config.precision == "bf16" and bf16_supported(self.device)
        self.graphed_step: GraphedTrainStep | None = None
        self.task_weights = torch.tensor([t.weight for t in model.tasks], device=self.device)
        self.train_model: torch.nn.Module = self.model
        if self.world > 1:
            device_ids = [self.device.index or torch.cuda.current_device()] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

    def _loss(self, batch: TensorData) -> torch.Tensor:
        # autocast's weight-cast cache must be off while a CUDA graph is captured (PyTorch CUDA-graph notes)
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16, cache_enabled=not self.cuda_graphs
        ):
            out = self.train_model(batch.dense, batch.sparse)
        loss, _ = multitask_loss(
            out.task_logits, batch.labels, self.model.binary_mask, self.task_weights, batch.weights
        )
        loss = loss + out.aux_loss
        if self.config.distill != "none" and batch.teacher is not None:
            distill = distillation_loss(out.task_logits, batch.teacher, self.model.binary_mask, self.config.distill)
            loss = loss + self.config.distill_weight * distill
        return loss

    def fit(self, train: TensorData, valid: TensorData | None = None) -> TrainResult:
        cfg = self.config
        if len(train) == 0:
            raise ValueError("the training split is empty")
        if cfg.distill != "none" and train.teacher is None:
            raise ValueError(
                f"train.distill={cfg.distill!r} needs teacher logits: attach them with data.with_teacher(logits)"
            )
        if train.num_tasks != self.model.config.num_tasks:
            raise ValueError(
                f"data has {train.num_tasks} label columns, the model has {self.model.config.num_tasks} tasks"
            )
        train = train.to(self.device)
        n = len(train)
        world, rank = self.world, self.rank
        if world > 1:  # every rank takes its own batch_size rows of each global batch; drop an incomplete one
            if n < cfg.batch_size * world:
                raise ValueError(
                    f"{n} training rows cannot fill one batch of {cfg.batch_size} on each of {world} ranks"
                )
            steps_per_epoch = n // (cfg.batch_size * world)
        else:
            steps_per_epoch = math.ceil(n / cfg.batch_size)
        total_steps = cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch
        eval_every = cfg.eval_every or steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))
        result = TrainResult()
        torch.manual_seed(cfg.seed)
        ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        run = resume(ckpt_dir, self.model, self.optimizer, scheduler, result)
        if run.stopped:
            total_steps = run.step
        resumed_samples = run.samples
        graphed = None
        if self.cuda_graphs:
            # a later fit on the same tensors replays the graph already captured, unless a checkpoint (or a
            # new optimizer) replaced the optimizer state the graph reads
            graphed = self.graphed_step
            stale = graphed is None or graphed.optimizer is not self.optimizer or result.resumed_from
            stale = stale or graphed.grad_clip != cfg.grad_clip
            if stale or not graphed.serves(train, cfg.batch_size):
                graphed = GraphedTrainStep(self._loss, self.optimizer, train, cfg.batch_size, grad_clip=cfg.grad_clip)
                self.graphed_step = graphed
        self.model.train()
        bar = tqdm(
            total=total_steps,
            initial=run.step,
            disable=not cfg.progress or rank != 0,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            leave=False,
        )
        running = torch.zeros((), device=self.device)
        running_steps = 0
        start = time.perf_counter()
        while run.step < total_steps and not run.stopped:
            epoch, offset = divmod(run.step, steps_per_epoch)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=gen).to(self.device)
            for i in range(offset, steps_per_epoch):
                first = (i * world + rank) * cfg.batch_size
                idx = order[first : first + cfg.batch_size]
                if graphed is not None:
                    loss = graphed.step(idx)
                else:
                    loss = self._loss(train.take(idx))
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip > 0:
                        clip_gradients(self.optimizer, cfg.grad_clip)
                    self.optimizer.step()
                scheduler.step()
                run.step += 1
                run.samples += idx.numel() * world
                running += loss.detach()
                running_steps += 1
                if cfg.progress and run.step % 25 == 0:
                    bar.update(25 if bar.n + 25 <= total_steps else total_steps - bar.n)
                    bar.set_postfix(loss=f"{float(running) / running_steps:.4f}", refresh=False)
                if run.step % eval_every == 0 or run.step == total_steps:
                    train_loss = float(running) / max(running_steps, 1)
                    running.zero_()
                    running_steps = 0
                    self.evaluate_and_checkpoint(run, result, valid, train_loss, steps_per_epoch, total_steps, ckpt_dir)
                if run.step >= total_steps or run.stopped:
                    break
        bar.close()
        result.steps = run.step
        result.samples = run.samples - resumed_samples
        result.seconds = time.perf_counter() - start
        if run.best_state is not None:
            self.model.load_state_dict(run.best_state)
        return result

    def evaluate_and_checkpoint(
        self,
        run: RunState,
        result: TrainResult,
        valid: TensorData | None,
        train_loss: float,
        steps_per_epoch: int,
        total_steps: int,
        ckpt_dir: Path | None,
    ) -> None:
        """At an evaluation step (in-memory and streaming training alike): append the history record, evaluate
        on ``valid``, keep the best weights (and ``ckpt_dir/best``), count evaluations without improvement
        (early stopping sets ``run.stopped``), and write ``ckpt_dir/last`` when a checkpoint is due."""
        cfg = self.config
        record = {
            "step": run.step,
            "epoch": run.step / steps_per_epoch,
            "samples": run.samples,
            "train_loss": train_loss,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        if valid is not None and len(valid) > 0:
            metrics = evaluate(self.model, valid)
            self.model.train()
            record.update({f"valid/{k}": v for k, v in metrics.items()})
            value = metrics.get(cfg.monitor, math.nan)
            best = result.best_value
            higher = higher_is_better(cfg.monitor)
            if not math.isnan(value) and (math.isnan(best) or (value > best if higher else value < best)):
                result.best_step, result.best_value, result.best_metrics = run.step, value, metrics
                run.best_state = copy.deepcopy(self.model.state_dict())
                run.bad_evals = 0
                if ckpt_dir is not None and self.rank == 0:
                    save_model(self.model, ckpt_dir / "best", {"step": run.step, "monitor": cfg.monitor})
            else:
                run.bad_evals += 1
            run.stopped = bool(cfg.early_stopping_patience and run.bad_evals >= cfg.early_stopping_patience)
        result.history.append(record)
        due = cfg.checkpoint_every == 0 or run.step % cfg.checkpoint_every == 0
        if ckpt_dir is not None and (due or run.stopped or run.step == total_steps):
            if self.rank == 0:  # one writer; the others wait for a complete checkpoint
                write_checkpoint(ckpt_dir, self.model, self.optimizer, result, run)
            barrier()
