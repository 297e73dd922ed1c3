"""The multi-task block: (shared hidden layer) -> extraction level(s) of experts and gates -> task towers.

Shared-Bottom, Single-task, OMoE, MMoE, CGC and PLE are configurations of this one block; they differ only in
how many experts there are, which experts each gate may use (:func:`mtrank.nn.routing.expert_layout`), and how
many levels are stacked (PLE). Experts and gates are any registered types (:mod:`mtrank.nn.experts`,
:mod:`mtrank.nn.gates`); the model (:mod:`mtrank.model`) builds them from the config and passes them in.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrank.nn.stacked import MLP, StackedMLP


class ExtractionLevel(nn.Module):
    """One level of experts and gates: ``out_g = sum_e g_g(x_g)_e f_e(x_owner(e))``.

    At the first level every expert and gate reads the same input ``x [B, in]`` (one GEMM for all experts).
    At PLE's upper levels, inputs are ``[K+1, B, in]`` (each task's fused output, then the shared one): expert e
    reads ``x[owner(e)]``, gate g reads ``x[g]``.

    Args:
        experts: E experts (``[B, in]`` or ``[E, B, in]`` -> ``[E, B, D]``), see :mod:`mtrank.nn.experts`.
        gates: G gates over them (``-> weights [B, G, E], aux_loss``), see :mod:`mtrank.nn.gates`.
        owners: ``[E]`` the input row each expert reads at upper levels (:func:`~mtrank.nn.routing.expert_layout`).
        num_tasks: K.
        shared_gate: one gate serves every task (OMoE): its weights are broadcast to the K tasks.

    Shapes: ``x [B, in]`` or ``[K+1, B, in]`` -> ``mixed [G', B, D]`` (G' = K, or K+1 with a shared gate),
    ``gate_weights [B, G', E]`` (float32), ``aux_loss []``.
    """

    def __init__(
        self, experts: nn.Module, gates: nn.Module, owners: torch.Tensor, num_tasks: int, shared_gate: bool
    ) -> None:
        super().__init__()
        self.experts, self.gates = experts, gates
        self.num_tasks, self.num_experts = num_tasks, owners.numel()
        self.shared_gate = shared_gate
        self.register_buffer("owners", owners.clone())
        self.output_dim = experts.output_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.dim() == 2:
            expert_out = self.experts(x)  # (E, B, D): one GEMM per layer for all experts
        else:
            expert_out = self.experts(x.index_select(0, self.owners))  # (E, B, in) -> (E, B, D)
        gate_input = x if x.dim() == 2 else x[: self.gates.num_gates]  # the last level has no shared gate
        gate_weights, aux_loss = self.gates(gate_input)  # (B, G, E)
        if self.shared_gate:
            gate_weights = gate_weights.expand(-1, self.num_tasks, -1)  # (B, K, E)
        if self.num_experts == 1:
            mixed = expert_out.expand(gate_weights.shape[1], -1, -1)  # (G, B, D)
        else:
            # sum_e g_g(x)_e f_e(x): one broadcast multiply + sum per gate; on CPU 2x faster (forward and
            # backward) than einsum, which runs it as B tiny matmuls
            weights = gate_weights.to(expert_out.dtype).permute(1, 2, 0).unsqueeze(-1)  # (G, E, B, 1)
            mixed = torch.stack([(weights[g] * expert_out).sum(0) for g in range(weights.shape[0])])  # (G, B, D)
        return mixed, gate_weights, aux_loss


class MultiTaskBlock(nn.Module):
    """Experts shared between tasks through per-task gates; one tower per task.

    ``f_e(x)`` experts, ``g_k(x)`` task gates, ``h_k`` towers: ``logit_k = h_k( sum_e g_k(x)_e f_e(x) )``.
    With a shared hidden layer ``s`` (YouTube), experts and gates read ``s(x)`` instead of ``x``. PLE stacks
    levels; each non-final level also has a shared gate whose output feeds the next level's shared experts.

    Args:
        levels: the extraction levels, bottom first.
        towers: K towers (:class:`~mtrank.nn.stacked.StackedMLP` ending in one unit), reading ``[K, B, D]``.
        shared: the shared hidden layer under the experts, or None.

    Shapes: ``x [B, in]`` -> ``task_logits [B, K]``, ``gate_weights [B, K, E]`` (float32, of the last level),
    ``aux_loss []``.
    """

    def __init__(self, levels: list[ExtractionLevel], towers: StackedMLP, shared: MLP | None = None) -> None:
        super().__init__()
        self.shared = shared
        self.levels = nn.ModuleList(levels)
        self.towers = towers
        self.num_tasks = towers.groups
        self.num_experts = levels[-1].num_experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.shared is not None:
            x = self.shared(x)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        gate_weights = x.new_zeros(())
        for level in self.levels:
            x, gate_weights, level_aux = level(x)  # (G, B, D)
            aux_loss = aux_loss + level_aux
        task_logits = self.towers(x[: self.num_tasks]).squeeze(-1).transpose(0, 1)  # (B, K)
        return task_logits, gate_weights, aux_loss
