"""Naive reference implementations: loops over experts and tasks, for numerical checks of the fast path."""

from __future__ import annotations

import torch

from mtrank.model import MultiTaskModel


def naive_forward(
    model: MultiTaskModel, dense: torch.Tensor, sparse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Task logits ``[B, K]`` and gate weights ``[B, K, E]`` by explicit loops (evaluation mode, dense gates)."""
    emb = model.embedding
    parts = [dense]
    for f in range(sparse.shape[1]):  # one lookup per feature
        parts.append(emb.table.weight[sparse[:, f] + emb.offsets[f]])
    x = torch.cat(parts, 1) if sparse.shape[1] else dense
    block = model.block
    if block.shared is not None:
        x = block.shared(x)
    act = torch.relu
    num_tasks = model.config.num_tasks
    inputs = None  # per-task + shared inputs of upper PLE levels: list of [B, D]
    weights = []
    for level in block.levels:
        expert_outputs = []
        for e in range(level.num_experts):  # loop over experts
            h = x if inputs is None else inputs[int(level.owners[e])]
            for layer in level.experts.layers:
                h = act(h @ layer.weight[e] + layer.bias[e, 0])
            expert_outputs.append(h)
        gates = level.gates
        weights = []
        for g in range(gates.num_gates):  # loop over gates
            gx = x if inputs is None else inputs[g]
            if gates.fixed:
                w = gates.allowed[g].float().expand(gx.shape[0], -1)
            else:
                logits = (gx @ gates.proj.weight[g] + gates.proj.bias[g, 0]) / gates.temperature
                logits = logits.masked_fill(~gates.allowed[g], float("-inf"))
                w = torch.softmax(logits, -1)
            weights.append(w)
        if level.shared_gate:
            weights = weights * num_tasks
        inputs = [sum(w[:, e : e + 1] * expert_outputs[e] for e in range(level.num_experts)) for w in weights]
    logits_out = []
    for k in range(num_tasks):
        h = inputs[k]
        layers = block.towers.layers
        for i, layer in enumerate(layers):
            h = h @ layer.weight[k] + layer.bias[k, 0]
            if i < len(layers) - 1:
                h = act(h)
        logits_out.append(h[:, 0])
    return torch.stack(logits_out, 1), torch.stack(weights[:num_tasks], 1)
