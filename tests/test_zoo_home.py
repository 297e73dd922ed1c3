"""HoME (Wang et al., Kuaishou 2024) against a loop over its equations as we read them (docs/model-zoo.md):

* experts: per layer ``Swish(BN_e(W_e x_e + b_e))``, ``x_e = x * 2 sigmoid(x B_e A_e)`` (feature gate);
* meta level: group c's gate = softmax over the global shared + group c's experts; the shared gate over all;
* task level: task t's experts read its group's meta output, group experts their group's, shared experts the
  shared one; task t's gate reads its group's output and weighs its own, its group's and the shared experts;
* self-gate: each gate's own experts again, ``sigmoid`` (one expert) or ``softmax`` (several), added.
"""

import pytest
import torch
import torch.nn.functional as F

from mtrank.config import ConfigError, ModelConfig
from mtrank.model import MultiTaskModel

TASKS = [{"name": "click"}, {"name": "like"}, {"name": "watch", "type": "regression"}]


def reference_expert(level, e: int, h: torch.Tensor, running: dict, training: bool) -> torch.Tensor:
    experts = level.experts
    if experts.gate_down is not None:
        h = h * 2 * torch.sigmoid(h @ experts.gate_down[e] @ experts.gate_up[e])
    for layer, norm in zip(experts.layers, experts.norms):
        h = h @ layer.weight[e] + layer.bias[e, 0]
        mean, var = running[(id(norm), e)]
        h = F.batch_norm(h, mean, var, norm.weight[e, 0], norm.bias[e, 0], training, 0.1, 1e-5)
        h = F.silu(h)
    return h


def reference_home(model: MultiTaskModel, x: torch.Tensor, running: dict, training: bool) -> torch.Tensor:
    rows = None
    for level in model.block.levels:
        outs = []
        for e in range(level.num_experts):
            h = x if rows is None else rows[int(level.owners[e])]
            outs.append(reference_expert(level, e, h, running, training))
        gates, residual = level.gates, level.residual
        fused = []
        for g in range(gates.num_gates):
            gx = x if rows is None else rows[int(level.gate_rows[g])]
            allowed = gates.allowed[g]
            logits = (gx @ gates.proj.weight[g] + gates.proj.bias[g, 0]).masked_fill(~allowed, float("-inf"))
            weights = torch.softmax(logits, -1)
            own = residual.own[g]
            self_logits = gx @ residual.proj.weight[g] + residual.proj.bias[g, 0]
            if int(own.sum()) == 1:
                self_weights = torch.sigmoid(self_logits) * own
            else:
                self_weights = torch.softmax(self_logits.masked_fill(~own, float("-inf")), -1)
            total = weights + self_weights
            fused.append(sum(total[:, e : e + 1] * outs[e] for e in range(level.num_experts)))
        rows = fused
    logits = []
    for k in range(model.block.num_tasks):
        h = rows[k]
        for i, layer in enumerate(model.block.towers.layers):
            h = h @ layer.weight[k] + layer.bias[k, 0]
            h = torch.relu(h) if i < len(model.block.towers.layers) - 1 else h
        logits.append(h[:, 0])
    return torch.stack(logits, 1)


def home_model(task_groups, feature_gate_rank=2, **block) -> MultiTaskModel:
    config = ModelConfig.from_dict(
        {
            "inputs": {"num_dense": 6},
            "tasks": TASKS,
            "block": {"type": "home", "num_experts": 2, "task_experts": 2, "task_groups": task_groups, **block},
            "experts": {"type": "home", "hidden": [5, 4], "feature_gate_rank": feature_gate_rank},
            "towers": {"hidden": [3]},
        }
    )
    model = MultiTaskModel(config)
    with torch.no_grad():  # gates, self-gates and feature gates away from their initial identity / uniform
        for level in model.block.levels:
            level.gates.proj.weight.normal_(0, 0.5)
            level.residual.proj.weight.normal_(0, 0.5)
            if level.experts.gate_up is not None:
                level.experts.gate_up.normal_(0, 0.3)
            for norm in level.experts.norms:
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.2)
                norm.running_mean.normal_(0, 0.1)
                norm.running_var.uniform_(0.5, 2.0)
    return model


def running_copies(model: MultiTaskModel) -> dict:
    return {
        (id(norm), e): (norm.running_mean[e, 0].clone(), norm.running_var[e, 0].clone())
        for level in model.block.levels
        for norm in level.experts.norms
        for e in range(level.num_experts)
    }


@pytest.mark.parametrize("training", [True, False])
def test_home_matches_the_equation_loop_forward_gradients_and_running_statistics(training):
    torch.manual_seed(0)
    model = home_model([["click", "like"], ["watch"]]).train(training)
    running = running_copies(model)
    x = torch.randn(12, 6)
    out = model(x, torch.zeros(12, 0, dtype=torch.long))
    ref = reference_home(model, x, running, training)
    torch.testing.assert_close(out.task_logits, ref, rtol=1e-4, atol=1e-5)
    for level in model.block.levels:  # BatchNorm's running statistics move as nn.functional.batch_norm's do
        for norm in level.experts.norms:
            for e in range(level.num_experts):
                mean, var = running[(id(norm), e)]
                torch.testing.assert_close(norm.running_mean[e, 0], mean, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(norm.running_var[e, 0], var, rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    grads = torch.autograd.grad(out.task_logits.sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        g = torch.zeros_like(r) if g is None and r is not None else g
        r = torch.zeros_like(g) if r is None and g is not None else r
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_home_masks_follow_the_task_hierarchy():
    meta, task = home_model([["click", "like"], ["watch"]]).block.levels
    # meta level: experts [group 0 x 1, group 1 x 1, shared x 2]; gates [group 0, group 1, shared]
    assert meta.gates.allowed.int().tolist() == [[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]
    # task level: experts [click x 2, like x 2, watch x 2, group 0, group 1, shared x 2]; gates read group rows
    assert task.owners.tolist() == [0, 0, 0, 0, 1, 1, 0, 1, 2, 2] and task.gate_rows.tolist() == [0, 0, 1]
    assert task.gates.allowed.int().tolist() == [
        [1, 1, 0, 0, 0, 0, 1, 0, 1, 1],
        [0, 0, 1, 1, 0, 0, 1, 0, 1, 1],
        [0, 0, 0, 0, 1, 1, 0, 1, 1, 1],
    ]
    assert task.residual.own.int().tolist()[2] == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]


def test_home_trains_a_step_under_bf16_autocast():
    model = home_model([], feature_gate_rank=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(16, 6), torch.zeros(16, 0, dtype=torch.long))
    out.task_logits.float().sum().backward()
    assert torch.isfinite(out.task_logits).all()
    assert all(p.grad is not None for p in model.block.levels[0].experts.parameters())


def test_home_task_groups_must_cover_every_task_once():
    with pytest.raises(ConfigError, match="model.block.task_groups: every task must be in exactly one group"):
        home_model([["click"], ["watch"]])
    with pytest.raises(ConfigError, match="model.block.task_groups: unknown task 'clck'"):
        home_model([["clck", "like"], ["watch"]])
