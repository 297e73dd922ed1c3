"""Task conflict: do the tasks pull the shared parameters the same way? Per-task gradients, their cosines and
norms, per shared layer and overall, and the trend of both over training.

For tasks ``i, j`` with gradients ``g_i, g_j`` on the parameters both depend on (the *shared* ones):

* cosine ``cos_ij = g_i . g_j / (|g_i| |g_j|)``: 1 = the same direction, 0 = unrelated, < 0 = conflicting (a
  step that lowers one task's loss raises the other's, to first order);
* magnitude ratio ``|g_i| / |g_j|``: far from 1, the larger gradient dominates the shared update (Yu et al. 2020
  name conflict + dominance + high curvature the "tragic triad");
* per layer (each shared module: the embedding table, the shared hidden layer, each expert layer) and overall
  (all shared parameters as one vector: ``G_overall = sum_layers G_layer`` of the Gram matrices ``G_ij = g_i.g_j``).

Which parameters are shared follows from the model config alone (:func:`shared_parameter_masks`): the
embedding, the feature mixer and the shared hidden layer serve every task; an expert serves the tasks whose gates
may use it (:func:`mtrank.nn.routing.expert_layout`, through PLE's levels); towers serve one task each. The same
masks tell gradient surgery (:mod:`mtrank.train.balancing`) where to operate.

The gradients themselves come from :func:`task_gradients` (K backward passes through one retained graph, or one
pass vmapped over the tasks); :func:`gram_matrices` reduces them to ``[K, K]`` per layer (``[R, K, K]`` for R
stacked runs), and :func:`conflict_stats` turns one run's Gram matrices into the report's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtrank.config import ModelConfig
from mtrank.nn.routing import expert_layout

TASK_GRADIENT_MODES = ("loop", "batched")


# ------------------------------------------------------------------------------------------ shared parameters


def _task_usage(config: ModelConfig) -> tuple[list[list[set[int]]], list[list[set[int]]]]:
    """Per level: the tasks each expert serves, and the tasks each gate (row of the level's output) serves."""
    block, k = config.block, config.num_tasks
    levels = block.levels if block.type == "ple" else 1
    layouts = [
        expert_layout(block.type, k, block.num_experts, block.task_experts, last_level=level == levels - 1)
        for level in range(levels)
    ]
    expert_tasks: list[list[set[int]]] = [[] for _ in range(levels)]
    gate_tasks: list[list[set[int]]] = [[] for _ in range(levels)]
    row_tasks: dict[int, set[int]] = {}  # input row of the level above -> the tasks that read it
    for level in reversed(range(levels)):
        owners, allowed, shared_gate = layouts[level]
        gates, experts = allowed.shape
        if level == levels - 1:
            gate = [set(range(k))] if shared_gate else [{g} for g in range(gates)]
        else:  # gate g's output is row g of the next level's input
            gate = [set(row_tasks.get(g, set())) for g in range(gates)]
        served = [set().union(*(gate[g] for g in range(gates) if allowed[g, e])) for e in range(experts)]
        row_tasks = {}
        for e in range(experts):  # at upper levels expert e reads row owners[e], gate g reads row g
            row_tasks.setdefault(int(owners[e]), set()).update(served[e])
        for g in range(gates):
            row_tasks.setdefault(g, set()).update(gate[g])
        expert_tasks[level], gate_tasks[level] = served, gate
    return expert_tasks, gate_tasks


def _slice_mask(shape: torch.Size, served: list[set[int]]) -> torch.Tensor:
    """``[S, 1, ...]`` (one entry per slice of the leading dimension) when the tensor is stacked over the
    ``S = len(served)`` parts, else one value for the whole tensor (shared when any part is)."""
    shared = torch.tensor([len(tasks) >= 2 for tasks in served])
    if len(shape) >= 1 and shape[0] == len(served):
        return shared.view(-1, *([1] * (len(shape) - 1)))
    return shared.any().view(*([1] * len(shape)))


def shared_parameter_masks(
    config: ModelConfig, named_shapes: Iterable[tuple[str, torch.Size]]
) -> dict[str, torch.Tensor]:
    """Which entries of each parameter are shared by two or more tasks, from the model config alone.

    Returns ``name -> bool mask`` broadcastable to the parameter (``[E, 1, 1]`` for an expert bank of which some
    experts are shared, a single value otherwise), for the parameters with at least one shared entry; the
    others (towers, per-task gates) are left out. Stacked runs (``[R, ...]`` parameters of an ensemble): give the
    shapes of one run; a mask broadcasts from the right.

    The embedding, feature mixer and shared hidden layer serve every task; an expert (a gate) serves the tasks
    whose gates may use it (read its output); towers and the bias tower's output rows one task each. A registered
    expert type whose parameters are not stacked on the first dimension is shared as a whole when any of its
    experts is.

    Example:
        >>> from mtrank.model import MultiTaskModel
        >>> config = ModelConfig(inputs={"num_dense": 4}, block={"type": "cgc", "num_experts": 1})
        >>> model = MultiTaskModel(config)
        >>> masks = shared_parameter_masks(config, [(n, p.shape) for n, p in model.named_parameters()])
        >>> masks["block.levels.0.experts.layers.0.weight"].flatten().tolist()  # task 1's, task 2's, shared
        [False, False, True]
    """
    if config.num_tasks < 2:
        return {}
    expert_tasks, gate_tasks = _task_usage(config)
    all_tasks = [set(range(config.num_tasks))]
    bias_tasks = len(config.bias.tasks or [t.name for t in config.tasks if t.type == "binary"])
    masks = {}
    for name, shape in named_shapes:
        parts = name.split(".")
        if name.startswith("block.towers.") or name.startswith("bias_tower.out."):
            continue  # one slice per task
        if name.startswith("block.levels.") and parts[3] in ("experts", "gates"):
            level = int(parts[2])
            served = (expert_tasks if parts[3] == "experts" else gate_tasks)[level]
            mask = _slice_mask(shape, served)
        elif name.startswith("bias_tower."):
            mask = torch.tensor(bias_tasks >= 2).view(*([1] * len(shape)))
        else:  # embedding, mixer, shared hidden layer, anything a future part adds under the block
            mask = _slice_mask(shape, all_tasks)
        if bool(mask.any()):
            masks[name] = mask
    return masks


def shared_layers(masks: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The shared parameters grouped by module (``embedding.table``, ``block.levels.0.experts.layers.1``), in
    order: what the report calls a shared layer."""
    layers: dict[str, list[str]] = {}
    for name in masks:
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return layers


# ------------------------------------------------------------------------------------------ task gradients


def task_gradients(
    losses: torch.Tensor, params: Sequence[torch.Tensor], mode: str = "loop", retain_graph: bool = False
) -> list[torch.Tensor]:
    """Each task's gradient of every parameter: ``losses [..., K]`` -> one ``[K, *p.shape]`` tensor per parameter.

    Leading dimensions of ``losses`` are independent runs (an ensemble's ``[R, K]``): row k is the gradient of
    ``losses[..., k].sum()``, so each run's slice of a stacked parameter holds that run's gradient.

    ``mode``: ``loop`` runs K backward passes through the retained graph (each ~ one ordinary backward);
    ``batched`` runs one backward pass vmapped over the K one-hot cotangents
    (``autograd.grad(..., is_grads_batched=True)``): fewer kernel launches, but vmap's overhead made it 2-3x
    slower than the loop on CPU (benchmarks/balancing_cost.py). A parameter that no loss reaches gets zeros.
    """
    if mode not in TASK_GRADIENT_MODES:
        raise ValueError(f"task gradient mode must be one of {TASK_GRADIENT_MODES}, got {mode!r}")
    k = losses.shape[-1]
    if mode == "batched":
        eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
        cotangents = eye.view(k, *([1] * (losses.dim() - 1)), k).expand(k, *losses.shape)  # (K, ..., K)
        grads = torch.autograd.grad(
            losses, params, cotangents, retain_graph=retain_graph, allow_unused=True, is_grads_batched=True
        )
        return [torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device) if g is None else g for g, p in zip(grads, params)]
    rows = []
    for task in range(k):
        keep = retain_graph or task < k - 1
        rows.append(torch.autograd.grad(losses[..., task].sum(), params, retain_graph=keep, allow_unused=True))
    return [
        torch.stack([torch.zeros_like(p) if row[i] is None else row[i] for row in rows])
        for i, p in enumerate(params)
    ]


def gram_matrices(
    grads: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], layers: dict[str, list[str]], run_dims: int = 0
) -> dict[str, torch.Tensor]:
    """Per shared layer, the Gram matrix ``G_ij = g_i . g_j`` of the task gradients on its shared entries
    (float64), and ``"overall"`` their sum (all shared parameters as one vector).

    ``grads[name]``: ``[K, *runs, *shape]`` (from :func:`task_gradients`); ``run_dims`` leading run dimensions
    after K. Returns ``[*runs, K, K]`` tensors.
    """
    out: dict[str, torch.Tensor] = {}
    for layer, names in layers.items():
        total = None
        for name in names:
            g = grads[name].double() * masks[name]  # (K, *runs, *shape): unshared entries zeroed
            flat = g.flatten(1 + run_dims) if g.dim() > 1 + run_dims else g.unsqueeze(-1)  # (K, *runs, n)
            gram = torch.einsum("i...n,j...n->...ij", flat, flat)  # (*runs, K, K)
            total = gram if total is None else total + gram
        out[layer] = total
    out["overall"] = sum(out.values())
    return out


def _cosines(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # (..., K)
    return gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2)).clamp_min(1e-300)


def pair_name(a: str, b: str) -> str:
    return f"{a}~{b}"


def conflict_stats(grams: dict[str, torch.Tensor], task_names: list[str]) -> dict[str, Any]:
    """One run's Gram matrices (``[K, K]`` per layer) -> the report: per pair of tasks the cosine overall and per
    layer, and the magnitude ratio ``|g_a| / |g_b|`` overall; per task the gradient norm overall and per layer.

    Example:
        >>> gram = torch.tensor([[4.0, -2.0], [-2.0, 1.0]])  # g_a = (2, 0), g_b = (-1, 0)
        >>> stats = conflict_stats({"overall": gram}, ["a", "b"])
        >>> stats["pairs"]["a~b"]["cosine"], stats["pairs"]["a~b"]["norm_ratio"]
        (-1.0, 2.0)
    """
    pairs = {}
    layer_names = [name for name in grams if name != "overall"]
    cosines = {name: _cosines(gram) for name, gram in grams.items()}
    norms = {name: gram.diagonal().clamp_min(0).sqrt() for name, gram in grams.items()}
    for i, j in combinations(range(len(task_names)), 2):
        overall = norms["overall"]
        ratio = float(overall[i] / overall[j]) if overall[j] > 0 else math.inf
        pairs[pair_name(task_names[i], task_names[j])] = {
            "cosine": float(cosines["overall"][i, j]),
            "norm_ratio": ratio,
            "layers": {name: float(cosines[name][i, j]) for name in layer_names},
        }
    tasks = {
        task: {"grad_norm": float(norms["overall"][k]), "layers": {n: float(norms[n][k]) for n in layer_names}}
        for k, task in enumerate(task_names)
    }
    return {"pairs": pairs, "tasks": tasks, "layers": layer_names}


def flat_record(stats: dict[str, Any]) -> dict[str, float]:
    """The report as history / TensorBoard scalars: ``conflict/cosine/<a>~<b>``, ``conflict/norm_ratio/<a>~<b>``,
    ``conflict/cosine/<layer>/<a>~<b>``, ``conflict/grad_norm/<task>``."""
    record = {}
    for pair, values in stats["pairs"].items():
        record[f"conflict/cosine/{pair}"] = values["cosine"]
        record[f"conflict/norm_ratio/{pair}"] = values["norm_ratio"]
        for layer, cosine in values["layers"].items():
            record[f"conflict/cosine/{layer}/{pair}"] = cosine
    for task, values in stats["tasks"].items():
        record[f"conflict/grad_norm/{task}"] = values["grad_norm"]
    return record


def trend(steps: Sequence[float], values: Sequence[float]) -> dict[str, float]:
    """First, last, mean and the least-squares slope per 1,000 steps of a series (NaN entries skipped)."""
    x = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = ~np.isnan(y)
    x, y = x[keep], y[keep]
    if y.size == 0:
        return {"first": math.nan, "last": math.nan, "mean": math.nan, "slope_per_1k_steps": math.nan}
    slope = float(np.polyfit(x, y, 1)[0] * 1000) if y.size >= 2 and np.ptp(x) > 0 else 0.0
    return {"first": float(y[0]), "last": float(y[-1]), "mean": float(y.mean()), "slope_per_1k_steps": slope}


def series_trends(series: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per pair, the trend of the overall cosine and of the magnitude ratio over a list of
    ``{"step": s, **conflict_stats(...)}`` measurements."""
    if not series:
        return {}
    steps = [m["step"] for m in series]
    out = {}
    for pair in series[0]["pairs"]:
        out[pair] = {
            "cosine": trend(steps, [m["pairs"][pair]["cosine"] for m in series]),
            "norm_ratio": trend(steps, [m["pairs"][pair]["norm_ratio"] for m in series]),
        }
    return out


def format_conflict_table(stats: dict[str, Any]) -> str:
    """The report as a plain-text table: one row per pair of tasks, a column per shared layer."""
    layers = stats["layers"]
    short = [layer.replace("block.levels.", "L").replace(".experts.layers.", ".experts.") for layer in layers]
    header = f"{'pair':<28} {'cosine':>8} {'|a|/|b|':>9}" + "".join(f" {s[-22:]:>22}" for s in short)
    lines = [header]
    for pair, values in stats["pairs"].items():
        cells = "".join(f" {values['layers'][layer]:>22.3f}" for layer in layers)
        lines.append(f"{pair:<28} {values['cosine']:>8.3f} {values['norm_ratio']:>9.3g}{cells}")
    return "\n".join(lines)


def plot_conflict(path: str | Path, stats: dict[str, Any], series: list[dict[str, Any]] | None = None) -> None:
    """A figure: per pair, the cosine of each shared layer and overall (bars); with a training series, the
    overall cosine and magnitude ratio over steps beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(stats["pairs"])
    panels = 3 if series else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels, 3.6), squeeze=False)
    axes = axes[0]
    labels = [*stats["layers"], "overall"]
    width = 0.8 / max(1, len(pairs))
    for p, pair in enumerate(pairs):
        values = [*stats["pairs"][pair]["layers"].values(), stats["pairs"][pair]["cosine"]]
        axes[0].bar(np.arange(len(labels)) + p * width, values, width, label=pair)
    axes[0].axhline(0, color="black", linewidth=0.8)
    axes[0].set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
    axes[0].set_xticklabels([label.replace("block.levels.", "L") for label in labels], rotation=30, ha="right")
    axes[0].set_ylabel("gradient cosine")
    axes[0].set_ylim(-1.05, 1.05)
    axes[0].legend(fontsize=7)
    if series:
        steps = [m["step"] for m in series]
        for pair in pairs:
            axes[1].plot(steps, [m["pairs"][pair]["cosine"] for m in series], label=pair)
            axes[2].plot(steps, [m["pairs"][pair]["norm_ratio"] for m in series], label=pair)
        axes[1].axhline(0, color="black", linewidth=0.8)
        axes[1].set_ylabel("overall cosine")
        axes[2].set_ylabel("|g_a| / |g_b|")
        axes[2].set_yscale("log")
        for ax in axes[1:]:
            ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
