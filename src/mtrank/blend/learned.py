"""Learned blending (Pinterest Closeup's "learned utility"): per-request task weights from request features.

A small network maps request / user features ``x`` to task weights ``f(x) [K]``; an impression whose task
scores are ``r [K]`` has utility ``g(x, r) = sigmoid(r . f(x) + b)``. It is trained on impression logs
collected while blend weights were randomised (so the logs cover many trade-offs between tasks) with a
reward-weighted cross-entropy and an L2 pull of ``f(x)`` toward the default (production) weights ``w0``:

    loss = mean_i [ -R_i log g(x_i, r_i) - 1[not engaged_i] log(1 - g(x_i, r_i)) ]
           + lambda * mean_i || f(x_i) - w0 ||^2,        lambda = 2 by default

where ``R_i`` is the reward of impression i (its value if engaged, 0 otherwise). At serving only ``f(x)``
runs, once per request, and candidates are ranked by ``r . f(x)`` (the same order as ``g``).

``f(x) = w0 + h(x)`` with ``h``'s last layer initialised at zero, so training starts from the default blend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtrank.artifacts import add_to_manifest
from mtrank.nn import MLP


class LearnedBlend(nn.Module):
    """``x [B, F] -> f(x) [B, K]`` per-request task weights; ``(x, r [B, K]) -> logit of g(x, r) [B]``.

    Args:
        context_dim: F, request features.
        default_weights: ``w0 [K]``, the blend weights ``f`` starts from and is pulled toward.
        hidden: hidden widths of ``h``.

    Example:
        >>> blend = LearnedBlend(context_dim=4, default_weights=[1.0, 1.0])
        >>> blend.task_weights(torch.randn(3, 4)).tolist()  # starts at w0
        [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """

    def __init__(self, context_dim: int, default_weights: list[float], hidden: list[int] | None = None) -> None:
        super().__init__()
        hidden = [32] if hidden is None else hidden
        self.hidden = list(hidden)
        self.register_buffer("default_weights", torch.tensor(default_weights, dtype=torch.float32))
        self.body = MLP(context_dim, hidden)
        self.head = nn.Linear(self.body.output_dim, len(default_weights))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.bias = nn.Parameter(torch.zeros(()))

    def task_weights(self, context: torch.Tensor) -> torch.Tensor:
        """``f(x) = w0 + h(x)``, ``[B, F] -> [B, K]``."""
        return self.default_weights + self.head(self.body(context))

    def forward(self, context: torch.Tensor, task_scores: torch.Tensor) -> torch.Tensor:
        """Logit of ``g(x, r)``: ``r . f(x) + b``, ``[B]``."""
        return (task_scores * self.task_weights(context)).sum(-1) + self.bias


@dataclass
class LearnedBlendConfig:
    """Training of a :class:`LearnedBlend`.

    Args:
        hidden: hidden widths of the weight network.
        l2_pull: lambda, the weight of ``mean ||f(x) - w0||^2``.
        lr: Adam learning rate; epochs / batch_size: passes over the logs and rows per step.
        seed: initialisation and shuffling.
    """

    hidden: list[int] = field(default_factory=lambda: [32])
    l2_pull: float = 2.0
    lr: float = 1e-2
    epochs: int = 20
    batch_size: int = 512
    seed: int = 0


def learned_blend_loss(
    model: LearnedBlend,
    context: torch.Tensor,
    task_scores: torch.Tensor,
    engaged: torch.Tensor,
    reward: torch.Tensor,
    l2_pull: float,
) -> torch.Tensor:
    """Reward-weighted cross-entropy plus ``l2_pull * mean ||f(x) - w0||^2`` (see the module docstring)."""
    logits = model(context, task_scores)
    log_g = nn.functional.logsigmoid(logits)
    log_not_g = nn.functional.logsigmoid(-logits)
    cross_entropy = -(reward * log_g + (1.0 - engaged) * log_not_g).mean()
    pull = ((model.task_weights(context) - model.default_weights) ** 2).sum(-1).mean()
    return cross_entropy + l2_pull * pull


def train_learned_blend(
    context: torch.Tensor,
    task_scores: torch.Tensor,
    engaged: torch.Tensor,
    reward: torch.Tensor,
    default_weights: list[float],
    config: LearnedBlendConfig | None = None,
) -> tuple[LearnedBlend, list[float]]:
    """Fit a :class:`LearnedBlend` on impression logs; returns the model and the loss of each epoch.

    Args:
        context: ``[N, F]`` request features of each impression; task_scores: ``[N, K]`` its task scores.
        engaged: ``[N]`` 1 for a positive engagement; reward: ``[N]`` its value (0 when not engaged).
        default_weights: ``w0``.
    """
    config = config or LearnedBlendConfig()
    if task_scores.shape[1] != len(default_weights):
        raise ValueError(
            f"default_weights: {len(default_weights)} weights for {task_scores.shape[1]} tasks in the logs"
        )
    torch.manual_seed(config.seed)
    model = LearnedBlend(context.shape[1], default_weights, config.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    history = []
    for _ in range(config.epochs):
        order = torch.randperm(len(context), generator=gen)
        total, batches = 0.0, 0
        for idx in order.split(config.batch_size):
            loss = learned_blend_loss(model, context[idx], task_scores[idx], engaged[idx], reward[idx], config.l2_pull)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        history.append(total / batches)
    return model.eval(), history


# ------------------------------------------------------------------------------------- in a model directory

LEARNED_BLEND_FILE = "learned_blend.json"
LEARNED_BLEND_WEIGHTS = "learned_blend.safetensors"
FORMAT_VERSION = 1


class ServedLearnedBlend:
    """A trained :class:`LearnedBlend` with what the service needs: which request-context fields are its
    inputs ``x`` (numbers, in order) and which task each output weight belongs to.

    ``weights(context)`` runs ``f(x)`` once per request; candidates are then ranked by the weighted sum of
    their task scores with those weights (the order of ``g(x, r)``, see the module docstring). The task scores
    must be in the space the logs recorded: the service's per-task scores (probabilities for binary tasks).
    """

    def __init__(self, model: LearnedBlend, context_features: list[str], tasks: list[str]) -> None:
        if len(tasks) != model.default_weights.numel():
            raise ValueError(f"learned blend: {model.default_weights.numel()} weights for {len(tasks)} tasks")
        self.model, self.context_features, self.tasks = model.eval(), list(context_features), list(tasks)

    def weights(self, context: dict) -> dict[str, float]:
        """Task weights for a request's ``context``; a ``ValueError`` names a missing or non-numeric field."""
        values = []
        for name in self.context_features:
            if name not in context:
                raise ValueError(f"context: missing {name!r}, an input of the learned blend ({self.context_features})")
            value = context[name]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"context: {name!r} has {value!r}; the learned blend needs a finite number")
            values.append(float(value))
        with torch.no_grad():
            w = self.model.task_weights(torch.tensor([values], dtype=torch.float32))[0]
        return dict(zip(self.tasks, w.tolist()))

    def save(self, directory: str | Path) -> Path:
        """Write ``learned_blend.json`` (inputs, tasks, sizes) and ``learned_blend.safetensors`` into a model dir."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, directory / LEARNED_BLEND_WEIGHTS)
        meta = {
            "format_version": FORMAT_VERSION,
            "context_features": self.context_features,
            "tasks": self.tasks,
            "hidden": self.model.hidden,
            "default_weights": self.model.default_weights.tolist(),
        }
        (directory / LEARNED_BLEND_FILE).write_text(json.dumps(meta, indent=2))
        add_to_manifest(directory, [directory / LEARNED_BLEND_WEIGHTS, directory / LEARNED_BLEND_FILE])
        return directory / LEARNED_BLEND_FILE

    @classmethod
    def load(cls, directory: str | Path) -> ServedLearnedBlend | None:
        """The learned blend of a model directory, or None when it has none; errors name the file."""
        path = Path(directory) / LEARNED_BLEND_FILE
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
            model = LearnedBlend(len(meta["context_features"]), meta["default_weights"], meta["hidden"])
            model.load_state_dict(load_file(str(Path(directory) / LEARNED_BLEND_WEIGHTS)))
        except Exception as err:  # noqa: BLE001 - any unreadable file: say which and why
            raise ValueError(f"{path}: cannot load the learned blend ({err})") from None
        return cls(model, meta["context_features"], meta["tasks"])
