"""Study 3 (distillation under short retention): the drifting simulator and the --quick run."""

import json

import numpy as np
import pytest

from mtrank.cli import main
from mtrank.data.drift import DriftConfig, make_drifting_periods


def label_agreement(drift: float) -> float:
    """How well period 0's best predictor (its true direction) still ranks the last period's labels (AUC)."""
    from sklearn.metrics import roc_auc_score

    periods = make_drifting_periods(DriftConfig(periods=6, rows_per_period=5000, drift=drift, scale=4.0))
    first, last = periods[0], periods[-1]
    direction = np.linalg.lstsq(first.dense.numpy(), first.labels[:, 0].numpy() - 0.5, rcond=None)[0]
    return roc_auc_score(last.labels[:, 0].numpy(), last.dense.numpy() @ direction)


def test_the_label_relation_drifts_only_with_drift():
    assert label_agreement(0.0) > 0.85
    assert label_agreement(0.4) < label_agreement(0.0) - 0.1


def test_bad_simulator_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match="periods >= 2"):
        make_drifting_periods(DriftConfig(periods=1))


def test_quick_study_trains_teacher_short_window_and_distilled_students(tmp_path):
    out = tmp_path / "distill"
    assert main(["study", "distill-retention", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["arms"] == [
        "teacher (long window), drift 0.1",
        "student, short window, drift 0.1",
        "student + pointwise, drift 0.1",
        "student + pairwise, drift 0.1",
    ]
    aucs = {arm: [r["metrics"]["auc"] for r in runs] for arm, runs in results["runs"].items()}
    assert all(0.5 < v < 1 for values in aucs.values() for v in values)
    assert aucs["student + pointwise, drift 0.1"] != aucs["student + pairwise, drift 0.1"]
    assert len(results["differences"]) == 4 and (out / "distill-retention.png").exists()
