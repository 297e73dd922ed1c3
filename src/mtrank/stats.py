"""Statistics for comparing trained models: run summaries, paired bootstrap intervals, DeLong's test for two
correlated AUCs, Holm's correction, Mann-Whitney, and a verdict that says when a comparison is resolved.

Everything is vectorised numpy and seeded; nothing here knows about models. The studies use it like this:

* one value per run (a test AUC, a final loss) -> :func:`summarize` (mean, median, trimmed mean, collapse rate);
* two methods run on the same splits with the same seeds -> :func:`paired_bootstrap` of the difference of their
  means (resampling the (split, seed) pairs, within each split when ``strata`` is given): the uncertainty that
  comes from training (initialisation, batch order, early stopping);
* two sets of scores on the same test rows -> :func:`delong` (or :func:`delong_from_components` for means of
  many runs): the uncertainty that comes from which rows were drawn as the test set;
* several comparisons at once -> :func:`holm` adjusted p-values and :func:`holm_intervals`;
* :func:`verdict` of an interval of ``A - B``: "A better", "B better" or "not resolvable".

Example:
    >>> a = np.array([0.945, 0.946, 0.944, 0.947, 0.945])
    >>> b = np.array([0.943, 0.944, 0.944, 0.944, 0.942])
    >>> ci = paired_bootstrap(a, b, n_boot=2000, seed=0)
    >>> round(ci["estimate"], 4), verdict(ci, "MMoE", "OMoE")
    (0.002, 'MMoE better')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

_NORMAL = NormalDist()


# ---------------------------------------------------------------------------------------------- summaries


def trimmed_mean(values, trim: float = 0.1, axis: int = -1) -> np.ndarray | float:
    """Mean after dropping ``floor(trim * n)`` values at each end (scipy's ``trim_mean``), along ``axis``.

    >>> trimmed_mean([0.5, 0.94, 0.95, 0.95, 0.96, 0.95, 0.94, 0.95, 0.96, 0.99], trim=0.1)
    0.95
    """
    x = np.sort(np.asarray(values, dtype=float), axis=axis)
    n = x.shape[axis]
    cut = int(math.floor(trim * n))
    kept = np.take(x, np.arange(cut, n - cut), axis=axis)
    out = kept.mean(axis=axis)
    return float(out) if np.ndim(out) == 0 else out


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (e.g. the share of collapsed runs).

    >>> [round(v, 4) for v in wilson_interval(2, 100)]
    [0.0055, 0.07]
    """
    if n == 0:
        return (math.nan, math.nan)
    z = _z(level)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(values, collapse_below: float | None = 0.6, trim: float = 0.1) -> dict:
    """Mean, sample std, standard error, median, trimmed mean, min, max, n, and (with ``collapse_below``) the
    runs below that value: count, rate and its Wilson 95% interval (for AUC, 0.6: a run that learned nothing).

    >>> s = summarize([0.5, 0.94, 0.95, 0.95, 0.96])
    >>> s["median"], s["collapses"], round(s["collapse_rate"], 2)
    (0.95, 1, 0.2)
    """
    x = np.asarray(values, dtype=float)
    n = x.size
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    out = {
        "n": int(n),
        "mean": float(x.mean()),
        "std": std,
        "se": std / math.sqrt(n) if n > 1 else math.nan,
        "median": float(np.median(x)),
        "trimmed_mean": trimmed_mean(x, trim),
        "trim": trim,
        "min": float(x.min()),
        "max": float(x.max()),
    }
    if collapse_below is not None:
        k = int((x < collapse_below).sum())
        out.update(
            collapse_below=collapse_below, collapses=k, collapse_rate=k / n, collapse_interval=wilson_interval(k, n)
        )
    return out


# ---------------------------------------------------------------------------------------------- bootstrap

MIN_PAIRS = 10  # a percentile bootstrap over fewer values is too narrow (it undercovers): decide nothing on it

STATISTICS = {
    "mean": lambda x: x.mean(axis=-1),
    "median": lambda x: np.median(x, axis=-1),
    "trimmed_mean": lambda x: trimmed_mean(x, 0.1, axis=-1),
    "std": lambda x: x.std(axis=-1, ddof=1),
    "p90": lambda x: np.quantile(x, 0.9, axis=-1),
}


def _resample(n: int, strata, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n]`` row indices drawn with replacement, within each stratum (its size kept) when given."""
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    strata = np.asarray(strata)
    if strata.shape != (n,):
        raise ValueError(f"strata must have one label per value ({n}), got shape {strata.shape}")
    parts = []
    for label in np.unique(strata):
        rows = np.flatnonzero(strata == label)
        parts.append(rows[rng.integers(0, rows.size, size=(n_boot, rows.size))])
    return np.concatenate(parts, axis=1)


def _percentile_result(estimate: float, boot: np.ndarray, level: float, n: int) -> dict:
    alpha = 1 - level
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min(float((boot <= 0).mean()), float((boot >= 0).mean())))
    return {
        "estimate": float(estimate),
        "low": float(low),
        "high": float(high),
        "se": float(boot.std(ddof=1)),
        "p": p,  # bootstrap p of "no difference"; its resolution is 1 / n_boot
        "level": level,
        "n": n,
        "n_boot": int(boot.size),
    }


def bootstrap_interval(
    values, statistic: str = "mean", strata=None, n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> dict:
    """Percentile bootstrap interval of one statistic of ``values`` (resampled within ``strata`` if given).

    >>> r = bootstrap_interval([1.0, 2.0, 3.0, 4.0], n_boot=4000, seed=0)
    >>> r["estimate"], r["low"] >= 1.0, r["high"] <= 4.0
    (2.5, True, True)
    """
    x = np.asarray(values, dtype=float)
    stat = STATISTICS[statistic]
    index = _resample(x.size, strata, n_boot, np.random.default_rng(seed))
    return _percentile_result(float(stat(x)), stat(x[index]), level, x.size)


def paired_bootstrap(
    a, b, statistic: str = "mean", strata=None, n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> dict:
    """Percentile bootstrap interval of ``statistic(a) - statistic(b)`` where ``a[i]`` and ``b[i]`` are a pair
    (the same split and seed of two methods): the pairs are resampled together, within each stratum (e.g. the
    split) when ``strata`` is given. ``statistic``: ``mean``, ``median``, ``trimmed_mean`` (10% each end),
    ``std`` or ``p90`` (the spread of a set of runs).

    Returns ``estimate``, ``low``, ``high`` (the interval at ``level``), ``se`` (std of the bootstrap
    distribution), ``p`` (two-sided bootstrap p of no difference), ``n`` and ``n_boot``.

    >>> r = paired_bootstrap([3.0, 5.0, 4.0, 6.0], [1.0, 2.0, 2.0, 3.0], n_boot=2000, seed=1)
    >>> r["estimate"], r["low"] > 0
    (2.5, True)
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be paired 1-d arrays of one length, got shapes {a.shape} and {b.shape}")
    stat = STATISTICS[statistic]
    index = _resample(a.size, strata, n_boot, np.random.default_rng(seed))
    return _percentile_result(float(stat(a) - stat(b)), stat(a[index]) - stat(b[index]), level, a.size)


# ---------------------------------------------------------------------------------------------- AUC, DeLong


def midranks(values) -> np.ndarray:
    """Ranks 1..n along the last axis, ties given their average rank (scipy's ``rankdata(method="average")``).

    >>> midranks([[3.0, 1.0, 3.0, 2.0]]).tolist()
    [[3.5, 1.0, 3.5, 2.0]]
    """
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, axis=-1, kind="stable")
    s = np.take_along_axis(x, order, axis=-1)
    n = s.shape[-1]
    index = np.broadcast_to(np.arange(n), s.shape)
    starts = np.ones(s.shape, dtype=bool)  # first position of each run of equal values
    starts[..., 1:] = s[..., 1:] != s[..., :-1]
    ends = np.ones(s.shape, dtype=bool)  # last position of each run
    ends[..., :-1] = starts[..., 1:]
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, index, n - 1), -1), axis=-1), -1)
    ranks = np.empty(s.shape)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=-1)
    return ranks


@dataclass
class AucComponents:
    """DeLong's structural components of AUCs on one set of labelled rows (Sun & Xu, 2014).

    ``positive[..., i]``: the share of negatives scored below positive i (ties count half);
    ``negative[..., j]``: the share of positives scored above negative j. Both average to ``auc``.
    Leading dimensions (e.g. runs) are kept.
    """

    auc: np.ndarray  # [...]
    positive: np.ndarray  # [..., m]
    negative: np.ndarray  # [..., n]

    def mean(self) -> AucComponents:
        """The components of the mean AUC over the leading dimensions (a mean of AUCs on the same rows is a
        U-statistic whose components are the means of theirs)."""
        lead = tuple(range(self.auc.ndim))
        return AucComponents(np.asarray(self.auc.mean()), self.positive.mean(axis=lead), self.negative.mean(axis=lead))

    def variance(self) -> np.ndarray:
        """DeLong's variance of the AUC: ``var(positive) / m + var(negative) / n``."""
        return _component_variance(self.positive, self.negative)


def _component_variance(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    return positive.var(axis=-1, ddof=1) / positive.shape[-1] + negative.var(axis=-1, ddof=1) / negative.shape[-1]


def _split_labels(labels) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one 0/1 value per row, got shape {y.shape}")
    positive = y.astype(bool)
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError("labels must be 0/1")
    if positive.all() or not positive.any():
        raise ValueError("labels need both classes for an AUC")
    return positive, ~positive


def auc_components(labels, scores) -> AucComponents:
    """AUC of ``scores [..., N]`` for 0/1 ``labels [N]`` (ties count half; the Mann-Whitney AUC, equal to
    scikit-learn's ``roc_auc_score``) with DeLong's structural components, for every leading index at once.

    >>> c = auc_components([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    >>> float(c.auc), c.positive.tolist(), c.negative.tolist()
    (0.75, [0.5, 1.0], [1.0, 0.5])
    """
    positive, negative = _split_labels(labels)
    s = np.asarray(scores, dtype=float)
    pos, neg = s[..., positive], s[..., negative]
    m, n = pos.shape[-1], neg.shape[-1]
    ranks = midranks(np.concatenate([pos, neg], axis=-1))
    rank_pos, rank_neg = ranks[..., :m], ranks[..., m:]
    auc = (rank_pos.sum(axis=-1) - m * (m + 1) / 2) / (m * n)
    return AucComponents(
        auc=auc,
        positive=(rank_pos - midranks(pos)) / n,
        negative=1.0 - (rank_neg - midranks(neg)) / m,
    )


def auc(labels, scores) -> np.ndarray | float:
    """The AUC of ``scores [..., N]`` for 0/1 ``labels [N]``, for every leading index (ties count half).

    >>> auc([0, 1, 0, 1], [[0.1, 0.9, 0.2, 0.8], [0.5, 0.5, 0.5, 0.5]]).tolist()
    [1.0, 0.5]
    """
    value = auc_components(labels, scores).auc
    return float(value) if np.ndim(value) == 0 else value


def delong_from_components(a: AucComponents, b: AucComponents, level: float = 0.95) -> dict:
    """DeLong's test of ``AUC_a - AUC_b`` for two scorings of the same rows, from their components (1-d, or
    with leading run dimensions, which are averaged first: the difference of two methods' mean AUCs).

    Returns ``auc_a``, ``auc_b``, ``estimate``, ``se``, ``z``, ``p`` (two-sided) and the normal interval
    ``low``, ``high`` at ``level``.
    """
    a, b = (c.mean() if c.auc.ndim else c for c in (a, b))
    if a.positive.shape != b.positive.shape or a.negative.shape != b.negative.shape:
        raise ValueError("the two scorings must be of the same rows (same positives and negatives)")
    diff = float(a.auc - b.auc)
    se = float(np.sqrt(_component_variance(a.positive - b.positive, a.negative - b.negative)))
    return {"auc_a": float(a.auc), "auc_b": float(b.auc), **normal_test(diff, se, level)}


def delong(labels, scores_a, scores_b, level: float = 0.95) -> dict:
    """DeLong's test for two correlated AUCs on the same rows (DeLong, DeLong & Clarke-Pearson 1988; the fast
    algorithm of Sun & Xu 2014). ``scores_*``: ``[N]``, or ``[R, N]`` for R runs whose mean AUC is compared.

    pROC's example (its ``aSAH`` data, WFNS vs S100B) gives Z = 2.209, p = 0.02718; ``tests/test_stats.py``
    checks this function against it.

    >>> r = delong([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.5, 0.3, 0.4, 0.2, 0.6])
    >>> round(r["auc_a"], 4), round(r["auc_b"], 4), round(r["estimate"], 4)
    (1.0, 0.6667, 0.3333)
    """
    return delong_from_components(auc_components(labels, scores_a), auc_components(labels, scores_b), level)


# ---------------------------------------------------------------------------------------------- tests, corrections


def _z(level: float) -> float:
    return _NORMAL.inv_cdf(0.5 + level / 2)


def normal_test(estimate: float, se: float, level: float = 0.95) -> dict:
    """``estimate``, ``se``, ``z``, two-sided ``p`` and the interval at ``level`` of a normal estimate.

    >>> r = normal_test(0.002, 0.001)
    >>> round(r["z"], 2), round(r["p"], 4), round(r["low"], 6)
    (2.0, 0.0455, 4e-05)
    """
    z = estimate / se if se > 0 else math.copysign(math.inf, estimate) if estimate else 0.0
    p = 2 * (1 - _NORMAL.cdf(abs(z))) if math.isfinite(z) else 0.0
    half = _z(level) * se
    return {"estimate": estimate, "se": se, "z": z, "p": p, "low": estimate - half, "high": estimate + half}


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down; reject those below alpha, controlling the family-wise
    error at alpha).

    >>> holm([0.01, 0.04, 0.03, 0.005]).tolist()
    [0.03, 0.06, 0.06, 0.02]
    """
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def holm_intervals(estimates, ses, alpha: float = 0.05) -> list[dict]:
    """Normal tests of several estimates with their Holm-adjusted p-values and matching intervals.

    Comparison i's interval is its normal interval at level ``1 - alpha * p_i / p_holm_i``: it excludes 0
    exactly when Holm rejects "no difference" at ``alpha`` (so :func:`verdict` of it is Holm's decision); for a
    single comparison it is the plain ``1 - alpha`` interval.

    >>> r = holm_intervals([0.002, 0.0005], [0.0008, 0.0008])
    >>> [round(x["p_holm"], 4) for x in r], [verdict(x) for x in r]
    ([0.0248, 0.532], ['A better', 'not resolvable'])
    """
    tests = [normal_test(float(e), float(s)) for e, s in zip(estimates, ses)]
    adjusted = holm([t["p"] for t in tests])
    out = []
    for test, p_holm in zip(tests, adjusted):
        level = 1 - alpha * (test["p"] / p_holm if p_holm > 0 else 1.0)
        interval = normal_test(test["estimate"], test["se"], min(level, 1 - 1e-15))
        out.append({**interval, "p": test["p"], "p_holm": float(p_holm), "level": level})
    return out


def mann_whitney(a, b) -> dict:
    """Two-sided Mann-Whitney U test of ``a`` against ``b`` (normal approximation with tie and continuity
    corrections, scipy's ``mannwhitneyu(method="asymptotic")``), with the common-language effect size
    ``P(a > b) + P(a = b) / 2``.

    >>> r = mann_whitney([1, 2, 3, 4, 5, 6], [4, 5, 6, 7, 8, 9])
    >>> r["u"], round(r["p"], 4), round(r["effect"], 3)
    (4.5, 0.0364, 0.125)
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n1, n2 = a.size, b.size
    ranks = midranks(np.concatenate([a, b]))
    u = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    n = n1 + n2
    _, counts = np.unique(ranks, return_counts=True)
    tie = float((counts**3 - counts).sum())
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - tie / (n * (n - 1))))
    mu = n1 * n2 / 2
    z = (abs(u - mu) - 0.5) / sigma if sigma > 0 else 0.0
    p = min(1.0, 2 * (1 - _NORMAL.cdf(max(z, 0.0)))) if sigma > 0 else 1.0
    return {"u": u, "p": p, "effect": u / (n1 * n2)}


def spearman(a, b) -> float:
    """Spearman's rank correlation (Pearson's of the midranks).

    >>> round(spearman([1, 2, 3, 4], [10, 30, 20, 40]), 6)
    0.8
    """
    ra, rb = midranks(np.asarray(a, dtype=float)), midranks(np.asarray(b, dtype=float))
    return float(np.corrcoef(ra, rb)[0, 1])


def far_outliers(values, k: float = 3.0) -> np.ndarray:
    """A mask of the values above ``Q3 + k * IQR`` (Tukey's far-out values for k = 3): failed fits in a sample
    of losses.

    >>> far_outliers([1.0, 1.1, 0.9, 1.05, 0.95, 9.0]).tolist()
    [False, False, False, False, False, True]
    """
    x = np.asarray(values, dtype=float)
    q1, q3 = np.quantile(x, [0.25, 0.75])
    return x > q3 + k * (q3 - q1)


# ---------------------------------------------------------------------------------------------- verdicts

VERDICTS = ("A better", "B better", "not resolvable")


def verdict(interval, a: str = "A", b: str = "B") -> str:
    """The decision an interval of ``A - B`` (higher = better) supports: ``"<a> better"`` when it lies above 0,
    ``"<b> better"`` below 0, else ``"not resolvable"``. ``interval``: ``(low, high)`` or a dict with them.

    >>> verdict((0.0004, 0.0021), "MMoE", "Shared-Bottom"), verdict((-0.001, 0.002)), verdict((-0.3, -0.1))
    ('MMoE better', 'not resolvable', 'B better')
    """
    low, high = (interval["low"], interval["high"]) if isinstance(interval, dict) else interval
    if low > 0:
        return f"{a} better"
    if high < 0:
        return f"{b} better"
    return "not resolvable"
