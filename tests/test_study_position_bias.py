"""Study 2 (position bias): the impression simulator's ground truth, the bias measure, the --quick run."""

import json

import numpy as np
import pytest

from mtrank.cli import main
from mtrank.data.impressions import ImpressionConfig, make_impressions
from mtrank.experiments.studies.position_bias import bias_left


def test_clicks_fall_with_position_only_under_position_bias():
    def click_over_relevance(severity: float) -> np.ndarray:
        imp = make_impressions(ImpressionConfig(queries=4000, list_size=4, severity=severity, policy_noise=50.0))
        clicks = imp.rows.labels[:, 0].numpy()
        return np.array([clicks[imp.position == p].mean() / imp.relevance[imp.position == p].mean() for p in range(4)])

    assert click_over_relevance(0.0) == pytest.approx(np.ones(4), abs=0.06)
    assert click_over_relevance(1.0) == pytest.approx(1 / np.arange(1, 5), abs=0.06)


def test_the_logging_policy_shows_more_relevant_items_on_top():
    imp = make_impressions(ImpressionConfig(queries=2000, list_size=5, policy_noise=0.5))
    by_position = imp.by_query(imp.relevance).mean(0)
    assert np.all(np.diff(by_position) < 0)


def test_bias_left_is_zero_for_true_relevance_and_the_slope_for_a_position_term():
    imp = make_impressions(ImpressionConfig(queries=300, list_size=6))
    true_logit = np.log(imp.relevance / (1 - imp.relevance))
    assert bias_left(true_logit, imp) == pytest.approx(0.0, abs=1e-9)
    assert bias_left(2 * true_logit - 0.7 * np.log1p(imp.position), imp) == pytest.approx(0.7)


def test_quick_study_compares_the_tower_with_both_alternatives(tmp_path):
    out = tmp_path / "bias"
    assert main(["study", "position-bias", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["arms"] == [
        "no position, severity 1",
        "position feature, severity 1",
        "bias tower, severity 1",
        "bias tower, no dropout, severity 1",
    ]
    ndcg = [r["metrics"]["ndcg"] for runs in results["runs"].values() for r in runs]
    assert all(0.5 < v <= 1.0 for v in ndcg)
    assert {d["b"] for d in results["differences"]} == set(results["arms"]) - {"bias tower, severity 1"}
    assert (out / "position-bias.png").exists()
