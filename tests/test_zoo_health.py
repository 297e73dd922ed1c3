"""HoME's expert-health metrics (zero activations, output-scale spread, shared-expert occupancy) in the gate
report, for every block of the zoo."""

import json

import pytest
import torch

from mtrank.config import ModelConfig
from mtrank.data.tensors import TensorData
from mtrank.evaluate.gates import ExpertStats, expert_health, format_gate_report, model_gate_report
from mtrank.model import MultiTaskModel

TASKS = [{"name": "click"}, {"name": "like"}]


def test_expert_health_on_a_hand_made_level():
    """3 experts of 2 units over 4 rows: expert 0 all zeros (dead), expert 1 one unit in 8 zero at RMS 2,
    expert 2 RMS 1. Gate weights: click gives expert 2 weight 0.9 per row, like 0.1: click occupies it;
    like alone uses expert 0, so it occupies that one."""
    out = torch.zeros(3, 4, 2)
    out[1] = torch.tensor([[0.0, 2.0], [2.0, -2.0], [2.0, 2.0], [-2.0, 2.0]]) * (8 / 7) ** 0.5  # 7 of 8 nonzero
    out[2] = torch.tensor([[1.0, -1.0]]).expand(4, 2)
    gates = torch.zeros(4, 2, 3)
    gates[:, 0] = torch.tensor([0.0, 0.1, 0.9])
    gates[:, 1] = torch.tensor([0.5, 0.4, 0.1])
    stats = ExpertStats()
    stats.add(out[:, :2], gates[:2])  # two batches: sums, not means of means
    stats.add(out[:, 2:], gates[2:])
    health = expert_health(stats, 2, ["click", "like"], allowed=torch.ones(2, 3, dtype=torch.bool))
    assert health["zero_activation_ratio"] == [1.0, 0.125, 0.0]
    assert health["dead_experts"] == 1 and health["scale_spread"] is None
    torch.testing.assert_close(torch.tensor(health["output_rms"]), torch.tensor([0.0, 2.0, 1.0]), rtol=1e-6, atol=1e-6)
    by_expert = {o["expert"]: o for o in health["shared_occupancy"]}
    assert by_expert[2]["top_gate"] == "click" and by_expert[2]["top_share"] == pytest.approx(0.9)
    assert by_expert[2]["occupied"] and not by_expert[1]["occupied"]  # 0.1 / 0.5 of expert 1: like holds 0.8
    assert by_expert[1]["top_share"] == pytest.approx(0.8)
    assert by_expert[0]["shares"] == {"click": 0.0, "like": 1.0} and health["occupied_shared_experts"] == 2
    json.dumps(health)  # plain data for the report files


def data_for(config: ModelConfig, rows: int = 64) -> TensorData:
    dense = torch.randn(rows, config.inputs.num_dense)
    columns = [torch.randint(0, v, (rows,)) for v in config.inputs.vocab_sizes]
    sparse = torch.stack(columns, 1) if columns else torch.zeros(rows, 0, dtype=torch.long)
    return TensorData(dense, sparse, torch.zeros(rows, len(config.tasks)))


ZOO = {
    "mmoe": {"block": {"type": "mmoe", "num_experts": 4}},
    "ple": {"block": {"type": "ple", "num_experts": 2, "levels": 2}},
    "adatt": {"block": {"type": "adatt", "num_experts": 1, "levels": 2}},
    "home": {"block": {"type": "home", "num_experts": 2, "task_groups": [["click"], ["like"]]}, "experts": "home"},
    "stem": {"block": {"type": "stem", "num_experts": 1, "levels": 1}},
    "dselect_k": {"block": {"type": "mmoe", "num_experts": 4}, "gate": {"type": "dselect_k", "k": 2}},
}


@pytest.mark.parametrize("name", ZOO)
def test_every_model_reports_the_health_of_every_level(name):
    config = ModelConfig.from_dict(
        {"inputs": {"num_dense": 3, "vocab_sizes": [5, 4], "embedding_dim": 4}, "tasks": TASKS, **ZOO[name]}
    )
    model = MultiTaskModel(config)
    report = model_gate_report(model, data_for(config), batch_size=24)
    assert model.training, "the report leaves the model's mode as it was"
    assert len(report["experts"]) == len(model.block.levels)
    for level, health in zip(model.block.levels, report["experts"]):
        assert len(health["zero_activation_ratio"]) == level.num_experts
    last = report["experts"][-1]
    expected_shared = {"mmoe": 4, "ple": 2, "adatt": 3, "home": 2, "stem": 3, "dselect_k": 4}[name]
    assert len(last["shared_occupancy"]) == expected_shared  # experts two or more task gates may use
    assert set(report["tasks"]) == {"click", "like"}
    assert "level 0: zero activations" in format_gate_report(report)
    json.dumps(report)


def test_normalised_swish_experts_keep_every_expert_at_one_scale():
    """One expert's weights shrunk 100x: a ReLU MLP expert's output shrinks with them (HoME's collapse), a
    LayerNorm + Swish expert's does not; Swish leaves no exact zeros, ReLU about half."""
    base = {"inputs": {"num_dense": 8}, "tasks": TASKS, "block": {"type": "mmoe", "num_experts": 4}}
    spreads, zeros = {}, {}
    for kind, experts in {"mlp": {"hidden": [16]}, "home": {"type": "home", "norm": "layer", "hidden": [16]}}.items():
        config = ModelConfig.from_dict({**base, "experts": experts})
        model = MultiTaskModel(config)
        with torch.no_grad():
            layer = model.block.levels[0].experts.layers[0]
            layer.weight[0] *= 0.01
            layer.bias[0] *= 0.01
        health = model_gate_report(model, data_for(config, 256))["experts"][0]
        spreads[kind], zeros[kind] = health["scale_spread"], max(health["zero_activation_ratio"])
    assert spreads["mlp"] > 20 and spreads["home"] < 1.5
    assert zeros["home"] == 0 and zeros["mlp"] > 0.2
