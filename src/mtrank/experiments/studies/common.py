"""What the production studies share: a callback that follows the gates over training, curve figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtrank.data.tensors import TensorData
from mtrank.evaluate.gates import model_gate_report
from mtrank.evaluate.report import _pyplot
from mtrank.model import MultiTaskModel
from mtrank.train.callbacks import Callback


def gate_summary(report: dict) -> dict[str, float]:
    """One number per gate statistic, averaged over the tasks of a :func:`~mtrank.evaluate.gates.gate_report`:
    ``gate_entropy`` (nats), ``polarized_experts`` (mean utilisation < 1%), ``top_expert_share`` (the largest
    mean utilisation), ``effective_experts`` (exp of the entropy of the mean utilisation)."""
    tasks = list(report["tasks"].values())
    util = np.asarray([t["utilisation"] for t in tasks], dtype=float)  # (K, E)
    util_entropy = -(util * np.log(np.clip(util, 1e-12, None))).sum(1)  # (K,)
    return {
        "gate_entropy": float(np.mean([t["entropy"] for t in tasks])),
        "polarized_experts": float(np.mean([t["polarized_experts"] for t in tasks])),
        "top_expert_share": float(util.max(1).mean()),
        "effective_experts": float(np.exp(util_entropy).mean()),
    }


class GateTracker(Callback):
    """At every evaluation, the gate statistics (:func:`gate_summary`) of ``model`` on ``probe`` rows, in
    evaluation mode (no gate dropout): ``history = [{"step": s, **stats}, ...]``."""

    def __init__(self, model: MultiTaskModel, probe: TensorData) -> None:
        self.model, self.probe = model, probe
        self.history: list[dict[str, float]] = []

    def on_evaluate(self, step: int, records: list[dict | None]) -> None:
        with torch.no_grad():
            stats = gate_summary(model_gate_report(self.model, self.probe))
        self.history.append({"step": step, **stats})


def plot_arm_curves(
    path: Path, results: dict, curve: str, panels: dict[str, str], arms: list[str] | None = None
) -> None:
    """One panel per ``panels`` key (a statistic in each run's ``curve`` history; value: the panel's title),
    one line per arm (mean over seeds, band ± 1 std), step on x."""
    plt = _pyplot()
    arms = arms or results["arms"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels.items()):
        for arm in arms:
            histories = [run[curve] for run in results["runs"][arm]]
            steps = [h["step"] for h in histories[0]]
            y = np.asarray([[h[key] for h in history] for history in histories], dtype=float)  # (seeds, evals)
            mean, std = y.mean(0), y.std(0)
            ax.plot(steps, mean, label=arm)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_arm_bars(path: Path, results: dict, panels: dict[str, str]) -> None:
    """One panel per metric (``panels``: key -> title): every run as a dot and the mean as a bar, per arm."""
    plt = _pyplot()
    arms = results["arms"]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.9 * len(arms) * len(panels), 3.6), squeeze=False)
    rng = np.random.default_rng(0)  # horizontal jitter only
    for ax, (key, title) in zip(axes[0], panels.items()):
        for i, arm in enumerate(arms):
            v = np.asarray([run["metrics"][key] for run in results["runs"][arm]], dtype=float)
            ax.scatter(i + rng.uniform(-0.12, 0.12, v.size), v, s=12, alpha=0.6, color=f"C{i % 10}")
            ax.hlines(v.mean(), i - 0.3, i + 0.3, color="black", lw=1.5)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
