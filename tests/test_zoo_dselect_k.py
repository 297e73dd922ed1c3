"""DSelect-k gates (Hazimeh et al., NeurIPS 2021) against a loop over rows, gates, selectors and experts written
from the facts of the authors' reference (google-research ``dselect_k_moe``): the smooth step, binary codes most
significant bit first, a softmax over selectors, the entropy regulariser and the term for unreachable codes."""

import math

import numpy as np
import pytest
import torch

from mtrank.config import ConfigError, ModelConfig
from mtrank.model import MultiTaskModel
from mtrank.nn import DSelectKGates, block_layouts
from mtrank.nn.dselect_k import smooth_step


def smooth_step_reference(t: float, gamma: float) -> float:
    if t <= -gamma / 2:
        return 0.0
    if t >= gamma / 2:
        return 1.0
    return -2 * t**3 / gamma**3 + 3 * t / (2 * gamma) + 0.5


def reference_gate(gates: DSelectKGates, x: torch.Tensor, entropy_weight: float):
    """Weights ``[B, G, E]`` and the auxiliary loss, one row, gate, selector and expert at a time."""
    k, bits, gamma = gates.k, gates.bits, gates.gamma
    weight, bias = gates.proj.weight, gates.proj.bias  # (G, in, k*M + k), (G, 1, k*M + k)
    rows, (num_gates, num_experts) = x.shape[0], gates.allowed.shape
    out = [[None] * num_gates for _ in range(rows)]
    entropy_term, reach_term = x.new_zeros(()), x.new_zeros(())
    for g in range(num_gates):
        experts = [e for e in range(num_experts) if gates.allowed[g, e]]
        m = math.ceil(math.log2(len(experts)))
        codes = [np.binary_repr(j, width=m) for j in range(len(experts))]
        for b in range(rows):
            logits = x[b] @ weight[g] + bias[g, 0]
            z = [[logits[i * bits + l] for l in range(m)] for i in range(k)]  # the gate's m bits per selector
            alpha = torch.softmax(logits[k * bits :], 0)
            w = [x.new_zeros(()) for _ in range(num_experts)]
            for i in range(k):
                r = []
                for j, e in enumerate(experts):
                    value = x.new_ones(())
                    for l in range(m):
                        s = smooth_step(z[i][l], gamma)  # checked against the scalar formula below
                        value = value * (s if codes[j][l] == "1" else 1 - s)
                    r.append(value)
                    w[e] = w[e] + alpha[i] * value
                r = torch.stack(r)
                entropy_term = entropy_term - (r * torch.log(r + 1e-6)).sum() / rows
                if len(experts) != 2**m:
                    reach_term = reach_term + (1 / r.sum().clamp_min(1e-6) - 1) / rows  # ours: no 1/0
            out[b][g] = torch.stack(w)
    weights = torch.stack([torch.stack(row) for row in out])
    return weights, entropy_weight * entropy_term + reach_term


def test_smooth_step_is_the_papers_piecewise_cubic():
    for t in np.linspace(-1.5, 1.5, 31):
        for gamma in (0.5, 1.0, 2.0):
            assert smooth_step(torch.tensor(t), gamma).item() == pytest.approx(
                smooth_step_reference(t, gamma), abs=1e-6
            )


@pytest.mark.parametrize("shared_experts", [2, 3])  # 6 / 7 experts at the shared gate: unreachable codes
def test_dselect_k_matches_the_reference_loop_forward_and_gradients(shared_experts):
    torch.manual_seed(0)
    # PLE's lower level: task gates over own + shared experts (4 or 5), the shared gate over all (6 or 7)
    (lower, _) = block_layouts("ple", num_tasks=2, num_experts=shared_experts, task_experts=2, levels=2)
    gates = DSelectKGates(5, lower.allowed, k=3, gamma=1.0, entropy_weight=0.1)
    with torch.no_grad():  # logits spread over the smooth region and beyond it, so some steps saturate
        gates.proj.weight.normal_(0, 0.6)
        gates.proj.bias.normal_(0, 0.3)
    x = torch.randn(6, 5)
    weights, aux = gates(x)
    ref_weights, ref_aux = reference_gate(gates, x, 0.1)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-5, atol=1e-6)
    assert (weights[:, :, ~lower.allowed[0]][:, 0] == 0).all(), "a gate never weighs an expert it may not use"
    probe = torch.randn_like(weights)
    params = [gates.proj.weight, gates.proj.bias]
    grads = torch.autograd.grad((weights * probe).sum() + aux, params)
    ref_grads = torch.autograd.grad((ref_weights * probe).sum() + ref_aux, params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_saturated_selectors_give_at_most_k_experts_summing_to_one():
    gates = DSelectKGates(4, torch.ones(3, 8, dtype=torch.bool), k=2, gamma=1.0)
    with torch.no_grad():
        gates.proj.weight.zero_()
        gates.proj.bias.copy_(torch.randn_like(gates.proj.bias).sign() * 5)  # every |z| > gamma / 2: one-hot
    weights, aux = gates(torch.randn(10, 4))
    assert ((weights > 0).sum(-1) <= 2).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(10, 3))
    assert aux.item() == pytest.approx(0.0, abs=1e-4), (
        "one-hot selectors have no entropy, 8 experts no unreachable code"
    )
    # at initialisation (|z| <= gamma / 100) every expert is near 1/8
    fresh = DSelectKGates(4, torch.ones(3, 8, dtype=torch.bool), k=2)
    w0, aux0 = fresh(torch.randn(10, 4) * 0.1)
    assert (w0 - 1 / 8).abs().max() < 0.01 and aux0.item() > 0


def test_training_with_the_entropy_regulariser_makes_the_gate_sparse():
    """600 Adam steps on the entropy term alone drive every selector to one expert (k = 2 nonzero weights)."""
    torch.manual_seed(0)
    gates = DSelectKGates(4, torch.ones(2, 8, dtype=torch.bool), k=2, entropy_weight=1.0)
    optimizer = torch.optim.Adam(gates.parameters(), lr=0.05)
    x = torch.randn(64, 4)
    for _ in range(600):
        optimizer.zero_grad()
        gates(x)[1].backward()
        optimizer.step()
    weights, _ = gates(x)
    assert ((weights > 1e-6).sum(-1) <= 2).all()


def test_a_dselect_k_model_trains_under_bf16_autocast_and_reports_its_aux_loss():
    config = ModelConfig.from_dict(
        {
            "inputs": {"num_dense": 6},
            "block": {"type": "mmoe", "num_experts": 6},
            "gate": {"type": "dselect_k", "k": 2},
        }
    )
    model = MultiTaskModel(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(32, 6), torch.zeros(32, 0, dtype=torch.long))
    assert out.gate_weights.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    assert out.aux_loss.item() > 0  # 6 experts: 8 codes, the unreachable-code term is on
    (out.task_logits.float().sum() + out.aux_loss).backward()
    assert model.block.levels[0].gates.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "gate, message",
    [
        ({"type": "dselect_k", "k": 9}, "model.gate.k: k=9 exceeds the 8 experts"),
        ({"type": "dselect_k", "dropout": 0.1}, "model.gate.dropout: gate dropout is for softmax gates"),
        ({"type": "dselect_k", "gamma": 0}, "model.gate.gamma: must be > 0"),
    ],
)
def test_bad_dselect_k_options_name_the_field(gate, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({"inputs": {"num_dense": 3}, "gate": gate}, "model")
