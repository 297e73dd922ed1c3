"""Routing: which experts a level has, who feeds each, and which experts each gate may use.

Shared-Bottom, Single-task, OMoE, MMoE, CGC and PLE differ only here: one layout function per block type.
"""

from __future__ import annotations

import torch


def expert_layout(
    block: str, num_tasks: int, num_experts: int = 8, task_experts: int = 1, last_level: bool = True
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Experts of one level, who feeds them, and which ones each gate may use.

    Args:
        block: ``single_task``, ``shared_bottom``, ``omoe``, ``mmoe``, ``cgc`` or ``ple``.
        num_tasks: K.
        num_experts: shared experts (``omoe``, ``mmoe``, ``cgc``, ``ple``).
        task_experts: experts owned by each task (``cgc``, ``ple``).
        last_level: False for PLE's lower levels, which add a shared gate.

    Returns:
        ``(owners [E], allowed [G, E] bool, shared_gate)``. ``owners[e]`` is the task whose input expert ``e``
        reads, or K for a shared expert (matters from PLE's second level on). Gates are ordered tasks first; a
        non-final PLE level adds one shared gate (row K) over all experts, which feeds the next level's shared
        experts. ``shared_gate`` means one gate serves every task (OMoE), so G = 1 and its weights are broadcast.

    Example:
        >>> owners, allowed, shared = expert_layout("cgc", num_tasks=2, num_experts=1, task_experts=1)
        >>> owners.tolist(), allowed.int().tolist(), shared
        ([0, 1, 2], [[1, 0, 1], [0, 1, 1]], False)
    """
    k = num_tasks
    if block == "shared_bottom":
        return torch.full((1,), k), torch.ones(k, 1, dtype=torch.bool), False
    if block == "single_task":
        return torch.arange(k), torch.eye(k, dtype=torch.bool), False
    if block == "omoe":
        return torch.full((num_experts,), k), torch.ones(1, num_experts, dtype=torch.bool), True
    if block == "mmoe":
        return torch.full((num_experts,), k), torch.ones(k, num_experts, dtype=torch.bool), False
    if block in ("cgc", "ple"):
        owners = torch.cat([torch.arange(k).repeat_interleave(task_experts), torch.full((num_experts,), k)])
        allowed = owners.unsqueeze(0) == torch.arange(k).unsqueeze(1)  # (K, E): the task's own experts
        allowed[:, k * task_experts :] = True  # and the shared ones
        if not last_level:
            allowed = torch.cat([allowed, torch.ones(1, owners.numel(), dtype=torch.bool)])  # shared gate
        return owners, allowed, False
    raise ValueError(f"unknown block {block!r}")
