"""Study 1 (gate polarization): the gate statistics and the study's --quick run, on synthetic data and census."""

import json

import numpy as np
import pytest
import torch

from mtrank.cli import main
from mtrank.evaluate.gates import gate_report
from mtrank.experiments.studies.common import gate_summary


def test_a_collapsed_gate_counts_one_effective_expert_and_the_rest_polarised():
    collapsed = torch.zeros(50, 2, 8)
    collapsed[:, :, 3] = 1.0  # every row, both tasks: expert 3 takes everything
    stats = gate_summary(gate_report(collapsed, ["a", "b"]))
    assert stats == pytest.approx(
        {"gate_entropy": 0.0, "polarized_experts": 7.0, "top_expert_share": 1.0, "effective_experts": 1.0}, abs=1e-6
    )
    uniform = gate_summary(gate_report(torch.full((50, 2, 8), 1 / 8), ["a", "b"]))
    assert uniform["effective_experts"] == pytest.approx(8.0) and uniform["polarized_experts"] == 0.0
    assert uniform["gate_entropy"] == pytest.approx(np.log(8))


def test_quick_study_runs_every_arm_with_census_and_follows_the_gates_over_training(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("MTRANK_SHARED_DATA", str(shared_data))
    out = tmp_path / "gates"
    assert main(["study", "gate-polarization", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["arms"]) == 6 and sum(a.startswith("census") for a in results["arms"]) == 2
    assert len(results["differences"]) == 3 * len(results["metrics"])
    run = results["runs"][results["arms"][1]][0]
    assert [h["step"] for h in run["gates_over_training"]] == [15, 30]
    assert 0 < run["metrics"]["effective_experts"] <= results["setting"]["num_experts"]
    assert (out / "gate-polarization.png").stat().st_size > 1000 and "gate dropout 0.1" in (
        out / "results.md"
    ).read_text()
