"""Gate analysis: how each task uses the experts, whether gates have polarised, and whether the experts are
healthy (HoME's expert-health metrics: dead units, output scales, shared experts taken over by one task)."""

from __future__ import annotations

import math

import torch

from mtrank.data.tensors import TensorData
from mtrank.model import MultiTaskModel

POLARIZED_BELOW = 0.01
OCCUPIED_ABOVE = 0.8  # a shared expert is occupied when one task gives it this share of all its gate weight
ACTIVE_ABOVE = 1e-6  # a gate weight above this counts as an active expert (sparse gates: top-k, DSelect-k)


def gate_report(
    gate_weights: torch.Tensor,
    task_names: list[str],
    threshold: float = POLARIZED_BELOW,
    experts: list[dict] | None = None,
) -> dict:
    """Per-task expert utilisation and gate entropy from gate weights ``[N, K, E]``.

    Returns a dict with, per task: ``utilisation`` (mean weight of each expert over rows; sums to 1, or less
    for a DSelect-k gate still on unreachable codes), ``entropy`` (mean per-row entropy of the gate
    distribution, nats), ``max_entropy`` (log E), ``polarized_experts`` (experts whose mean utilisation is below
    ``threshold``), ``active_experts`` (mean number of experts with a nonzero weight per row: the sparsity of
    top-k and DSelect-k gates) and ``top_expert``. ``experts``: the expert-health section of every level
    (:func:`expert_health`), added as ``report["experts"]``.
    """
    weights = gate_weights.double()
    num_experts = weights.shape[-1]
    utilisation = weights.mean(0)  # (K, E)
    entropy = gate_entropy(weights)  # (K,)
    active = (weights > ACTIVE_ABOVE).sum(-1).double().mean(0)  # (K,)
    tasks = {}
    for k, name in enumerate(task_names):
        util = utilisation[k]
        tasks[name] = {
            "utilisation": [round(float(u), 6) for u in util],
            "entropy": float(entropy[k]),
            "max_entropy": float(torch.log(torch.tensor(float(num_experts)))),
            "polarized_experts": int((util < threshold).sum()),
            "active_experts": float(active[k]),
            "top_expert": int(util.argmax()),
        }
    report = {"num_experts": num_experts, "threshold": threshold, "tasks": tasks}
    if experts is not None:
        report["experts"] = experts
    return report


def gate_entropy(gate_weights: torch.Tensor) -> torch.Tensor:
    """Mean per-row entropy (nats) of each task's gate: ``[..., N, K, E] -> [..., K]`` (log E = uniform,
    0 = one expert takes everything)."""
    weights = gate_weights.double()
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean(-2)


class ExpertStats:
    """Running sums over batches of one level's expert outputs ``[E, B, D]`` and gate weights ``[B, G, E]``."""

    def __init__(self) -> None:
        self.rows = 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, expert_out: torch.Tensor, gate_weights: torch.Tensor) -> None:
        out = expert_out.double()
        batch = {
            "zeros": (out == 0).sum((1, 2)).double(),  # (E,) exactly-zero activations (ReLU's dead units)
            "total": out.sum((1, 2)),  # (E,)
            "squares": out.square().sum((1, 2)),  # (E,)
            "gates": gate_weights.double().sum(0),  # (G, E)
        }
        for key, value in batch.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.rows += expert_out.shape[1]


def expert_health(
    stats: ExpertStats,
    width: int,
    gate_names: list[str],
    allowed: torch.Tensor | None = None,
    occupied_above: float = OCCUPIED_ABOVE,
) -> dict:
    """HoME's expert-health metrics (Wang et al. 2024, Sec. 3) of one level, from :class:`ExpertStats`.

    * ``zero_activation_ratio[e]``: share of expert e's output units that are exactly 0 over the rows
      (HoME saw ReLU experts above 90%: expert collapse);
    * ``output_mean[e]``, ``output_rms[e]``: the scale of each expert's output; ``scale_spread`` = largest /
      smallest RMS across experts (None if an expert is all zeros; 1 = every expert at the same scale);
    * shared-expert occupancy: for every expert that two or more task (or group) gates may use,
      ``occupancy[gate]`` = that gate's share of all the weight the expert gets; ``occupied`` when one gate
      holds more than ``occupied_above`` of it (HoME's expert degradation: a shared expert serving one task).

    Args:
        stats: the level's running sums.
        width: D, units per expert output.
        gate_names: a name per gate row (``shared`` gates are not tasks and are left out of occupancy).
        allowed: ``[G, E]`` which experts each gate may use (None: those it gave any weight).
    """
    zeros, total, squares, gate_sums = (stats.sums[key] for key in ("zeros", "total", "squares", "gates"))
    count = stats.rows * width
    rms = (squares / count).sqrt()
    smallest = float(rms.min())
    usable = (gate_sums > 0) if allowed is None else allowed.to(gate_sums.device)
    task_rows = [g for g, name in enumerate(gate_names) if name != "shared"]
    occupancy = []
    for e in range(zeros.shape[0]):
        users = [g for g in task_rows if bool(usable[g, e])]
        if len(users) < 2:
            continue
        shares = gate_sums[users, e] / gate_sums[users, e].sum().clamp_min(1e-300)
        top = int(shares.argmax())
        occupancy.append(
            {
                "expert": e,
                "shares": {gate_names[g]: round(float(s), 6) for g, s in zip(users, shares)},
                "top_gate": gate_names[users[top]],
                "top_share": float(shares[top]),
                "occupied": bool(shares[top] > occupied_above),
            }
        )
    return {
        "zero_activation_ratio": [round(float(z), 6) for z in zeros / count],
        "output_mean": [float(t) for t in total / count],
        "output_rms": [float(r) for r in rms],
        "scale_spread": None if smallest == 0 else float(rms.max()) / smallest,
        "dead_experts": int((zeros == count).sum()),
        "shared_occupancy": occupancy,
        "occupied_shared_experts": sum(o["occupied"] for o in occupancy),
    }


def model_gate_report(
    model: MultiTaskModel, data: TensorData, batch_size: int = 8192, threshold: float = POLARIZED_BELOW
) -> dict:
    """The gate report of any model on a split: :func:`gate_report` of the last level's task gates, with the
    expert health of every level (:func:`expert_health`) under ``"experts"`` (bottom level first)."""
    device = model.device
    levels: list[ExpertStats] = []
    last_gates = []
    widths = []
    for start in range(0, len(data), batch_size):
        part = data[start : start + batch_size]
        trace = model.expert_trace(part.dense.to(device), part.sparse.to(device))
        if not levels:
            levels = [ExpertStats() for _ in trace]
            widths = [out.shape[-1] for out, _ in trace]
        for stats, (expert_out, gate_weights) in zip(levels, trace):
            stats.add(expert_out.float().cpu(), gate_weights.float().cpu())
        last_gates.append(trace[-1][1].float().cpu())
    if not levels:
        raise ValueError("cannot report gates on an empty split")
    names = model.level_gate_names()
    health = []
    for index, (stats, level) in enumerate(zip(levels, model.block.levels)):
        allowed = getattr(level.gates, "allowed", None)
        if allowed is not None and level.shared_gate:
            allowed = allowed.expand(len(names[index]), -1)
        health.append(expert_health(stats, widths[index], names[index], allowed))
    gate_weights = torch.cat(last_gates)[:, : len(model.task_names)]
    return gate_report(gate_weights, model.task_names, threshold, health)


def format_gate_report(report: dict) -> str:
    """The report as a plain-text table (one row per task), then each level's expert health, if present."""
    lines = [f"{'task':<16} {'entropy':>8} {'/max':>6} {'<1% experts':>12} {'active':>7}  utilisation"]
    for name, t in report["tasks"].items():
        util = " ".join(f"{u:.2f}" for u in t["utilisation"])
        active = t.get("active_experts", math.nan)
        lines.append(
            f"{name:<16} {t['entropy']:>8.3f} {t['max_entropy']:>6.2f} {t['polarized_experts']:>12d} {active:>7.2f}"
            f"  {util}"
        )
    for index, level in enumerate(report.get("experts", [])):
        spread = level["scale_spread"]
        zeros = " ".join(f"{z:.2f}" for z in level["zero_activation_ratio"])
        lines.append(
            f"level {index}: zero activations {zeros} | scale spread "
            f"{'inf' if spread is None else f'{spread:.2f}'} | occupied shared experts "
            f"{level['occupied_shared_experts']}/{len(level['shared_occupancy'])}"
        )
    return "\n".join(lines)
