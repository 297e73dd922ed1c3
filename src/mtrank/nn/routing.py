"""Routing: which experts each level has, what each expert and gate reads, which experts each gate may use.

Shared-Bottom, Single-task, OMoE, MMoE, CGC, PLE, AdaTT, HoME and STEM differ only here: one layout per level,
built by :func:`block_layouts`. A level's output has one row per gate (tasks first, then a shared or group
gate); the next level's experts and gates read rows of it (``owners``, ``gate_rows``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LevelLayout(NamedTuple):
    """The routing of one extraction level (see :class:`~mtrank.nn.block.ExtractionLevel`).

    Attributes:
        owners: ``[E]`` the row of the level's input each expert reads (from the second level on; at the
            first level every expert reads the block input, except with per-task inputs, STEM).
        allowed: ``[G, E]`` bool, which experts gate g may weigh.
        gate_rows: ``[G]`` the row of the level's input gate g reads.
        own: ``[G, E]`` bool, gate g's own experts (the task's, the group's or the shared ones): what AdaTT's
            native-expert residual and HoME's self-gate add beside the gated mixture.
        detach: ``[G, E]`` bool, expert outputs that enter gate g's mixture without a gradient (STEM's
            all-forward, task-specific-backward: another task's experts).
        shared_gate: one gate serves every task (OMoE): its weights are broadcast to the K tasks.
        gate_adds_shared: task gates read their row plus the shared row (the last one), as STEM's do.
    """

    owners: torch.Tensor
    allowed: torch.Tensor
    gate_rows: torch.Tensor
    own: torch.Tensor
    detach: torch.Tensor
    shared_gate: bool = False
    gate_adds_shared: bool = False


def layout(
    owners: torch.Tensor,
    allowed: torch.Tensor,
    gate_rows: torch.Tensor | None = None,
    detach: torch.Tensor | None = None,
    shared_gate: bool = False,
    gate_adds_shared: bool = False,
) -> LevelLayout:
    """A :class:`LevelLayout`; gate g reads row g and owns the experts whose owner is g, by default."""
    gates = allowed.shape[0]
    rows = torch.arange(gates) if gate_rows is None else gate_rows
    own = (owners.unsqueeze(0) == torch.arange(gates).unsqueeze(1)) & allowed  # (G, E)
    detach = torch.zeros_like(allowed) if detach is None else detach
    return LevelLayout(owners, allowed, rows, own, detach, shared_gate, gate_adds_shared)


def block_layouts(
    block: str,
    num_tasks: int,
    num_experts: int = 8,
    task_experts: int = 1,
    levels: int = 1,
    task_groups: list[int] | None = None,
    group_experts: int = 1,
) -> list[LevelLayout]:
    """The layouts of a block's levels, bottom first.

    Args:
        block: ``single_task``, ``shared_bottom``, ``omoe``, ``mmoe``, ``cgc``, ``ple``, ``adatt``, ``home``
            or ``stem``.
        num_tasks: K.
        num_experts: shared experts (all but ``single_task`` and ``shared_bottom``).
        task_experts: experts owned by each task (``cgc``, ``ple``, ``adatt``, ``home``, ``stem``).
        levels: stacked levels (``ple``, ``adatt``, ``stem``; HoME has two).
        task_groups: HoME's group of each task (``[K]`` ints in ``[0, C)``); None = one group.
        group_experts: HoME's experts per task group, at each of its two levels.

    Expert order in a level: each task's own experts (task 0 first), then the group experts (HoME), then the
    shared ones. Gate order: the K task gates, then (lower levels only) HoME's C group gates and the shared
    gate, which feed the next level's group and shared experts.

    Example:
        >>> (level,) = block_layouts("cgc", num_tasks=2, num_experts=1, task_experts=1)
        >>> level.owners.tolist(), level.allowed.int().tolist(), level.own.int().tolist()
        ([0, 1, 2], [[1, 0, 1], [0, 1, 1]], [[1, 0, 0], [0, 1, 0]])
    """
    k = num_tasks
    if block == "shared_bottom":
        return [layout(torch.full((1,), k), torch.ones(k, 1, dtype=torch.bool))]
    if block == "single_task":
        return [layout(torch.arange(k), torch.eye(k, dtype=torch.bool))]
    if block == "omoe":
        return [layout(torch.full((num_experts,), k), torch.ones(1, num_experts, dtype=torch.bool), shared_gate=True)]
    if block == "mmoe":
        return [layout(torch.full((num_experts,), k), torch.ones(k, num_experts, dtype=torch.bool))]
    if block == "home":
        return _home_layouts(k, num_experts, task_experts, task_groups or [0] * k, group_experts)
    if block not in ("cgc", "ple", "adatt", "stem"):
        raise ValueError(f"unknown block {block!r}")
    stacked = 1 if block == "cgc" else levels
    owners = torch.cat([torch.arange(k).repeat_interleave(task_experts), torch.full((num_experts,), k)])
    experts = owners.numel()
    out = []
    for level in range(stacked):
        last = level == stacked - 1
        shared_row = not last and (num_experts > 0 or block in ("ple", "cgc"))
        if block in ("cgc", "ple"):  # task k: its own experts + the shared ones; the shared gate: all
            allowed = (owners.unsqueeze(0) == torch.arange(k).unsqueeze(1)) | (owners == k).unsqueeze(0)
        else:  # AdaTT, STEM: every gate fuses every expert
            allowed = torch.ones(k, experts, dtype=torch.bool)
        if shared_row:
            allowed = torch.cat([allowed, torch.ones(1, experts, dtype=torch.bool)])
        detach = None
        if block == "stem":  # task g's mixture: another task's experts forward only
            others = (owners < k).unsqueeze(0) & (owners.unsqueeze(0) != torch.arange(allowed.shape[0]).unsqueeze(1))
            detach = others & (torch.arange(allowed.shape[0]) < k).unsqueeze(1)
        out.append(layout(owners, allowed, detach=detach, gate_adds_shared=block == "stem"))
    return out


def _home_layouts(k: int, shared: int, task_experts: int, groups: list[int], group_experts: int) -> list[LevelLayout]:
    """HoME's two levels: (1) meta level: global shared + per-group experts, one gate per group (its experts +
    the shared ones) and a shared gate (all); (2) task level: per-task experts reading their group's row,
    per-group experts reading the group row, shared experts reading the shared row; task t's gate reads its
    group's row and weighs its own, its group's and the shared experts."""
    group = torch.tensor(groups)  # (K,)
    c = int(group.max()) + 1
    group_owner = torch.arange(c).repeat_interleave(group_experts)  # (C * n_g,)
    # level 1: experts [group experts..., shared...]; gates [group gates..., shared gate]; rows in that order
    owners1 = torch.cat([group_owner, torch.full((shared,), c)])
    allowed1 = (owners1.unsqueeze(0) == torch.arange(c + 1).unsqueeze(1)) | (owners1 == c).unsqueeze(0)
    allowed1[c] = True  # the shared gate fuses every expert
    level1 = layout(owners1, allowed1)
    # level 2: experts [task experts..., group experts..., shared...] reading rows of level 1's output
    task_owner = torch.arange(k).repeat_interleave(task_experts)
    owners2 = torch.cat([group[task_owner], group_owner, torch.full((shared,), c)])
    mine = torch.cat([task_owner, torch.full((c * group_experts + shared,), -1)])  # each expert's task (-1: none)
    kind_group = torch.cat([torch.full_like(task_owner, -1), group_owner, torch.full((shared,), -1)])
    tasks = torch.arange(k).unsqueeze(1)
    own2 = mine.unsqueeze(0) == tasks  # (K, E)
    allowed2 = own2 | (kind_group.unsqueeze(0) == group.unsqueeze(1)) | (owners2 == c).unsqueeze(0)
    no_detach = torch.zeros_like(allowed2)
    level2 = LevelLayout(owners2, allowed2, group, own2, no_detach)
    return [level1, level2]
