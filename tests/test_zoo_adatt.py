"""AdaTT (Li et al., KDD 2023) against a loop written from the facts of Meta's reference ``mtl_lib.py``
(``AdaTTWSharedExps``): per level, every expert reads its module's row (task t's, or the shared one), every
gate (K tasks, plus the shared module below the last level) is ``softmax(Linear(row))`` over all experts, its
module's own experts get +1 (every module owns one expert) or learned weights, and ``fused = gates @ experts``."""

import pytest
import torch

from mtrank.config import ModelConfig
from mtrank.model import MultiTaskModel

TASKS = [{"name": "click"}, {"name": "watch", "type": "regression"}, {"name": "like"}]


def reference_adatt(model: MultiTaskModel, x: torch.Tensor) -> torch.Tensor:
    """Task logits ``[B, K]``, looping over levels, experts, gates and towers."""
    block = model.block
    num_tasks = block.num_tasks
    rows = None  # each module's input: K task rows, then the shared row
    for level in block.levels:
        experts = level.experts
        outs = []
        for e in range(level.num_experts):
            h = x if rows is None else rows[int(level.owners[e])]
            for layer in experts.layers:
                h = torch.relu(h @ layer.weight[e] + layer.bias[e, 0])
            outs.append(h)
        experts_out = torch.stack(outs, 1)  # (B, E, D)
        fused = []
        for g in range(level.gates.num_gates):
            gx = x if rows is None else rows[g]
            gate = torch.softmax(gx @ level.gates.proj.weight[g] + level.gates.proj.bias[g, 0], -1)  # (B, E)
            own = level.owners == g
            if level.residual.weights is None:
                gate = gate + own.float()  # every module owns one expert: its output is added as is
            else:
                gate = gate + level.residual.weights[g] * own
            fused.append(torch.bmm(gate.unsqueeze(1), experts_out).squeeze(1))  # (B, D)
        rows = fused
    logits = []
    for k in range(num_tasks):
        h = rows[k]
        for i, layer in enumerate(block.towers.layers):
            h = h @ layer.weight[k] + layer.bias[k, 0]
            if i < len(block.towers.layers) - 1:
                h = torch.relu(h)
        logits.append(h[:, 0])
    return torch.stack(logits, 1)


@pytest.mark.parametrize(
    "task_experts, shared_experts, learned",
    [(1, 1, False), (2, 2, True), (2, 0, True), (1, 0, False)],
)
def test_adatt_matches_the_reference_loop_forward_and_gradients(task_experts, shared_experts, learned):
    config = ModelConfig.from_dict(
        {
            "inputs": {"num_dense": 7},
            "tasks": TASKS,
            "block": {"type": "adatt", "levels": 2, "task_experts": task_experts, "num_experts": shared_experts},
            "experts": {"hidden": [6, 5]},
            "towers": {"hidden": [4]},
        }
    )
    model = MultiTaskModel(config).eval()
    lower, last = model.block.levels
    assert lower.gates.num_gates == 3 + (shared_experts > 0) and last.gates.num_gates == 3
    assert (lower.residual.weights is not None) == learned and bool(lower.gates.allowed.all())
    with torch.no_grad():  # gates far from uniform, so the test sees them
        for level in model.block.levels:
            level.gates.proj.weight.normal_(0, 0.5)
    x = torch.randn(9, 7)
    out = model(x, torch.zeros(9, 0, dtype=torch.long))
    ref = reference_adatt(model, x)
    torch.testing.assert_close(out.task_logits, ref, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(out.task_logits.sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_adatt_learned_native_weights_start_in_the_references_range_and_only_on_own_experts():
    config = ModelConfig.from_dict(
        {"inputs": {"num_dense": 4}, "tasks": TASKS, "block": {"type": "adatt", "task_experts": 4, "num_experts": 2}}
    )
    weights = MultiTaskModel(config).block.levels[0].residual.weights  # (K + 1, E): 3 tasks x 4 + 2 shared
    assert weights.shape == (4, 14)
    assert weights[0, :4].abs().max() <= 0.5 and weights[0, :4].abs().min() > 0  # uniform(+-sqrt(1/4))
    assert (weights[0, 4:] == 0).all() and (weights[3, :12] == 0).all()
    assert weights[3, 12:].abs().max() <= 2**-0.5


def test_adatt_without_residual_is_a_fully_connected_ple():
    """``residual: none`` leaves the gated mixture alone: the outputs change, the gate weights do not."""
    base = {"inputs": {"num_dense": 4}, "tasks": TASKS, "block": {"type": "adatt", "levels": 1}}
    x, sparse = torch.randn(5, 4), torch.zeros(5, 0, dtype=torch.long)
    with_res = MultiTaskModel(ModelConfig.from_dict(base)).eval()
    plain = MultiTaskModel(ModelConfig.from_dict({**base, "block": {**base["block"], "residual": "none"}})).eval()
    assert plain.block.levels[0].residual is None
    a, b = with_res(x, sparse), plain(x, sparse)
    torch.testing.assert_close(a.gate_weights, b.gate_weights)
    assert not torch.allclose(a.task_logits, b.task_logits)
