import math

import numpy as np
import pytest
import torch

from mtrank.config import TaskConfig
from mtrank.data import make_synthetic
from mtrank.data.synthetic import SyntheticConfig, task_weights
from mtrank.evaluate.metrics import stacked_task_metrics, task_metrics
from mtrank.train.losses import multitask_loss


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


BINARY = torch.tensor([True, False])
WEIGHTS = torch.tensor([1.0, 2.0])


def test_missing_label_leaves_other_tasks_losses_unchanged():
    logits = torch.randn(6, 2)
    labels = torch.tensor([[1, 0.5], [0, 1.5], [1, -0.2], [0, 2.0], [1, 0.1], [0, 0.3]])
    _, full = multitask_loss(logits, labels, BINARY, WEIGHTS)
    masked = labels.clone()
    masked[2, 0] = math.nan
    _, part = multitask_loss(logits, masked, BINARY, WEIGHTS)
    assert part[1] == full[1]  # regression task untouched
    keep = torch.arange(6) != 2
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[keep, 0], labels[keep, 0])
    torch.testing.assert_close(part[0], expected)


def test_task_with_all_labels_missing_adds_zero_and_no_nan():
    logits = torch.randn(4, 2, requires_grad=True)
    labels = torch.tensor([[math.nan, 1.0]] * 4)
    total, per_task = multitask_loss(logits, labels, BINARY, WEIGHTS)
    assert per_task[0] == 0 and torch.isfinite(total)
    torch.testing.assert_close(total, 2.0 * per_task[1])
    total.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[:, 0] == 0).all()


def test_metrics_are_global_not_averaged_per_batch():
    from sklearn.metrics import roc_auc_score

    tasks = [TaskConfig("c", "binary"), TaskConfig("r", "regression")]
    logits = torch.randn(200, 2)
    labels = torch.stack([(torch.rand(200) < 0.3).float(), torch.randn(200)], 1)
    labels[:10, 0] = math.nan
    m = task_metrics(tasks, logits, labels)
    assert m["auc/c"] == pytest.approx(roc_auc_score(labels[10:, 0], torch.sigmoid(logits[10:, 0])))
    assert m["mse/r"] == pytest.approx(float(((logits[:, 1] - labels[:, 1]) ** 2).mean()), rel=1e-6)


@pytest.mark.parametrize("shared_labels", [False, True])
def test_stacked_metrics_equal_task_metrics_member_by_member(shared_labels):
    gen = torch.Generator().manual_seed(0)
    tasks = [TaskConfig("c", "binary"), TaskConfig("r", "regression")]
    members, n = 5, 300
    logits = torch.randn(members, n, 2, generator=gen) * 3
    labels = torch.stack([(torch.rand(members, n, generator=gen) < 0.3).float(), torch.randn(members, n)], 2)
    labels[0, :40, 0] = math.nan  # missing labels differ per member
    labels[1, :, 1] = math.nan  # a member with no regression labels at all
    labels[2, :, 0] = 1.0  # a single class: AUC undefined
    labels[3, :, 1] = 2.0  # a constant regression target
    logits[4, :, 0] = 40.0  # saturated probabilities (log loss clipping)
    if shared_labels:
        labels = labels[0]
    got = stacked_task_metrics(tasks, logits, labels)
    for r in range(members):
        want = task_metrics(tasks, logits[r], labels if shared_labels else labels[r])
        assert got[r].keys() == want.keys()
        for key, value in want.items():
            assert got[r][key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), (r, key)
