"""Tables and figures: Markdown tables of mean ± std, loss curves with bands, gate heatmaps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), ignoring NaN."""
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def fmt_mean_std(values: list[float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are str()-ed, floats to 4 decimals."""

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=float))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    path: str | Path,
    panels: dict[str, dict[str, tuple[list[float], list[list[float]]]]],
    ylabel: str = "loss",
    xlabel: str = "step",
    logy: bool = True,
    band: str = "std",
) -> None:
    """One panel per key of ``panels``; in each, one line per series (mean over runs) with a band.

    ``panels[title][series] = (x, runs)`` where ``runs`` is a list of per-run y-lists aligned with ``x``.
    ``band``: ``"std"`` (mean ± 1 std of the runs) or ``"ci95"`` (95% confidence interval of the mean,
    mean ± 1.96 std / sqrt(runs): where two series' bands do not overlap, their means differ).
    """
    if band not in ("std", "ci95"):
        raise ValueError(f"band must be 'std' or 'ci95', not {band!r}")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for name, (x, runs) in series.items():
            y = np.asarray(runs, dtype=float)
            mean, half = y.mean(0), y.std(0)
            if band == "ci95":
                half = 1.96 * y.std(0, ddof=1) / np.sqrt(len(y)) if len(y) > 1 else np.zeros_like(mean)
            low = mean - half
            if logy:  # a band below zero has no place on a log axis: clip it to the smallest run
                low = np.maximum(low, y.min(0))
            ax.plot(x, mean, label=name)
            ax.fill_between(x, low, mean + half, alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gate_heatmaps(path: str | Path, heatmaps: dict[str, tuple[np.ndarray, list[str]]], columns: int = 2) -> None:
    """One heatmap per key: ``(utilisation [K, E], task_names)``, tasks x experts, annotated; ``columns`` a row."""
    plt = _pyplot()
    columns = min(columns, len(heatmaps))
    rows = -(-len(heatmaps) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 2.0 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(heatmaps) :]:
        ax.axis("off")
    for ax, (title, (util, names)) in zip(axes.flat, heatmaps.items()):
        image = ax.imshow(util, vmin=0, vmax=max(0.5, float(util.max())), cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(util.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(title, fontsize=9)
        for (k, e), value in np.ndenumerate(util):
            ax.text(e, k, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w" if value < 0.3 else "k")
        fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_histograms(
    path: str | Path, panels: dict[str, dict[str, list[float]]], xlabel: str = "test loss", columns: int = 0
) -> None:
    """One panel per key (``columns`` per row; 0: all in one row); overlaid histograms of values per series
    (e.g. final loss over repeated runs)."""
    plt = _pyplot()
    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, series) in zip(axes.flat, panels.items()):
        values = np.concatenate([np.asarray(v, dtype=float) for v in series.values()])
        bins = np.linspace(np.nanmin(values), np.nanpercentile(values, 99), 30)
        for name, v in series.items():
            ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, alpha=0.5, label=name)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
    axes.flat[min(columns, len(panels)) - 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_runs(
    path: str | Path,
    panels: dict[str, dict[str, list[float]]],
    reference: dict[str, dict[str, float]] | None = None,
    ylabel: str = "test AUC",
    reference_label: str = "paper (mean)",
    outlier_iqr: float = 3.0,
) -> None:
    """One panel per key; per series, every run as a dot and the mean as a bar, beside an optional reference.

    ``panels[title][series]`` = one value per run; ``reference[title][series]`` a published number. Runs more
    than ``outlier_iqr`` interquartile ranges below the panel's first quartile (a collapsed run) would flatten
    the rest: they are drawn on the axis' lower edge as open triangles and counted.
    """
    plt = _pyplot()
    width = 1.2 + 1.3 * max(map(len, panels.values())) * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.4), squeeze=False)
    rng = np.random.default_rng(0)  # horizontal jitter only
    for ax, (title, series) in zip(axes[0], panels.items()):
        refs = (reference or {}).get(title, {})
        values = np.concatenate([np.asarray(v, dtype=float) for v in series.values()])
        q1, q3 = np.nanquantile(values, [0.25, 0.75])
        lo = max(float(np.nanmin(values)), q1 - outlier_iqr * (q3 - q1))
        hi = float(np.nanmax(values))
        if refs:
            lo, hi = min(lo, min(refs.values())), max(hi, max(refs.values()))
        pad = 0.08 * max(hi - lo, 1e-4)
        bottom = lo - pad
        for i, (name, v) in enumerate(series.items()):
            v = np.asarray(v, dtype=float)
            x = i + rng.uniform(-0.12, 0.12, v.size)
            inside = v >= bottom
            ax.scatter(x[inside], v[inside], s=12, alpha=0.6, color=f"C{i}")
            if (~inside).any():
                ax.scatter(x[~inside], np.full((~inside).sum(), bottom), marker="v", facecolors="none", color=f"C{i}")
                note = f"{(~inside).sum()} below: " + ", ".join(f"{u:.3f}" for u in np.sort(v[~inside]))
                ax.annotate(note, (i, bottom), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
            ax.hlines(np.nanmean(v), i - 0.3, i + 0.3, color="black", lw=1.5)
            if name in refs:
                ax.scatter([i], [refs[name]], marker="x", color="red", s=40, zorder=3, label=reference_label)
        ax.set_xticks(range(len(series)), list(series), rotation=15, fontsize=8)
        ax.set_ylim(bottom, hi + pad)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles[:1], labels[:1], fontsize=7, loc="best")
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
