"""The one training step: zero the gradients, forward (autocast), loss, backward, clip, optimizer step.

Eager, or recorded once in a CUDA graph and replayed (:mod:`mtrank.train.cuda_graph`): the graph records this
very function, so the two paths cannot drift apart. Whatever the loop trains (one model, a data-parallel
model, an ensemble of R stacked runs) it gives the step a :class:`~mtrank.train.loop.Runs` and a way to turn
a batch key (row indices, or a streamed batch) into tensors.

With ``train.compile`` the forward and the loss (autocast casts, the towers' and the loss's elementwise work)
are one ``torch.compile``d function (:meth:`TrainStep.forward_losses`); AOTAutograd compiles its backward. Only
full batches take it: the compiled code is specialised to their shapes, and a short batch (an epoch's last)
runs the same function eagerly instead of recompiling. In the CUDA-graph step the compilation happens in the
eager warm-up steps on the side stream, so the capture records the compiled kernels.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

from mtrank.config import CompileConfig, TrainConfig
from mtrank.data.tensors import TensorData
from mtrank.train.balancing import Balancer, make_balancer
from mtrank.train.cuda_graph import GraphedStep
from mtrank.train.losses import BatchLosses, batch_losses


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error saying what to use."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


class TrainStep:
    """One optimisation step on a batch key; returns ``(loss per run [R] or [], loss per task [R, K] or [K])``.

    Args:
        runs: what is trained (:class:`~mtrank.train.loop.Runs`): ``forward(batch) -> (task logits, aux loss)``,
            ``binary_mask``, ``task_weights``, ``funnel`` (a :class:`~mtrank.train.losses.FunnelSpec` or None),
            ``clip_gradients(max_norm)``.
        optimizer: over ``runs.parameters()`` (capturable when graphed).
        config: precision, gradient clipping and distillation settings.
        batch_of: batch key -> :class:`TensorData` (e.g. ``data.take(index)``, a gather the graph records too).
        is_full: which keys are full batches (only those are replayed from the graph).
        graphed: capture the step in a CUDA graph.
        balancer: how the task losses become the update (:mod:`mtrank.train.balancing`); default from
            ``config.balancing``.
    """

    def __init__(
        self,
        runs: Any,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        batch_of: Callable[[Any], TensorData],
        is_full: Callable[[Any], bool],
        graphed: bool = False,
        balancer: Balancer | None = None,
    ) -> None:
        self.runs, self.optimizer, self.config, self.batch_of, self.is_full = runs, optimizer, config, batch_of, is_full
        self.balancer = balancer if balancer is not None else make_balancer(config, runs)
        self.device = runs.device
        self.use_bf16 = config.precision == "bf16" and bf16_supported(self.device)
        self.graph: GraphedStep | None = None
        options = config.compile_options
        # a balancer that takes each task's gradient backpropagates through the compiled graph more than once
        retains = bool(self.balancer.eager_reason)
        self.compiled = compile_step(self.forward_losses, options, retains) if options is not None else None
        self.compiled_steps = 0  # steps whose forward + loss ran compiled (a graph replay is not counted)
        if graphed:
            self.graph = GraphedStep(self.eager, is_full, lambda: optimizer.zero_grad(set_to_none=True), self.device)

    def eager(self, key: Any, set_to_none: bool | None = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step itself. ``set_to_none=None`` leaves the gradients alone (what a graph capture records)."""
        if set_to_none is not None:
            self.optimizer.zero_grad(set_to_none=set_to_none)
        batch = self.batch_of(key)
        if self.compiled is not None and self.is_full(key):
            self.compiled_steps += 1
            losses = self.compiled(batch)
        else:
            losses = self.forward_losses(batch)
        self.balancer.backward(losses)  # runs are independent: each run's gradient is its own loss's
        if self.config.grad_clip > 0:
            self.runs.clip_gradients(self.config.grad_clip)
        self.optimizer.step()
        return losses.total.detach(), losses.per_task.detach(), losses.present

    def forward_losses(self, batch: TensorData) -> BatchLosses:
        """Forward under autocast, then the batch's losses: what ``train.compile`` compiles."""
        cfg = self.config
        # autocast's weight-cast cache must be off while a CUDA graph is captured (PyTorch CUDA-graph notes)
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16, cache_enabled=self.graph is None
        ):
            task_logits, aux_loss = self.runs.forward(batch)
        return batch_losses(
            task_logits,  # with a funnel's training columns after the K task logits
            aux_loss,
            batch.labels,
            self.runs.binary_mask,
            self.runs.task_weights,
            batch.weights,
            batch.teacher,
            cfg.distill,
            cfg.distill_weight,
            self.runs.funnel,  # dependent tasks: entire-space losses (ESMM, ESCM2, AITM)
        )

    def __call__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One step; returns the fixed-weight loss and the per-task losses (what the history reports)."""
        total, per_task, present = self.graph(key) if self.graph is not None else self.eager(key)
        self.balancer.observe(per_task, present)  # outside the graph: the methods' state updates
        return total, per_task


def compile_step(method: Callable, options: CompileConfig, retain_graph: bool = False) -> Callable:
    """``torch.compile`` of a bound method of one step, as ``options`` say, never with inductor's own CUDA graphs
    (the step's graph is ours; the mode is inductor's only).

    Dynamo keeps its compiled versions per code object, at most ``torch._dynamo.config.recompile_limit`` (8) of
    them, then silently runs the code eagerly; a process that builds many models (a tuning run, a study) would
    reach that limit. So each step compiles its own copy of the method's code object: its one version (the full
    batch's shapes) cannot crowd out another step's, and it is freed with the step. Inductor's FX-graph cache
    still serves a graph compiled before, so a rebuilt step of the same architecture compiles faster.
    ``retain_graph``: the backward may run several times (per-task gradients), which AOTAutograd's donated
    buffers forbid: they are turned off for this function.
    """
    compiled = compile_function(method.__func__, options, bind=method.__self__)
    if not retain_graph:
        return compiled

    def without_donated_buffers(*args: Any) -> Any:
        with torch._functorch.config.patch(donated_buffer=False):
            return compiled(*args)

    return without_donated_buffers


def compile_function(function: Callable, options: CompileConfig, bind: Any = None) -> Callable:
    """``torch.compile`` of ``function`` (bound to ``bind`` when given) with its own copy of the code object,
    as ``options`` say (inductor's mode, never its CUDA graphs); see :func:`compile_step`."""
    own = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__)
    mode = options.mode if options.backend == "inductor" and options.mode != "default" else None
    target = own if bind is None else types.MethodType(own, bind)
    return torch.compile(target, backend=options.backend, mode=mode, dynamic=options.dynamic)
