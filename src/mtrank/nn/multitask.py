"""The multi-task block: (shared hidden layer) -> extraction level(s) of experts and gates -> task towers.

Shared-Bottom, Single-task, OMoE, MMoE, CGC and PLE are configurations of this one block; they differ only in
how many experts there are, which experts each gate may use (see :func:`expert_layout`), and how many levels
are stacked (PLE).
"""

from __future__ import annotations

import torch
from torch import nn

from mtrank.config import ModelConfig
from mtrank.nn.cross import StackedDCN
from mtrank.nn.experts import MLP, StackedMLP
from mtrank.nn.gates import TaskGates


def expert_layout(config: ModelConfig, last_level: bool = True) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Experts of one level, who feeds them, and which ones each gate may use.

    Returns:
        ``(owners [E], allowed [G, E] bool, shared_gate)``. ``owners[e]`` is the task whose input expert ``e``
        reads, or K for a shared expert (matters from PLE's second level on). Gates are ordered tasks first; a
        non-final PLE level adds one shared gate (row K) over all experts, which feeds the next level's shared
        experts. ``shared_gate`` means one gate serves every task (OMoE), so G = 1 and its weights are broadcast.
    """
    k = config.num_tasks
    if config.block == "shared_bottom":
        return torch.full((1,), k), torch.ones(k, 1, dtype=torch.bool), False
    if config.block == "single_task":
        return torch.arange(k), torch.eye(k, dtype=torch.bool), False
    if config.block == "omoe":
        return torch.full((config.num_experts,), k), torch.ones(1, config.num_experts, dtype=torch.bool), True
    if config.block == "mmoe":
        return (
            torch.full((config.num_experts,), k),
            torch.ones(k, config.num_experts, dtype=torch.bool),
            False,
        )
    if config.block in ("cgc", "ple"):
        per_task, shared = config.task_experts, config.num_experts
        owners = torch.cat([torch.arange(k).repeat_interleave(per_task), torch.full((shared,), k)])
        allowed = owners.unsqueeze(0) == torch.arange(k).unsqueeze(1)  # (K, E): the task's own experts
        allowed[:, k * per_task :] = True  # and the shared ones
        if not last_level:
            allowed = torch.cat([allowed, torch.ones(1, owners.numel(), dtype=torch.bool)])  # shared gate
        return owners, allowed, False
    raise ValueError(f"unknown block {config.block!r}")


class ExtractionLevel(nn.Module):
    """One level of experts and gates: ``out_g = sum_e g_g(x_g)_e f_e(x_owner(e))``.

    At the first level every expert and gate reads the same input ``x [B, in]`` (one GEMM for all experts).
    At PLE's upper levels, inputs are ``[K+1, B, in]`` (each task's fused output, then the shared one): expert e
    reads ``x[owner(e)]``, gate g reads ``x[g]``.

    Shapes: ``x [B, in]`` or ``[K+1, B, in]`` -> ``mixed [G', B, D]`` (G' = K, or K+1 with a shared gate),
    ``gate_weights [B, G', E]`` (float32), ``aux_loss []``.
    """

    def __init__(
        self,
        in_features: int,
        owners: torch.Tensor,
        allowed: torch.Tensor,
        shared_gate: bool,
        config: ModelConfig,
    ) -> None:
        super().__init__()
        self.num_tasks, self.num_experts = config.num_tasks, owners.numel()
        self.shared_gate = shared_gate
        self.register_buffer("owners", owners.clone())
        if config.expert_type == "dcn":
            self.experts = StackedDCN(
                self.num_experts,
                in_features,
                config.expert_hidden,
                config.cross_layers,
                config.cross_rank,
                config.activation,
                config.dropout,
            )
        else:
            self.experts = StackedMLP(
                self.num_experts, in_features, config.expert_hidden, config.activation, config.dropout
            )
        self.gates = TaskGates(in_features, allowed, config.gate)
        self.output_dim = config.expert_hidden[-1]

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

    ``f_e(x)`` expert MLPs, ``g_k(x)`` task gates, ``h_k`` towers: ``logit_k = h_k( sum_e g_k(x)_e f_e(x) )``.
    With a shared hidden layer ``s`` (YouTube), experts and gates read ``s(x)`` instead of ``x``. PLE stacks
    ``levels`` CGC levels; each non-final level also has a shared gate whose output feeds the next level's shared
    experts.

    Shapes: ``x [B, in]`` -> ``task_logits [B, K]``, ``gate_weights [B, K, E]`` (float32, of the last level),
    ``aux_loss []``.
    """

    def __init__(self, config: ModelConfig, in_features: int) -> None:
        super().__init__()
        self.num_tasks = config.num_tasks
        self.shared = MLP(in_features, config.shared_hidden, config.activation) if config.shared_hidden else None
        width = self.shared.output_dim if self.shared is not None else in_features
        num_levels = config.levels if config.block == "ple" else 1
        self.levels = nn.ModuleList()
        for level in range(num_levels):
            owners, allowed, shared_gate = expert_layout(config, last_level=level == num_levels - 1)
            self.levels.append(ExtractionLevel(width, owners, allowed, shared_gate, config))
            width = config.expert_hidden[-1]
        self.num_experts = self.levels[-1].num_experts
        self.towers = StackedMLP(
            config.num_tasks,
            config.expert_hidden[-1],
            [*config.tower_hidden, 1],
            config.activation,
            config.dropout,
            final_activation=False,
        )

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
