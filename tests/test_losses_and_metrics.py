"""Multi-task losses with missing labels, and metrics computed over the whole set, not averaged per batch."""

import math

import pytest
import torch

from mtrank.config import TaskConfig
from mtrank.evaluate.metrics import stacked_task_metrics, task_metrics
from mtrank.train.losses import multitask_loss

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
