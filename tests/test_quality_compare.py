"""benchmarks/quality_vs_gbdt.py --quick: the whole comparison (searches, seeds, paired intervals, ablations) on
a few thousand rows of the clothing reviews, written to results.json and results.md."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quality_vs_gbdt  # noqa: E402


def test_quick_mode_writes_every_table_with_paired_intervals(tmp_path, shared_data):
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, str(REPO / "benchmarks" / "quality_vs_gbdt.py"), "--quick", "--out", str(tmp_path)]
    subprocess.run([*command, "--shared-data", str(shared_data)], check=True, env=env, capture_output=True)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] and results["trials"] == 2 and results["seeds"] == 2
    clothing = results["datasets"]["clothing"]
    assert clothing["search"]["mtrank"]["trials"] == 2
    assert set(clothing["search"]["gbdt"]) == {"recommended", "high_rating", "positive_feedback"}
    for table in ("vs_gbdt", "embedding_ablation"):
        for entry in clothing[table].values():
            d = entry["difference"]
            assert len(entry["a"]["runs"]) == 2 and d["low"] <= d["high"]
            assert d["estimate"] == pytest.approx(entry["a"]["mean"] - entry["b"]["mean"], abs=1e-4)  # float32 scores
    for variant in ("standardize", "log1p"):
        assert set(clothing["label_scaling"][variant]) == {"recommended", "rating", "positive_feedback"}
    assert "QUICK MODE" in (tmp_path / "results.md").read_text()


def test_the_paired_auc_equals_scikit_learns_and_its_interval_covers_a_known_difference():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 800).astype(float)
    good = labels[None] + rng.normal(0, 1.0, (3, 800))
    worse = labels[None] + rng.normal(0, 2.0, (3, 800))
    assert quality_vs_gbdt.auc_rows(labels, good)[0] == pytest.approx(roc_auc_score(labels, good[0]))
    result = quality_vs_gbdt.paired_interval(labels, good, worse, "auc", n_boot=300)
    assert result["low"] > 0  # resolved: every seed of one is far better
    same = quality_vs_gbdt.paired_interval(labels, good, good[::-1], "auc", n_boot=300)
    assert same["low"] < 0 < same["high"]
