"""Study 6 (summarization layer + transformer mixer): the variants' configs and the --quick run."""

import json

import pytest
import torch

from mtrank.cli import main
from mtrank.config import ModelConfig
from mtrank.experiments.studies.summarization import VARIANTS, SummarizationSetting, forward_flops, variant_config
from mtrank.model import MultiTaskModel, count_parameters
from test_pipeline_configs import write_movielens


def test_the_summary_mixes_groups_not_tokens_and_the_wiring_moves_its_output():
    base = ModelConfig(inputs={"num_dense": 3, "vocab_sizes": [5] * 12, "embedding_dim": 8})
    groups = [[0, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12]]
    models = {v: MultiTaskModel(variant_config(SummarizationSetting(), base, groups, v)) for v in VARIANTS}
    assert models["no mixer"].mixer is None
    assert models["mixer all, input"].mixer.output_dim == 13 * 8  # every token
    assert models["summary, input"].mixer.output_dim == 3 * 8  # one token per group
    assert models["summary, experts"].mixer_to_towers and not models["summary, input"].mixer_to_towers
    assert count_parameters(models["summary, input"]) < count_parameters(models["mixer all, input"])
    dense, sparse = torch.randn(16, 3), torch.zeros(16, 12, dtype=torch.long)
    flops = {v: forward_flops(m.eval(), dense, sparse) for v, m in models.items()}
    # the mixer's attention is counted (evaluation mode's fused kernel is not), and it grows with tokens
    assert flops["mixer all, input"] > flops["summary, input"] > flops["no mixer"]
    assert flops["mixer all, input"] - flops["no mixer"] > 2 * 13 * 13 * 8 * 2  # at least QK^T and AV
    assert not models["no mixer"].training  # the mode is restored


@pytest.mark.parametrize("with_movielens", [False, True])
def test_quick_study_reports_quality_and_cost_of_every_variant(tmp_path, shared_data, monkeypatch, with_movielens):
    monkeypatch.setenv("MTRANK_SHARED_DATA", str(shared_data))
    monkeypatch.delenv("MTRANK_MOVIELENS", raising=False)
    if with_movielens:
        write_movielens(tmp_path)
        monkeypatch.setenv("MTRANK_MOVIELENS", str(tmp_path / "recbole"))
    out = tmp_path / "study"
    assert main(["study", "summarization", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["arms"]) == 10 if with_movielens else 5
    for arm in results["arms"]:
        for run in results["runs"][arm]:
            assert run["metrics"]["params"] > 0 and run["metrics"]["kflops"] > 0 and 0 <= run["metrics"]["auc"] <= 1
    assert (out / "results.md").read_text().count("summary, experts") >= 2
    assert (out / "summarization.png").is_file()
