"""Task conflict: do the tasks pull the shared parameters the same way? Per-task gradients, their cosines and
norms, per shared layer and overall, and the trend of both over training.

For tasks ``i, j`` with gradients ``g_i, g_j`` on the parameters both depend on (the *shared* ones):

* cosine ``cos_ij = g_i . g_j / (|g_i| |g_j|)``: 1 = the same direction, 0 = unrelated, < 0 = conflicting (a
  step that lowers one task's loss raises the other's, to first order);
* magnitude ratio ``|g_i| / |g_j|``: far from 1, the larger gradient dominates the shared update (Yu et al. 2020
  name conflict + dominance + high curvature the "tragic triad");
* per layer (each shared module: the embedding table, the shared hidden layer, each expert layer) and overall
  (all shared parameters as one vector: ``G_overall = sum_layers G_layer`` of the Gram matrices ``G_ij = g_i.g_j``).

Which parameter entries are shared is read off the tasks' gradients (:func:`shared_parameter_masks`): the
embedding and the shared hidden layer serve every task, an expert the tasks whose gates use it, a tower one task.
The same masks tell gradient surgery (:mod:`mtrank.train.balancing`) where to operate.

The gradients themselves come from :func:`task_gradients` (K backward passes through one retained graph, or one
pass vmapped over the tasks); :func:`gram_matrices` reduces them to ``[K, K]`` per layer (``[R, K, K]`` for R
stacked runs), and :func:`conflict_stats` turns one run's Gram matrices into the report's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

TASK_GRADIENT_MODES = ("loop", "batched")


# ------------------------------------------------------------------------------------------ shared parameters


def shared_parameter_masks(grads: dict[str, torch.Tensor], run_dims: int = 0) -> dict[str, torch.Tensor]:
    """Which entries of each parameter two or more tasks reach, read off the tasks' own gradients.

    ``grads[name]``: ``[K, *runs, *shape]`` (from :func:`task_gradients` on one batch, ``run_dims`` leading run
    dimensions after K). A parameter stacked over parts (``[G, ...]`` with three or more dimensions per run: an
    expert bank, the gates, the towers) is judged per part, anything else (embedding table, shared hidden layer)
    as a whole; a task reaches a part when its gradient there is not all zero (in any run). Returns
    ``name -> bool mask`` broadcastable to one run's parameter (``[G, 1, 1]`` or ``[1, ...]``), for the
    parameters with a shared entry: towers and per-task gates drop out, an expert is shared when two gates use it
    (MMoE's every expert, CGC's and PLE's shared ones; STEM's detached experts are not).

    Read from gradients rather than from the config, this holds for every block type, including registered
    ones. A part no row of the batch routed to a second task (top-k gates) counts as unshared for that batch.

    Example:
        >>> g = torch.zeros(2, 3, 4, 5)  # K = 2 tasks, an expert bank of 3
        >>> g[0, :2], g[1, 1:] = 1.0, 1.0  # task 0 uses experts 0 and 1, task 1 experts 1 and 2
        >>> shared_parameter_masks({"experts.weight": g})["experts.weight"].flatten().tolist()
        [False, True, False]
    """
    masks = {}
    for name, grad in grads.items():
        shape = grad.shape[1 + run_dims :]
        reached = grad.detach().ne(0).movedim(0, -1)  # (*runs, *shape, K)
        reached = reached.flatten(0, run_dims - 1).any(0) if run_dims else reached  # (*shape, K)
        if len(shape) >= 3:
            used = reached.flatten(1, -2).any(1)  # (G, K)
            mask = (used.sum(-1) >= 2).view(-1, *([1] * (len(shape) - 1)))
        else:
            used = reached.reshape(-1, reached.shape[-1]).any(0)  # (K,)
            mask = (used.sum() >= 2).view(*([1] * len(shape)))
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
        return [
            torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device) if g is None else g for g, p in zip(grads, params)
        ]
    rows = []
    for task in range(k):
        keep = retain_graph or task < k - 1
        rows.append(torch.autograd.grad(losses[..., task].sum(), params, retain_graph=keep, allow_unused=True))
    return [
        torch.stack([torch.zeros_like(p) if row[i] is None else row[i] for row in rows]) for i, p in enumerate(params)
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


def series_from_history(history: list[dict]) -> list[dict[str, Any]]:
    """The overall cosine and magnitude ratio per pair at each history record that has them (training with
    ``train.balancing.conflict_every``), as ``[{"step", "pairs": {pair: {"cosine", "norm_ratio"}}}]``."""
    series = []
    for record in history:
        pairs = {
            key.split("/", 2)[2]: {
                "cosine": value,
                "norm_ratio": record.get(f"conflict/norm_ratio/{key.split('/', 2)[2]}"),
            }
            for key, value in record.items()
            if key.startswith("conflict/cosine/") and key.count("/") == 2
        }
        if pairs:
            series.append({"step": record["step"], "pairs": pairs})
    return series


def trend_table(series: list[dict[str, Any]]) -> str:
    """Markdown: per pair, the overall cosine and magnitude ratio first / last / mean and slope per 1k steps."""
    rows = [
        "| pair | cosine first | last | mean | slope /1k steps | abs(g_a)/abs(g_b) first | last |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair, values in series_trends(series).items():
        c, r = values["cosine"], values["norm_ratio"]
        rows.append(
            f"| {pair} | {c['first']:.3f} | {c['last']:.3f} | {c['mean']:.3f} | {c['slope_per_1k_steps']:+.3f} "
            f"| {r['first']:.3g} | {r['last']:.3g} |"
        )
    return "\n".join(rows)


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


def plot_conflict(path: str | Path, stats: dict[str, Any] | None, series: list[dict[str, Any]] | None = None) -> None:
    """A figure: per pair, the cosine of each shared layer and overall (bars, from ``stats``); with a training
    series, the overall cosine and magnitude ratio over steps beside it (either may be None)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(stats["pairs"] if stats else series[0]["pairs"])
    panels = (1 if stats else 0) + (2 if series else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels, 3.6), squeeze=False)
    axes = list(axes[0])
    if stats:
        bars = axes.pop(0)
        labels = [*stats["layers"], "overall"]
        width = 0.8 / max(1, len(pairs))
        for p, pair in enumerate(pairs):
            values = [*stats["pairs"][pair]["layers"].values(), stats["pairs"][pair]["cosine"]]
            bars.bar(np.arange(len(labels)) + p * width, values, width, label=pair)
        bars.axhline(0, color="black", linewidth=0.8)
        bars.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
        bars.set_xticklabels([label.replace("block.levels.", "L") for label in labels], rotation=30, ha="right")
        bars.set_ylabel("gradient cosine")
        bars.set_ylim(-1.05, 1.05)
        bars.legend(fontsize=7)
    if series:
        steps = [m["step"] for m in series]
        for pair in pairs:
            axes[0].plot(steps, [m["pairs"][pair]["cosine"] for m in series], label=pair)
            axes[1].plot(steps, [m["pairs"][pair]["norm_ratio"] for m in series], label=pair)
        axes[0].axhline(0, color="black", linewidth=0.8)
        axes[0].set_ylabel("overall gradient cosine")
        axes[0].set_ylim(-1.05, 1.05)
        axes[1].set_ylabel("|g_a| / |g_b|")
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=7)
        for ax in axes:
            ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_section(history: list[dict], directory: str | Path, figure: str = "conflict.png") -> str:
    """The training report's "Task conflict" section (markdown, with ``directory/figure`` drawn), or "" when
    the history holds no conflict measurements."""
    series = series_from_history(history)
    if not series:
        return ""
    plot_conflict(Path(directory) / figure, None, series)
    return (
        "## Task conflict\n\nCosine of the tasks' gradients on the shared parameters and their magnitude ratio, "
        "measured every `train.balancing.conflict_every` steps on that step's batch (last measurement before each "
        f"evaluation):\n\n{trend_table(series)}\n\n![task conflict]({figure})\n"
    )
