"""STEM (Su et al., AAAI 2024) against a loop written from the facts of the authors' ``models/STEM.py``: one
table of width (K+1) D split into per-task and shared embeddings; task t's experts read its embedding, the
shared experts the shared one; task t's gate is ``softmax(gate_t(x_t + x_shared))`` over every expert, with the
other tasks' experts detached (all forward, task-specific backward); the shared gate reads x_shared, no detach."""

import pytest
import torch

from mtrank.config import ConfigError, ModelConfig
from mtrank.model import MultiTaskModel

TASKS = [{"name": "click"}, {"name": "like"}, {"name": "watch", "type": "regression"}]


def stem_model(levels: int = 2, **extra) -> MultiTaskModel:
    config = ModelConfig.from_dict(
        {
            "inputs": {"num_dense": 2, "vocab_sizes": [5, 7, 4], "embedding_dim": 3},
            "tasks": TASKS,
            "block": {"type": "stem", "num_experts": 2, "task_experts": 1, "levels": levels},
            "experts": {"hidden": [6]},
            "towers": {"hidden": [4]},
            **extra,
        }
    )
    model = MultiTaskModel(config)
    with torch.no_grad():
        for level in model.block.levels:
            level.gates.proj.weight.normal_(0, 0.5)
    return model


def reference_stem(model: MultiTaskModel, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    k, dim = model.block.num_tasks, model.config.inputs.embedding_dim
    emb = model.embedding.table.weight[sparse + model.embedding.offsets]  # (B, F, (K+1) D)
    rows = [torch.cat([dense, emb[..., i * dim : (i + 1) * dim].flatten(1)], 1) for i in range(k + 1)]
    for level in model.block.levels:
        outs = []
        for e in range(level.num_experts):
            owner = int(level.owners[e])  # task t's experts read x_t; shared ones x_shared (row K)
            h = rows[owner]
            for layer in level.experts.layers:
                h = torch.relu(h @ layer.weight[e] + layer.bias[e, 0])
            outs.append((owner, h))
        fused = []
        for g in range(level.gates.num_gates):
            gate_in = rows[g] + rows[k] if g < k else rows[k]
            gate = torch.softmax(gate_in @ level.gates.proj.weight[g] + level.gates.proj.bias[g, 0], -1)
            terms = []
            for e, (owner, h) in enumerate(outs):
                other_task = g < k and owner < k and owner != g
                terms.append(gate[:, e : e + 1] * (h.detach() if other_task else h))
            fused.append(sum(terms))
        rows = fused + rows[len(fused) :]  # the last level has no shared gate: its output has K rows
    logits = []
    for t in range(k):
        h = rows[t]
        for i, layer in enumerate(model.block.towers.layers):
            h = h @ layer.weight[t] + layer.bias[t, 0]
            h = torch.relu(h) if i < len(model.block.towers.layers) - 1 else h
        logits.append(h[:, 0])
    return torch.stack(logits, 1)


def inputs(rows: int = 10):
    torch.manual_seed(1)
    return torch.randn(rows, 2), torch.stack([torch.randint(0, v, (rows,)) for v in (5, 7, 4)], 1)


@pytest.mark.parametrize("levels", [1, 2])
def test_stem_matches_the_reference_loop_forward_and_gradients(levels):
    model = stem_model(levels).eval()
    assert model.embedding.table.embedding_dim == 3 * 4  # (K + 1) tables of width 3, one lookup
    dense, sparse = inputs()
    out = model(dense, sparse)
    ref = reference_stem(model, dense, sparse)
    torch.testing.assert_close(out.task_logits, ref, rtol=1e-5, atol=1e-5)
    params = list(model.parameters())
    for task in range(3):  # each task's loss alone: the stop-gradients are per task
        grads = torch.autograd.grad(out.task_logits[:, task].sum(), params, retain_graph=True, allow_unused=True)
        ref_grads = torch.autograd.grad(ref[:, task].sum(), params, retain_graph=True, allow_unused=True)
        for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
            g = torch.zeros_like(r) if g is None and r is not None else g
            r = torch.zeros_like(g) if r is None and g is not None else r
            if g is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_a_tasks_loss_reaches_its_own_and_the_shared_embeddings_only_but_reads_all():
    model = stem_model(levels=1).eval()
    dense, sparse = inputs()
    table = model.embedding.table.weight
    (grad,) = torch.autograd.grad(model(dense, sparse).task_logits[:, 0].sum(), [table])
    per_table = grad.view(grad.shape[0], 4, 3).abs().sum((0, 2))  # tables: click, like, watch, shared
    assert per_table[0] > 0 and per_table[3] > 0
    assert per_table[1] == 0 and per_table[2] == 0
    before = model(dense, sparse).task_logits[:, 0]
    with torch.no_grad():
        table.view(table.shape[0], 4, 3)[:, 1].add_(1.0)  # change only like's embeddings
    assert not torch.allclose(model(dense, sparse).task_logits[:, 0], before), "click's forward reads like's experts"


def test_stem_refuses_what_reads_one_shared_input():
    with pytest.raises(ConfigError, match="model.block.shared_hidden: not with block stem"):
        stem_model(block={"type": "stem", "shared_hidden": [8]})
    with pytest.raises(ConfigError, match="model.mixer.layers: not with block stem"):
        stem_model(mixer={"layers": 1, "heads": 1})
