"""The synthetic generator of Ma et al. (2018): task correlation set by the cosine of the task weights."""

import numpy as np
import pytest
import torch

from mtrank.data import make_synthetic
from mtrank.data.synthetic import SyntheticConfig, task_weights


@pytest.mark.parametrize("p", [1.0, 0.9, 0.5, 0.0, -0.3])
def test_task_weight_cosine_equals_correlation(p):
    w1, w2 = task_weights(SyntheticConfig(correlation=p, seed=3), torch.Generator().manual_seed(3))
    cos = float(w1 @ w2 / (w1.norm() * w2.norm()))
    assert cos == pytest.approx(p, abs=1e-6)
    assert float(w1.norm()) == pytest.approx(1.0, abs=1e-9)


def test_label_pearson_correlation_increases_with_p():
    pearson = []
    for p in [0.0, 0.5, 0.9, 1.0]:
        vals = []
        for seed in range(5):
            y = make_synthetic(n=5000, correlation=p, seed=seed).labels.numpy()
            vals.append(np.corrcoef(y[:, 0], y[:, 1])[0, 1])
        pearson.append(np.mean(vals))
    assert all(a < b for a, b in zip(pearson, pearson[1:])), pearson
    assert pearson[-1] > 0.95 and abs(pearson[0]) < 0.15


def test_synthetic_is_reproducible_per_seed():
    a, b = make_synthetic(n=100, seed=7), make_synthetic(n=100, seed=7)
    assert torch.equal(a.dense, b.dense) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, make_synthetic(n=100, seed=8).labels)


def test_synthetic_rejects_out_of_range_correlation():
    with pytest.raises(ValueError, match="correlation"):
        make_synthetic(n=10, correlation=1.5)
