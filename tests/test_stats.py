"""mtrank.stats against hand-computed values, scipy / scikit-learn, brute force, and a published DeLong example."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mtrank import stats

# pROC's `aSAH` data (Turck et al. 2010; 113 patients): outcome at 6 months (G good, P poor), WFNS score, S100B.
ASAH = """
G,1,0.13 G,1,0.14 G,1,0.1 G,1,0.04 P,3,0.13 P,2,0.1 G,5,0.47 P,4,0.16 G,1,0.18 G,2,0.1 P,5,0.12
G,2,0.1 P,5,0.44 P,5,0.71 G,1,0.04 G,2,0.08 P,5,0.49 G,2,0.04 P,2,0.07 P,5,0.33 P,2,0.09
G,1,0.09 P,1,0.07 G,1,0.11 G,1,0.07 G,2,0.17 G,1,0.07 G,2,0.11 G,1,0.13 G,1,0.19 G,3,0.05
G,4,0.16 P,2,0.41 G,1,0.14 G,4,0.34 P,5,0.35 P,4,0.48 G,1,0.09 P,4,0.96 P,2,0.25 G,5,0.5
G,5,0.46 G,1,0.16 G,1,0.07 G,2,0.43 G,4,0.45 G,1,0.11 G,1,0.08 G,2,0.09 P,5,0.86 P,5,0.52
G,2,0.08 G,1,0.06 G,2,0.13 P,5,2.07 G,1,0.1 G,2,0.14 G,2,0.15 P,2,0.07 G,1,0.06 P,5,0.77
G,1,0.05 G,1,0.09 P,2,0.3 P,5,0.03 P,2,0.09 G,1,0.04 P,4,0.23 P,5,0.7 G,2,0.09 P,4,0.27 P,4,0.71
P,1,0.08 P,4,0.26 G,1,0.08 G,2,0.16 G,1,0.09 P,4,0.13 P,2,0.1 G,1,0.08 P,2,0.11 G,3,0.33
G,2,0.11 G,4,0.28 G,2,0.07 G,1,0.1 G,4,0.32 P,5,0.22 G,1,0.07 G,1,0.05 G,5,0.24 G,4,0.38 G,2,0.1
G,2,0.15 G,1,0.08 G,1,0.14 G,1,0.1 G,3,0.07 G,1,0.04 G,2,0.19 P,5,0.56 P,2,0.14 P,2,0.58
P,5,0.32 P,5,0.82 P,5,0.74 G,2,0.15 G,4,0.47 G,4,0.17 P,5,0.44 G,1,0.15 G,1,0.5 G,1,0.48
"""


def _asah():
    rows = [r.split(",") for r in ASAH.split()]
    return (
        np.array([r[0] == "P" for r in rows], dtype=int),
        np.array([float(r[1]) for r in rows]),
        np.array([float(r[2]) for r in rows]),
    )


def _correlated_scores(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    shared = rng.normal(size=n)
    a = y * 1.0 + shared + 0.5 * rng.normal(size=n)
    b = y * 0.8 + shared + 0.5 * rng.normal(size=n)
    return y, a, b


def test_delong_reproduces_proc_on_its_asah_example():
    """pROC: roc.test(aSAH$outcome ~ wfns vs s100b): AUC 0.8237 vs 0.7314, Z = 2.209, p-value = 0.02718."""
    y, wfns, s100b = _asah()
    assert (y.size, y.sum()) == (113, 41)
    result = stats.delong(y, wfns, s100b)
    assert result["auc_a"] == pytest.approx(0.8237, abs=5e-5)
    assert result["auc_b"] == pytest.approx(0.7314, abs=5e-5)
    assert result["z"] == pytest.approx(2.209, abs=5e-4)
    assert result["p"] == pytest.approx(0.02718, abs=5e-6)


def test_auc_equals_scikit_learn_with_ties_for_every_leading_index():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    scores = rng.integers(0, 20, size=(2, 3, 300)).astype(float)  # many ties
    got = stats.auc(y, scores)
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert got[i, j] == pytest.approx(roc_auc_score(y, scores[i, j]), abs=1e-12)


def test_auc_components_average_to_the_auc_and_count_pairs_by_brute_force():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 6, 60).astype(float)
    c = stats.auc_components(y, s)
    pos, neg = s[y == 1], s[y == 0]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # [m, n]
    assert np.allclose(c.positive, pairs.mean(1)) and np.allclose(c.negative, pairs.mean(0))
    assert c.positive.mean() == pytest.approx(float(c.auc)) == pytest.approx(c.negative.mean())


def test_delong_standard_error_matches_a_bootstrap_over_rows():
    y, a, b = _correlated_scores()
    result = stats.delong(y, a, b)
    rng = np.random.default_rng(3)
    rows = rng.integers(0, y.size, size=(600, y.size))
    diffs = [roc_auc_score(y[r], a[r]) - roc_auc_score(y[r], b[r]) for r in rows]
    assert result["se"] == pytest.approx(np.std(diffs, ddof=1), rel=0.12)
    assert result["estimate"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert result["se"] < math.sqrt(stats.auc_components(y, a).variance() + stats.auc_components(y, b).variance())


def test_delong_of_runs_compares_mean_aucs_and_equals_one_run_for_identical_copies():
    y, a, b = _correlated_scores(500, seed=4)
    one = stats.delong(y, a, b)
    copies = stats.delong(y, np.stack([a, a, a]), np.stack([b, b, b]))
    assert copies["estimate"] == pytest.approx(one["estimate"]) and copies["se"] == pytest.approx(one["se"])
    rng = np.random.default_rng(5)
    runs_a = a + 0.3 * rng.normal(size=(4, a.size))
    runs_b = b + 0.3 * rng.normal(size=(4, b.size))
    mean = stats.delong(y, runs_a, runs_b)
    assert mean["auc_a"] == pytest.approx(np.mean([roc_auc_score(y, r) for r in runs_a]))
    assert mean["estimate"] == pytest.approx(mean["auc_a"] - mean["auc_b"])


def test_delong_rejects_rows_that_do_not_match_or_one_class():
    y, a, b = _correlated_scores(100)
    with pytest.raises(ValueError, match="both classes"):
        stats.delong(np.zeros(100), a, b)
    other = stats.auc_components(y[:50], a[:50])
    with pytest.raises(ValueError, match="same rows"):
        stats.delong_from_components(stats.auc_components(y, a), other)


def test_midranks_match_scipy_rankdata_along_the_last_axis():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(6).integers(0, 5, size=(3, 4, 50)).astype(float)
    assert np.array_equal(stats.midranks(x), scipy_stats.rankdata(x, axis=-1))


def test_paired_bootstrap_of_a_constant_difference_is_that_constant():
    a = np.array([0.91, 0.95, 0.93, 0.97])
    result = stats.paired_bootstrap(a, a - 0.01, n_boot=500)
    assert result["estimate"] == pytest.approx(0.01)
    assert result["low"] == pytest.approx(0.01) and result["high"] == pytest.approx(0.01)
    assert result["p"] == 0.0


def test_paired_bootstrap_standard_error_is_that_of_the_mean_difference_and_seeded():
    rng = np.random.default_rng(7)
    a = rng.normal(0.0, 1.0, 400)
    b = a + rng.normal(-0.2, 0.5, 400)  # paired: the difference has sd 0.5, not sqrt(1 + 1.25)
    first = stats.paired_bootstrap(a, b, n_boot=4000, seed=11)
    assert first["se"] == pytest.approx(np.std(a - b, ddof=1) / 20, rel=0.08)
    assert first == stats.paired_bootstrap(a, b, n_boot=4000, seed=11)
    assert first != stats.paired_bootstrap(a, b, n_boot=4000, seed=12)
    assert stats.verdict(first) == "A better"


def test_stratified_bootstrap_keeps_each_strata_size_and_removes_between_strata_variance():
    # two splits whose level differs by 1; within a split the values vary by 0.01
    strata = np.repeat([0, 1], 10)
    x = strata * 1.0 + np.tile(np.linspace(0, 0.01, 10), 2)
    stratified = stats.bootstrap_interval(x, strata=strata, n_boot=2000)
    pooled = stats.bootstrap_interval(x, n_boot=2000)
    assert stratified["high"] - stratified["low"] < 0.01 < pooled["high"] - pooled["low"]
    index = stats._resample(20, strata, 50, np.random.default_rng(0))
    assert ((index < 10).sum(1) == 10).all()
    with pytest.raises(ValueError, match="one label per value"):
        stats.bootstrap_interval(x, strata=strata[:5])


def test_paired_bootstrap_of_medians_and_trimmed_means():
    a = np.array([0.5, 0.94, 0.95, 0.95, 0.96])  # one collapsed run
    b = np.array([0.93, 0.94, 0.94, 0.94, 0.95])
    mean = stats.paired_bootstrap(a, b, n_boot=200)
    median = stats.paired_bootstrap(a, b, "median", n_boot=200)
    assert mean["estimate"] == pytest.approx(a.mean() - b.mean())
    assert median["estimate"] == pytest.approx(0.95 - 0.94)
    trimmed = stats.paired_bootstrap(a, b, "trimmed_mean", n_boot=200)
    assert trimmed["estimate"] == pytest.approx(a.mean() - b.mean())  # 10% of 5 runs trims nothing


def test_trimmed_mean_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(8).normal(size=(3, 23))
    assert np.allclose(stats.trimmed_mean(x, 0.1), scipy_stats.trim_mean(x, 0.1, axis=-1))


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005, 3 x 0.01, 2 x 0.03, max(1 x 0.04, 0.06)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]).tolist() == pytest.approx([1.0, 1.0])


def test_holm_intervals_exclude_zero_exactly_when_holm_rejects():
    estimates = [0.003, 0.0015, 0.0012, -0.002, 0.0001]
    ses = [0.001, 0.0007, 0.0006, 0.0008, 0.0005]
    results = stats.holm_intervals(estimates, ses)
    for r in results:
        excludes = r["low"] > 0 or r["high"] < 0
        assert excludes == (r["p_holm"] < 0.05)
        assert r["p_holm"] >= r["p"]
    single = stats.holm_intervals([0.002], [0.001])[0]
    assert single["level"] == pytest.approx(0.95)
    assert single["low"] == pytest.approx(0.002 - 1.959964 * 0.001, abs=1e-8)


def test_mann_whitney_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(9)
    a, b = rng.integers(0, 8, 30).astype(float), rng.integers(1, 9, 25).astype(float)
    ours = stats.mann_whitney(a, b)
    theirs = scipy_stats.mannwhitneyu(a, b, method="asymptotic")
    assert ours["u"] == pytest.approx(theirs.statistic) and ours["p"] == pytest.approx(theirs.pvalue)


def test_summaries_count_collapsed_runs_with_a_wilson_interval():
    s = stats.summarize([0.5, 0.94, 0.95, 0.95, 0.96, 0.55])
    assert (s["n"], s["collapses"]) == (6, 2)
    assert s["median"] == pytest.approx(0.945)
    assert s["mean"] == pytest.approx(np.mean([0.5, 0.94, 0.95, 0.95, 0.96, 0.55]))
    assert s["se"] == pytest.approx(s["std"] / math.sqrt(6))
    low, high = s["collapse_interval"]
    assert low < 1 / 3 < high
    # Wilson 95% for 2 of 100: the textbook 0.0055 .. 0.0700
    assert stats.wilson_interval(2, 100) == pytest.approx((0.0055, 0.0700), abs=5e-5)


def test_verdicts():
    assert stats.verdict({"low": 0.001, "high": 0.002}, "MMoE", "OMoE") == "MMoE better"
    assert stats.verdict((-0.002, -0.001), "MMoE", "OMoE") == "OMoE better"
    assert stats.verdict((-0.001, 0.001)) == "not resolvable"
    assert stats.verdict((0.0, 0.001)) == "not resolvable"  # touching 0 does not decide


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(10)
    a, b = rng.integers(0, 6, 80), rng.integers(0, 6, 80) + rng.integers(0, 6, 80)
    assert stats.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)


def test_far_outliers_are_beyond_three_interquartile_ranges():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 35.0])  # Q1 3, Q3 7: the fence is 7 + 3 x 4 = 19
    assert stats.far_outliers(x).tolist() == [False] * 8 + [True]
    x[-1] = 19.0
    assert not stats.far_outliers(x).any()
