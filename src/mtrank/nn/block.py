"""The multi-task block: (shared hidden layer) -> extraction level(s) of experts and gates -> task towers.

Shared-Bottom, Single-task, OMoE, MMoE, CGC, PLE, AdaTT, HoME and STEM are configurations of this one block;
they differ only in how many experts there are, what each expert and gate reads and which experts each gate
may use (:func:`mtrank.nn.routing.block_layouts`), how many levels are stacked, and whether each gate's own
experts are added beside its mixture (:mod:`mtrank.nn.residual`). Experts and gates are any registered types
(:mod:`mtrank.nn.experts`, :mod:`mtrank.nn.gates`); the model (:mod:`mtrank.model`) builds them from the
config and passes them in.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrank.nn.routing import LevelLayout
from mtrank.nn.stacked import MLP, StackedMLP


class ExtractionLevel(nn.Module):
    """One level of experts and gates: ``out_g = sum_e (g_g(x_g)_e + r_g(x_g)_e) f_e(x_owner(e))``.

    ``g_g`` is gate g (softmax, top-k, DSelect-k, ...) over the experts it may use, ``r_g`` an optional
    residual over its own experts (AdaTT's native-expert weights, HoME's self-gate; zero otherwise). Expert
    outputs marked ``detach`` in the layout enter gate g's mixture with a stop-gradient (STEM).

    At the first level every expert and gate reads the same input ``x [B, in]`` (one GEMM for all experts).
    From PLE's second level on (and at STEM's first), inputs are ``[R, B, in]`` rows (each task's fused
    output, then group and shared ones): expert e reads ``x[owners[e]]``, gate g reads ``x[gate_rows[g]]``
    (plus the shared row, the last, for STEM's task gates).

    Args:
        experts: E experts (``[B, in]`` or ``[E, B, in]`` -> ``[E, B, D]``), see :mod:`mtrank.nn.experts`.
        gates: G gates over them (``-> weights [B, G, E], aux_loss``), see :mod:`mtrank.nn.gates`.
        layout: the level's routing (:class:`~mtrank.nn.routing.LevelLayout`).
        num_tasks: K.
        residual: ``gate input -> [B or 1, G, E]`` weights on each gate's own experts, or None.

    Shapes: ``x [B, in]`` or ``[R, B, in]`` -> ``mixed [G', B, D]`` (G' = G, or K with a shared gate),
    ``gate_weights [B, G', E]`` (float32), ``aux_loss []``, ``expert_out [E, B, D]``.
    """

    def __init__(
        self,
        experts: nn.Module,
        gates: nn.Module,
        layout: LevelLayout,
        num_tasks: int,
        residual: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.experts, self.gates, self.residual = experts, gates, residual
        self.num_tasks, self.num_experts = num_tasks, layout.owners.numel()
        self.shared_gate = layout.shared_gate
        self.register_buffer("owners", layout.owners.clone())
        # routing beyond PLE's, held only by the levels that need it (classic blocks keep their state dict):
        # gate g reads row gate_rows[g] (HoME), task gates add the shared row (STEM), stop-gradients (STEM)
        rows = layout.allowed.shape[0]
        keep_rows = torch.equal(layout.gate_rows, torch.arange(rows))
        self.register_buffer("gate_rows", None if keep_rows else layout.gate_rows.clone())
        shared_rows = (torch.arange(rows) < num_tasks).float().view(rows, 1, 1)  # (G, 1, 1)
        self.register_buffer("adds_shared", shared_rows if layout.gate_adds_shared else None)
        detach = bool(layout.detach.any())
        self.register_buffer("keeps_gradient", (~layout.detach).float() if detach else None)  # (G, E)
        self.output_dim = experts.output_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.dim() == 2:
            expert_out = self.experts(x)  # (E, B, D): one GEMM per layer for all experts
            gate_input = x
        else:
            expert_out = self.experts(x.index_select(0, self.owners))  # (E, B, in) -> (E, B, D)
            gate_rows, adds_shared = self.gate_rows, self.adds_shared
            # (G, B, in); the last level has no shared gate
            gate_input = x[: self.gates.num_gates] if gate_rows is None else x.index_select(0, gate_rows)
            if adds_shared is not None:
                gate_input = gate_input + adds_shared.to(x.dtype) * x[-1]  # task gates: x_g + x_shared
        gate_weights, aux_loss = self.gates(gate_input)  # (B, G, E)
        if self.shared_gate:
            gate_weights = gate_weights.expand(-1, self.num_tasks, -1)  # (B, K, E)
        mix_weights = gate_weights
        residual = self.residual
        if residual is not None:
            mix_weights = mix_weights + residual(gate_input)  # (B, G, E)
        keeps_gradient = self.keeps_gradient
        if self.num_experts == 1:
            mixed = expert_out * mix_weights.to(expert_out.dtype).permute(1, 0, 2)  # (G, B, D)
        elif keeps_gradient is not None:  # STEM: sum_e w_ge (f_e, or sg(f_e) for another task's expert e)
            flowing = mix_weights * keeps_gradient
            mixed = mix(flowing, expert_out) + mix(mix_weights - flowing, expert_out.detach())
        else:
            mixed = mix(mix_weights, expert_out)
        return mixed, gate_weights, aux_loss, expert_out


def mix(weights: torch.Tensor, expert_out: torch.Tensor) -> torch.Tensor:
    """``mixed_g = sum_e weights[:, g, e] * expert_out[e]``: ``[B, G, E], [E, B, D] -> [G, B, D]``.

    One broadcast multiply + sum per gate; on CPU 2x faster (forward and backward) than einsum, which runs it
    as B tiny matmuls."""
    w = weights.to(expert_out.dtype).permute(1, 2, 0).unsqueeze(-1)  # (G, E, B, 1)
    return torch.stack([(w[g] * expert_out).sum(0) for g in range(w.shape[0])])  # (G, B, D)


class MultiTaskBlock(nn.Module):
    """Experts shared between tasks through per-task gates; one tower per task.

    ``f_e(x)`` experts, ``g_k(x)`` task gates, ``h_k`` towers: ``logit_k = h_k( sum_e g_k(x)_e f_e(x) )``.
    With a shared hidden layer ``s`` (YouTube), experts and gates read ``s(x)`` instead of ``x``. PLE, AdaTT,
    HoME and STEM stack levels; a lower level's shared (and group) gates feed the next level's shared (and
    group) experts. PEPNet's PPNet scales each tower layer's input (``tower_scales``).

    Args:
        levels: the extraction levels, bottom first.
        towers: K towers (:class:`~mtrank.nn.stacked.StackedMLP` ending in one unit), reading ``[K, B, D]``.
        shared: the shared hidden layer under the experts, or None.
        funnel: ``(tower inputs [K, B, D], tower outputs) -> task logits`` for tasks that depend on others
            (:class:`~mtrank.nn.funnel.TaskFunnel`: AITM's transfer, ESCM2-DR's imputation towers), or None.

    Shapes: ``x [B, in]`` (or ``[K+1, B, in]``, STEM) -> ``task_logits [B, K]``, ``gate_weights [B, K, E]``
    (float32, of the last level), ``aux_loss []``.
    """

    def __init__(
        self,
        levels: list[ExtractionLevel],
        towers: StackedMLP,
        shared: MLP | None = None,
        funnel: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.shared = shared
        self.funnel = funnel
        self.levels = nn.ModuleList(levels)
        self.towers = towers
        self.num_tasks = towers.groups
        self.num_experts = levels[-1].num_experts

    def forward(
        self, x: torch.Tensor, tower_scales: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        task_logits, gate_weights, aux_loss, _ = self.run(x, tower_scales, False)
        return task_logits, gate_weights, aux_loss

    def run(
        self, x: torch.Tensor, tower_scales: list[torch.Tensor] | None, keep_levels: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The forward pass; with ``keep_levels``, also every level's ``(expert_out [E, B, D], gate_weights
        [B, G, E])`` for analysis (:func:`mtrank.evaluate.gates.model_gate_report`)."""
        if self.shared is not None:
            x = self.shared(x)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        gate_weights = x.new_zeros(())
        trace: list[tuple[torch.Tensor, torch.Tensor]] = []
        for level in self.levels:
            x, gate_weights, level_aux, expert_out = level(x)  # (G, B, D)
            aux_loss = aux_loss + level_aux
            if keep_levels:
                trace.append((expert_out, gate_weights))
        tower_out = self.towers(x[: self.num_tasks], tower_scales)  # (K, B, 1)
        funnel = self.funnel
        if funnel is not None:
            return funnel(x[: self.num_tasks], tower_out), gate_weights, aux_loss, trace
        return tower_out.squeeze(-1).transpose(0, 1), gate_weights, aux_loss, trace
