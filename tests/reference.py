"""Naive reference implementations: loops over experts and tasks, for numerical checks of the fast path."""

from __future__ import annotations

import torch

from mtrank.models import MultiTaskModel


def naive_forward(model: MultiTaskModel, dense: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    expert_outputs = []
    for e in range(block.num_experts):  # loop over experts
        h = x
        for i, layer in enumerate(block.experts.layers):
            h = act(h @ layer.weight[e] + layer.bias[e, 0])
        expert_outputs.append(h)
    gates = block.gates
    weights = []
    for k in range(model.config.num_tasks):
        g = 0 if block.shared_gate else k
        if gates.fixed:
            w = gates.allowed[g].float().expand(x.shape[0], -1)
        else:
            num_e = gates.num_experts
            logits = x @ gates.proj.weight[g * num_e : (g + 1) * num_e].T + gates.proj.bias[g * num_e : (g + 1) * num_e]
            logits = logits / gates.temperature
            logits = logits.masked_fill(~gates.allowed[g], float("-inf"))
            w = torch.softmax(logits, -1)
        weights.append(w)
    logits_out = []
    for k in range(model.config.num_tasks):
        mixed = sum(weights[k][:, e : e + 1] * expert_outputs[e] for e in range(block.num_experts))
        h = mixed
        layers = block.towers.layers
        for i, layer in enumerate(layers):
            h = h @ layer.weight[k] + layer.bias[k, 0]
            if i < len(layers) - 1:
                h = act(h)
        logits_out.append(h[:, 0])
    return torch.stack(logits_out, 1), torch.stack(weights, 1)
