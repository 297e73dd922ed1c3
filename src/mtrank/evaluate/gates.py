"""Gate analysis: how each task uses the experts, and whether gates have polarised."""

from __future__ import annotations

import torch

POLARIZED_BELOW = 0.01


def gate_report(gate_weights: torch.Tensor, task_names: list[str], threshold: float = POLARIZED_BELOW) -> dict:
    """Per-task expert utilisation and gate entropy from gate weights ``[N, K, E]``.

    Returns a dict with, per task: ``utilisation`` (mean weight of each expert over rows, sums to 1),
    ``entropy`` (mean per-row entropy of the gate distribution, nats), ``max_entropy`` (log E),
    ``polarized_experts`` (experts whose mean utilisation is below ``threshold``) and ``top_expert``.
    """
    weights = gate_weights.double()
    num_experts = weights.shape[-1]
    utilisation = weights.mean(0)  # (K, E)
    entropy = gate_entropy(weights)  # (K,)
    tasks = {}
    for k, name in enumerate(task_names):
        util = utilisation[k]
        tasks[name] = {
            "utilisation": [round(float(u), 6) for u in util],
            "entropy": float(entropy[k]),
            "max_entropy": float(torch.log(torch.tensor(float(num_experts)))),
            "polarized_experts": int((util < threshold).sum()),
            "top_expert": int(util.argmax()),
        }
    return {"num_experts": num_experts, "threshold": threshold, "tasks": tasks}


def gate_entropy(gate_weights: torch.Tensor) -> torch.Tensor:
    """Mean per-row entropy (nats) of each task's gate: ``[..., N, K, E] -> [..., K]`` (log E = uniform,
    0 = one expert takes everything)."""
    weights = gate_weights.double()
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean(-2)


def format_gate_report(report: dict) -> str:
    """The report as a plain-text table (one row per task)."""
    lines = [f"{'task':<16} {'entropy':>8} {'/max':>6} {'<1% experts':>12}  utilisation"]
    for name, t in report["tasks"].items():
        util = " ".join(f"{u:.2f}" for u in t["utilisation"])
        lines.append(f"{name:<16} {t['entropy']:>8.3f} {t['max_entropy']:>6.2f} {t['polarized_experts']:>12d}  {util}")
    return "\n".join(lines)
