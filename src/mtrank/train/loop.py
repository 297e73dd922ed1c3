"""The one training loop: any batch source, one step, one place for evaluation, best-step selection, early
stopping, checkpoints, progress and logging.

It trains R >= 1 *runs* of one architecture: a single model (:class:`~mtrank.train.trainer.Trainer`, also
data-parallel), or R models stacked and trained as one (:class:`~mtrank.train.ensemble.Ensemble`). Every
decision is per run, so an ensemble member behaves as its run trained alone would: its own validation history,
best step, early stopping (a stopped run's later evaluations are ignored) and best weights, restored at the
end. The loop stops when every run has stopped or the step budget is spent.

What it needs from the runs is the :class:`Runs` protocol; from the data, a source
(:mod:`mtrank.train.sources`).

Before the first step the monitored metric is checked against the runs' tasks (a typo would otherwise turn
early stopping into "stop after ``patience`` evaluations"). Every :data:`DIVERGENCE_CHECK_EVERY` steps, and
before every evaluation, the training loss of each run and task is checked (:class:`DivergenceGuard`): a
non-finite loss, or one :data:`DIVERGENCE_FACTOR` times its first step's, stops training with
:class:`TrainingDiverged` naming the run, task and steps, so no diverged model is evaluated or saved.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mtrank.config import CompileConfig, TrainConfig
from mtrank.config.train import check_monitor
from mtrank.evaluate.conflict import flat_record
from mtrank.evaluate.metrics import higher_is_better
from mtrank.train.balancing import make_balancer, measure_conflict
from mtrank.train.callbacks import Callback, default_callbacks
from mtrank.train.checkpoint import Checkpoints, fingerprint_data, optimizer_from_tensors, restore_rng
from mtrank.train.cuda_graph import cuda_graph_plan
from mtrank.train.distributed import barrier, rank_and_world
from mtrank.train.losses import batch_losses
from mtrank.train.optim import make_optimizer, make_scheduler
from mtrank.train.step import TrainStep

DIVERGENCE_CHECK_EVERY = 50  # steps between divergence checks (each one reads the running loss: one device sync)
BALANCER_KEY = "balancer/"  # the task-balancing state's tensors in a checkpoint's weights file
DIVERGENCE_FACTOR = 1e4  # a task's mean training loss above this times max(its first step's loss, 1) has diverged


class TrainingDiverged(RuntimeError):
    """The training loss became non-finite or exploded; the message names the run, the task, the steps and what
    to change."""


class DivergenceGuard:
    """Checks the running training loss of every run and task for divergence.

    A task has diverged when its mean loss over the steps since the last evaluation is not finite, or is more
    than :data:`DIVERGENCE_FACTOR` times ``max(loss at the first step, 1)`` (the floor keeps tasks whose loss
    starts near 0 from tripping on noise). A non-finite total with finite task losses is the auxiliary (gate)
    or distillation loss. Under data-parallel training the sums are added over ranks first, so every rank
    stops at the same check.

    Args:
        task_names: the tasks, in the order of the step's per-task losses.
        config: the training config (its ``lr`` and ``grad_clip`` are named in the advice).
    """

    def __init__(self, task_names: list[str], config: TrainConfig) -> None:
        self.task_names, self.config = task_names, config
        self.first: torch.Tensor | None = None  # [R, K] losses of the first step of this fit

    def observe_first(self, per_task: torch.Tensor) -> None:
        if self.first is None:
            self.first = per_task.detach().clone()

    def check(
        self, step: int, since: int, total: torch.Tensor, per_task: torch.Tensor, steps: int, active: list[bool]
    ) -> None:
        """Raise :class:`TrainingDiverged` if an active run diverged: ``total [R]`` and ``per_task [R, K]`` are
        the loss sums over the ``steps`` steps ``since + 1 .. step``."""
        sums = torch.cat([total.reshape(-1, 1), per_task], 1).double()  # (R, 1 + K)
        if rank_and_world()[1] > 1:
            torch.distributed.all_reduce(sums)
            steps *= rank_and_world()[1]
        means = (sums / max(steps, 1)).cpu()
        first = self.first.reshape(means.shape[0], -1).double().cpu()  # (R, K)
        limit = DIVERGENCE_FACTOR * first.clamp_min(1.0)
        diverged = ~torch.isfinite(means[:, 1:]) | (means[:, 1:] > limit)
        for r in (r for r in range(means.shape[0]) if active[r]):
            run = f"run {r}, " if means.shape[0] > 1 else ""
            where = f"steps {since + 1}-{step}" if step > since + 1 else f"step {step}"
            if diverged[r].any():
                k = int(torch.nonzero(diverged[r])[0])
                value, start = float(means[r, 1 + k]), float(first[r, k])
                problem = f"loss {value:.3g}" if math.isfinite(value) else f"a non-finite loss ({value})"
                problem += f" over {where} (it was {start:.3g} at the first step)"
                self._fail(step, f"{run}task {self.task_names[k]!r} has {problem}")
            if not math.isfinite(float(means[r, 0])):
                self._fail(step, f"{run}the auxiliary (gate) or distillation loss is not finite over {where}")

    def _fail(self, step: int, what: str) -> None:
        cfg = self.config
        clip = f"lower train.grad_clip (now {cfg.grad_clip:g})" if cfg.grad_clip else "set train.grad_clip (e.g. 1.0)"
        raise TrainingDiverged(
            f"training diverged at step {step}: {what}; lower train.lr (now {cfg.lr:g}) or {clip}, and check the "
            "labels' scale"
        )


def compiled_reason(options: CompileConfig) -> str:
    """What ``train.compile`` does to the step, for ``step_path_reason``."""
    mode = f", mode {options.mode}" if options.backend == "inductor" else ""
    return (
        f"forward + loss torch.compile'd (train.compile: backend {options.backend}{mode}, dynamic "
        f"{str(options.dynamic).lower()}) for full batches; a short batch runs them eagerly"
    )


class Runs(Protocol):
    """What the loop trains: R runs of one architecture (R = 1 for a single model).

    ``forward(batch)`` returns task logits ``[B, K]`` (``[R, B, K]``) and the auxiliary loss ``[]`` (``[R]``);
    ``evaluate(data)`` one metrics dict per run; ``snapshot(runs, best)`` copies the current weights of the
    given runs into ``best`` (a new dict when None); ``restore(best, runs)`` puts them back.
    """

    num_runs: int
    device: torch.device
    binary_mask: torch.Tensor
    task_weights: torch.Tensor
    funnel: Any  # a FunnelSpec (mtrank.train.losses) when tasks depend on others, else None
    task_names: list[str]

    def parameters(self) -> list[torch.Tensor]: ...
    def tables(self) -> list[torch.Tensor]: ...  # parameters with sparse gradients (train.sparse), among parameters()
    def train(self, mode: bool = True) -> None: ...
    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]: ...
    def clip_gradients(self, max_norm: float) -> None: ...
    def evaluate(self, data: Any) -> list[dict[str, float]]: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
    def snapshot(self, runs: list[int], best: dict | None) -> dict[str, torch.Tensor]: ...
    def restore(self, best: dict[str, torch.Tensor], runs: list[int]) -> None: ...
    def random_sources(self) -> list[str]: ...
    def describe(self) -> dict: ...


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
    eval_seconds: float = 0.0  # part of ``seconds`` spent evaluating
    stopped_early: bool = False

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


@dataclass
class LoopState:
    """The loop's counters (with the results, what a checkpoint carries besides tensors)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` trained on
    samples: int = 0
    bad_evals: list[int] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)


class TrainingLoop:
    """Trains ``runs`` with ``config``; :meth:`fit` takes any batch source.

    Args:
        runs: what is trained (:class:`Runs`).
        config: the training config.
        callbacks: watchers; default: what the config asks for (:func:`~mtrank.train.callbacks.default_callbacks`).
        cuda_graphs: None (default) captures the step in a CUDA graph where that is exact
            (:func:`~mtrank.train.cuda_graph.cuda_graph_plan`); False keeps the eager step.
        description: the progress bar's label.
    """

    def __init__(
        self,
        runs: Runs,
        config: TrainConfig,
        callbacks: list[Callback] | None = None,
        cuda_graphs: bool | None = None,
        description: str = "train",
    ) -> None:
        self.runs, self.config = runs, config.validate()
        self.rank, self.world = rank_and_world()
        possible, reason = cuda_graph_plan(runs.random_sources(), runs.parameters(), config, runs.device)
        if possible and self.world > 1:
            possible, reason = False, "data-parallel (DDP) training"
        self.balancer = make_balancer(self.config, runs)
        if possible and self.balancer.eager_reason:
            possible, reason = False, f"train.balancing.type={config.balancing.type!r} {self.balancer.eager_reason}"
        self.conflict_series: list[dict] = []  # every conflict measurement of the last fit: {"step", "runs": [...]}
        self.cuda_graphs = possible and cuda_graphs is not False
        self.step_path = "cuda_graph" if self.cuda_graphs else "eager"
        self.step_path_reason = reason if cuda_graphs is not False or not possible else "disabled by cuda_graphs=False"
        if (options := self.config.compile_options) is not None:  # "cuda_graph+compiled" or "compiled"
            self.step_path = "cuda_graph+compiled" if self.cuda_graphs else "compiled"
            self.step_path_reason += f"; {compiled_reason(options)}"
        self.optimizer = make_optimizer(runs.parameters(), config, runs.device, self.cuda_graphs, runs.tables())
        self.callbacks = default_callbacks(config, description) if callbacks is None else list(callbacks)
        if self.rank != 0:
            self.callbacks = []
        self.step: TrainStep | None = None
        self._step_for: tuple | None = None  # (source data, batch size, optimizer) the step was built for

    def train_step(self, source: Any) -> TrainStep:
        """The step for ``source``; a graphed step is reused while the source's tensors and the optimizer are
        the same (its graph reads them)."""
        key = (*source.identity(), source.batch_size, self.optimizer)
        old = self._step_for
        same = old is not None and len(old) == len(key)
        same = same and all((a is b) if not isinstance(a, int) else (a == b) for a, b in zip(old, key))
        if self.step is None or not same:
            self.step = TrainStep(
                self.runs,
                self.optimizer,
                self.config,
                source.batch,
                source.is_full,
                graphed=self.cuda_graphs,
                balancer=self.balancer,
            )
            self._step_for = key
        return self.step

    def fit(self, source: Any, valid: Any = None) -> list[TrainResult]:
        """Train on ``source`` (validation on ``valid``, evaluated every ``eval_every`` steps or each epoch);
        one :class:`TrainResult` per run; each run ends with its best validation weights."""
        cfg, runs, num = self.config, self.runs, self.runs.num_runs
        if source.rows == 0:
            raise ValueError("the training split is empty")
        kinds = runs.binary_mask.reshape(-1).tolist()
        check_monitor(cfg.monitor, {t: "binary" if b else "regression" for t, b in zip(runs.task_names, kinds)})
        guard = DivergenceGuard(runs.task_names, cfg)
        steps_per_epoch = source.steps_per_epoch
        total_steps = cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch
        eval_every = cfg.eval_every or steps_per_epoch
        scheduler = make_scheduler(self.optimizer, cfg, total_steps)
        results = [TrainResult() for _ in range(num)]
        state = LoopState(bad_evals=[0] * num, stopped=[False] * num)
        best: dict[str, torch.Tensor] | None = None
        torch.manual_seed(cfg.seed)  # the step's random numbers (dropout, noisy gates); a resume restores them
        checkpoints = None
        if cfg.checkpoint_dir:
            identity = fingerprint_data(runs.describe(), cfg, source.describe(), total_steps)
            resume, writer = (cfg.resume, True) if self.rank == 0 else ("auto", False)
            checkpoints = Checkpoints(cfg.checkpoint_dir, identity, resume, cfg.keep_checkpoints, writer)
            best = self._resume(checkpoints, scheduler, results, state, source)
        if all(state.stopped):
            total_steps = state.step
        step_fn = self.train_step(source)
        self.balancer.begin(steps_per_epoch)
        self.conflict_series = []
        conflict_every = cfg.balancing.conflict_every
        runs.train(True)
        start_step, start_samples = state.step, state.samples
        info = {"total_steps": total_steps, "start_step": start_step, "runs": num, "tasks": runs.task_names}
        for callback in self.callbacks:
            callback.on_train_begin(info)
        running = torch.zeros(num, device=runs.device)
        running_tasks = torch.zeros(num, len(runs.task_names), device=runs.device)
        running_steps = 0

        def mean_loss() -> float:
            return float(running[0]) / max(running_steps, 1)

        start = time.perf_counter()
        eval_seconds = 0.0
        while state.step < total_steps and not all(state.stopped):
            for key in source.keys(state.epoch, state.batch, total_steps - state.step):
                per_run, per_task = step_fn(key)
                scheduler.step()
                state.step += 1
                state.batch += 1
                state.samples += source.rows_in(key)
                running += per_run.reshape(num)
                running_tasks += per_task.reshape(num, -1)
                running_steps += 1
                guard.observe_first(per_task.reshape(num, -1))
                if conflict_every and state.step % conflict_every == 0:
                    self._measure_conflict(source, key, state.step)
                for callback in self.callbacks:
                    callback.on_step(state.step, mean_loss)
                evaluating = state.step % eval_every == 0 or state.step == total_steps
                if evaluating or state.step % DIVERGENCE_CHECK_EVERY == 0:
                    since = state.step - running_steps
                    active = [not stopped for stopped in state.stopped]
                    guard.check(state.step, since, running, running_tasks, running_steps, active)
                if evaluating:
                    eval_start = time.perf_counter()
                    train_losses = (running / running_steps).tolist()
                    task_losses = (running_tasks / running_steps).tolist()
                    running.zero_()
                    running_tasks.zero_()
                    running_steps = 0
                    best = self._evaluate(state, results, best, valid, train_losses, task_losses, steps_per_epoch)
                    due = cfg.checkpoint_every == 0 or state.step % cfg.checkpoint_every == 0
                    if checkpoints is not None and (due or all(state.stopped) or state.step == total_steps):
                        self._checkpoint(checkpoints, state, results, best, source)
                    eval_seconds += time.perf_counter() - eval_start
                if state.step >= total_steps or all(state.stopped):
                    break
            else:  # the epoch is over
                state.epoch, state.batch = state.epoch + 1, 0
        seconds = time.perf_counter() - start
        graph = step_fn.graph
        if graph is not None and graph.failure:  # the path it ran, not the plan
            compiled = self.step_path.endswith("compiled")
            self.step_path = "compiled" if compiled else "eager"
            self.step_path_reason = f"CUDA graph capture failed: {graph.failure}"
            if compiled:
                self.step_path_reason += f"; {compiled_reason(self.config.compile_options)}"
        restore = [r for r in range(num) if results[r].best_step > 0]
        if best is not None and restore:
            runs.restore(best, restore)
        for r, result in enumerate(results):
            result.steps, result.seconds, result.eval_seconds = state.step, seconds, eval_seconds
            result.samples = state.samples - start_samples
            result.stopped_early = state.stopped[r]
        for callback in self.callbacks:
            callback.on_train_end(results)
        return results

    def _measure_conflict(self, source: Any, key: Any, step: int) -> None:
        """The task-gradient cosines of this step's batch after the update (eval mode: no dropout, no RNG
        drawn, so the trajectory is the one without measurements)."""
        batch = source.batch(key)
        self.runs.train(False)
        with torch.autocast(self.runs.device.type, dtype=torch.bfloat16, enabled=self.step.use_bf16):
            task_logits, aux_loss = self.runs.forward(batch)
        funnel = self.runs.funnel and self.runs.funnel.in_eval(task_logits, batch.labels.shape[-1])
        runs = self.runs
        losses = batch_losses(
            task_logits, aux_loss, batch.labels, runs.binary_mask, runs.task_weights, batch.weights, funnel=funnel
        )
        self.runs.train(True)
        self.conflict_series.append({"step": step, "runs": measure_conflict(self.runs, losses)})

    def _evaluate(
        self,
        state: LoopState,
        results: list[TrainResult],
        best: dict | None,
        valid: Any,
        train_losses: list[float],
        task_losses: list[list[float]],
        steps_per_epoch: int,
    ) -> dict | None:
        """History records, best-step selection and early stopping of every run at an evaluation step."""
        cfg, runs = self.config, self.runs
        metrics = runs.evaluate(valid) if valid is not None and len(valid) > 0 else None
        if metrics is not None:
            runs.train(True)
            if all(cfg.monitor not in m for m in metrics):
                known = sorted(k for k in metrics[0] if not k.startswith("gate_"))
                raise ValueError(f"train.monitor: {cfg.monitor!r} is not a validation metric; choose one of {known}")
        higher = higher_is_better(cfg.monitor)
        lr = float(self.optimizer.param_groups[0]["lr"])
        records: list[dict | None] = []
        improved = []
        balance = self.balancer.record()
        for r, result in enumerate(results):
            if state.stopped[r]:  # stopped early: this run's training is over
                records.append(None)
                continue
            record = {
                "step": state.step,
                "epoch": state.step / steps_per_epoch,
                "samples": state.samples,
                "lr": lr,
                "train_loss": train_losses[r],
                **{f"train_loss/{t}": v for t, v in zip(runs.task_names, task_losses[r])},
                **balance[r],
            }
            if self.conflict_series:
                record.update(flat_record(self.conflict_series[-1]["runs"][r]))
            if metrics is not None:
                record.update({f"valid/{k}": v for k, v in metrics[r].items()})
                value, old = metrics[r].get(cfg.monitor, math.nan), result.best_value
                if not math.isnan(value) and (math.isnan(old) or (value > old if higher else value < old)):
                    result.best_step, result.best_value = state.step, value
                    result.best_metrics = {k: v for k, v in metrics[r].items() if not k.startswith("gate_")}
                    state.bad_evals[r] = 0
                    improved.append(r)
                else:
                    state.bad_evals[r] += 1
                patience = cfg.early_stopping_patience
                state.stopped[r] = bool(patience and state.bad_evals[r] >= patience)
            result.history.append(record)
            records.append(record)
        if improved:
            best = runs.snapshot(improved, best)
        for callback in self.callbacks:
            callback.on_evaluate(state.step, records)
        return best

    def _checkpoint(
        self, checkpoints: Checkpoints, state: LoopState, results: list[TrainResult], best: dict | None, source: Any
    ) -> None:
        if self.rank == 0:  # one writer; the others wait for a complete checkpoint
            checkpoints.save(
                {
                    "step": state.step,
                    "epoch": state.epoch,
                    "batch": state.batch,
                    "samples": state.samples,
                    "bad_evals": state.bad_evals,
                    "stopped": state.stopped,
                    "source": source.position(),
                    "results": [
                        {k: getattr(r, k) for k in ("history", "best_step", "best_value", "best_metrics")}
                        for r in results
                    ],
                },
                {**self.runs.state_dict(), **{BALANCER_KEY + k: v for k, v in self.balancer.state_dict().items()}},
                best,
                self.optimizer,
            )
        barrier()

    def _resume(
        self, checkpoints: Checkpoints, scheduler: Any, results: list[TrainResult], state: LoopState, source: Any
    ) -> dict | None:
        """Restore the last checkpoint, if any (weights, optimizer, lr schedule, RNG, histories, best weights)."""
        loaded = checkpoints.load()
        barrier()
        if loaded is None:
            return None
        saved, weights, best, optimizer_tensors = loaded
        balancer = {k[len(BALANCER_KEY) :]: weights.pop(k) for k in list(weights) if k.startswith(BALANCER_KEY)}
        self.balancer.load_state_dict(balancer)
        self.runs.load_state_dict(weights)
        restore_rng(optimizer_tensors)
        optimizer_from_tensors(self.optimizer, optimizer_tensors, saved["optimizer"])
        scheduler.last_epoch = saved["step"]  # the optimizer state already holds the matching lr
        source.check_position(saved.get("source", {}))
        state.step, state.epoch, state.batch = saved["step"], saved["epoch"], saved["batch"]
        state.samples, state.bad_evals, state.stopped = saved["samples"], saved["bad_evals"], saved["stopped"]
        for result, run in zip(results, saved["results"]):
            for key, value in run.items():
                setattr(result, key, value)
            result.resumed_from = saved["step"]
        return best
