"""Study 5 (score stability): rank-biased overlap, and the --quick run of retrains with score regularisation."""

import json

import numpy as np
import pytest

from mtrank.cli import main
from mtrank.experiments.studies.score_stability import rank_biased_overlap


def test_rbo_is_one_for_equal_lists_zero_for_disjoint_and_weighs_the_top_most():
    top = np.arange(10)
    assert rank_biased_overlap(top, top) == pytest.approx(1.0)
    assert rank_biased_overlap(top, top + 10) == 0.0
    swap_top, swap_bottom = top.copy(), top.copy()
    swap_top[[0, 1]] = swap_top[[1, 0]]
    swap_bottom[[8, 9]] = swap_bottom[[9, 8]]
    assert rank_biased_overlap(top, swap_top) < rank_biased_overlap(top, swap_bottom) < 1.0
    assert rank_biased_overlap(top, swap_top) == pytest.approx(rank_biased_overlap(swap_top, top))


def test_quick_study_retrains_with_and_without_score_regularisation(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("MTRANK_SHARED_DATA", str(shared_data))
    out = tmp_path / "stability"
    assert main(["study", "score-stability", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["arms"] == ["no regularization", "score_l2 weight 10"]
    for arm in results["arms"]:
        first, regularised = results["runs"]["no regularization"][0], results["runs"][arm][0]
        assert regularised["per_retrain_auc"][0] == first["per_retrain_auc"][0]  # retrain 0 is shared
        assert -1 <= regularised["metrics"]["kendall_tau"] <= 1 and 0 <= regularised["metrics"]["rbo"] <= 1
    assert results["runs"]["score_l2 weight 10"][0]["per_retrain_auc"][1] != first["per_retrain_auc"][1]
    assert len(results["runs"]["no regularization"][0]["last_two_scores"]) == 2
    assert results["runs"]["score_l2 weight 10"][1]["objectives"] == ["labels", "score_l2 x 10"]
    assert results["runs"]["no regularization"][1]["objectives"] == ["labels", "labels"]
    assert (out / "score-stability.png").exists()
