"""Study 4 (infrastructure cost): FLOPs counting, side-by-side timing, and the --quick run on census."""

import json

import pytest
import torch

from mtrank.cli import main
from mtrank.config import ModelConfig
from mtrank.experiments.studies.infra_cost import flops_per_candidate, time_side_by_side
from mtrank.model import MultiTaskModel


def test_flops_per_candidate_count_the_expert_and_gate_matmuls():
    config = ModelConfig(inputs={"num_dense": 10}, block={"type": "mmoe", "num_experts": 3}, experts={"hidden": [4]})
    model = MultiTaskModel(config)
    flops = flops_per_candidate(model, torch.randn(16, 10), torch.zeros(16, 0, dtype=torch.long))
    experts, gates = 2 * 3 * 10 * 4, 2 * 2 * 10 * 3  # 3 experts 10 -> 4; 2 gates 10 -> 3
    assert experts + gates <= flops < experts + gates + 400  # + towers (4 -> 8 -> 1 each) and the gate mix


def test_side_by_side_timing_calls_every_scorer_every_round():
    calls = {"a": 0, "b": 0}

    def scorer(name):
        def score(dense, sparse):
            calls[name] += 1

        return score

    latency = time_side_by_side({"a": scorer("a"), "b": scorer("b")}, None, None, rounds=5, cuda=False)
    assert calls == {"a": 8, "b": 8} and set(latency) == {"a", "b"}  # 3 warm-up calls + 5 rounds


def test_quick_study_times_every_precision_of_both_gate_types(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("MTRANK_SHARED_DATA", str(shared_data))
    out = tmp_path / "infra"
    assert main(["study", "infra-cost", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["arms"]) == 8
    summary = results["summary"]
    assert summary["linear gates, fp32"]["params"]["mean"] < summary["MLP gates, fp32"]["params"]["mean"]
    assert summary["linear gates, fp32"]["auc_change"]["mean"] == 0.0
    assert abs(summary["linear gates, bf16"]["auc_change"]["mean"]) < 0.05
    assert summary["MLP gates, int8"]["kflops"]["mean"] == pytest.approx(summary["MLP gates, fp32"]["kflops"]["mean"])
