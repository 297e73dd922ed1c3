"""The optimiser, its learning-rate schedule and gradient clipping: one definition for every training path."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from mtrank.config import TrainConfig


def make_optimizer(
    params: Iterable[torch.Tensor], config: TrainConfig, device: torch.device, capturable: bool = False
) -> torch.optim.Optimizer:
    """Adam / AdamW over ``params``, fused on CPU and CUDA: the same update arithmetic in single runs,
    ensembles, eager and graphed steps.

    ``capturable``: the step can be recorded in a CUDA graph (step counters on the device). On CUDA with float32
    parameters the learning rate is a float32 GPU tensor that a schedule updates in place, so a captured graph,
    which reads it at every replay, follows the schedule (the fused kernel takes a tensor lr with float32
    parameters only; other dtypes keep a float lr, and :func:`~mtrank.train.cuda_graph.cuda_graph_plan` then
    refuses schedules).
    """
    params = list(params)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if capturable:
        kwargs["capturable"] = True
    if device.type in ("cuda", "cpu"):
        kwargs["fused"] = True  # one kernel for all parameters instead of ~8 ops per tensor (CPU: ~2x less time)
    if device.type == "cuda" and all(p.dtype == torch.float32 for p in params):
        kwargs["lr"] = torch.tensor(float(config.lr), dtype=torch.float32, device=device)
    return cls(params, **kwargs)


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
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


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> None:
    """Scale the gradients of ``params`` to global L2 norm <= ``max_norm`` (no host sync: capturable)."""
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def clip_gradients_per_run(params: list[torch.Tensor], max_norm: float) -> None:
    """:func:`clip_gradients` for R runs stacked on the first dimension of every parameter: each run's
    gradients are scaled by its own global norm, ``min(1, max_norm / (norm_r + 1e-6))``, exactly as
    ``clip_grad_norm_`` scales a single run's (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    squares = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)  # (R,)
    scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)  # (R,)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
