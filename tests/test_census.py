"""The UCI Census-Income loader: the paper's columns, labels, split and file checks."""

import gzip

import numpy as np
import pandas as pd
import pytest
import torch

from mtrank.data import census
from mtrank.data.census import CensusDataError, load_census


@pytest.fixture(scope="module")
def group1():
    import os
    from pathlib import Path

    root = Path(os.environ.get("MTRANK_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return load_census(root / "census-income", group=1)


def test_inputs_are_38_columns_without_education_marital_or_instance_weight(group1):
    assert group1.train.dense.shape == (199_523, 7)
    assert group1.train.sparse.shape == (199_523, 31)
    assert len(group1.numeric_columns) + len(group1.categorical_columns) == 38
    inputs = set(group1.numeric_columns) | set(group1.categorical_columns)
    assert not inputs & {"education", "marital_stat", "instance_weight", "income_50k"}
    assert len(group1.vocab_sizes) == 31
    assert all(int(ids.max()) < size for ids, size in zip(group1.train.sparse.T, group1.vocab_sizes))


def test_numeric_columns_are_standardised_on_the_training_file(group1):
    dense = group1.train.dense.double()
    assert torch.allclose(dense.mean(0), torch.zeros(7, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(dense.std(0), torch.ones(7, dtype=torch.float64), atol=1e-3)


def test_label_rates_are_income_6_2_and_never_married_43_3_percent(group1):
    rates = group1.train.labels.mean(0)
    assert rates[0].item() == pytest.approx(0.062, abs=0.0005)
    assert rates[1].item() == pytest.approx(0.433, abs=0.0005)
    assert [t.name for t in group1.tasks] == ["income", "marital"]


def test_label_correlation_is_close_to_the_papers(group1):
    assert abs(group1.label_correlation) == pytest.approx(census.PAPER_CORRELATION[1], abs=0.005)


def test_education_group_label_correlation_is_close_to_the_papers(shared_data):
    frame = census.read_census_file(shared_data / "census-income" / "census-income.data.gz")
    labels = census.census_labels(frame, group=2)
    correlation = np.corrcoef(labels.T)[0, 1]
    assert abs(correlation) == pytest.approx(census.PAPER_CORRELATION[2], abs=0.005)


def test_test_file_splits_one_to_one_into_disjoint_validation_and_test(group1):
    assert len(group1.valid) == len(group1.test) == 99_762 // 2
    rows = torch.cat([group1.valid_rows, group1.test_rows])
    assert torch.equal(rows.sort().values, torch.arange(99_762))  # a partition of the test file


def test_the_split_is_fixed_by_its_seed(tmp_path, shared_data):
    frame = census.read_census_file(shared_data / "census-income" / "census-income.test.gz").iloc[:400]
    for name in census.FILES.values():
        frame.to_csv(tmp_path / name, header=False, index=False)
    a = load_census(tmp_path, group=1, split_seed=0, check=False)
    b = load_census(tmp_path, group=1, split_seed=0, check=False)
    c = load_census(tmp_path, group=1, split_seed=1, check=False)
    assert torch.equal(a.valid_rows, b.valid_rows)
    assert torch.equal(a.valid.sparse, b.valid.sparse)
    assert not torch.equal(a.valid_rows, c.valid_rows)


def test_categories_unseen_in_training_go_to_the_out_of_vocabulary_id():
    def frame(values):
        return pd.DataFrame({c: values for c in census.CATEGORICAL})

    train_ids, other_ids, sizes = census._encode(frame(["a", "b", "a"]), frame(["b", "zzz"]))
    assert sizes[0] == 3  # a, b + OOV
    assert train_ids[:, 0].tolist() == [1, 2, 1]
    assert other_ids[:, 0].tolist() == [2, 0]


def test_a_corrupt_file_fails_its_checksum_naming_the_file(tmp_path, shared_data):
    source = shared_data / "census-income"
    (tmp_path / "census-income.test.gz").write_bytes((source / "census-income.test.gz").read_bytes())
    original = gzip.decompress((source / "census-income.data.gz").read_bytes())
    (tmp_path / "census-income.data").write_bytes(original[: len(original) // 100])  # truncated, uncompressed
    with pytest.raises(CensusDataError, match=r"census-income\.data: SHA-256"):
        load_census(tmp_path, group=1)


def test_a_missing_file_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(CensusDataError, match="census-income.data.*download=True"):
        load_census(tmp_path, group=1)


def test_an_unknown_group_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="group must be 1"):
        load_census(tmp_path, group=3)


# ---------------------------------------------------------------------------------------------- the audit's data


@pytest.fixture(scope="module")
def audit1():
    import os
    from pathlib import Path

    from mtrank.experiments.census_audit import AuditData

    root = Path(os.environ.get("MTRANK_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return AuditData.load(root / "census-income", group=1)


def test_audit_splits_are_load_census_splits_of_the_whole_test_file(group1, audit1):
    valid, test = audit1.split(0)
    assert torch.equal(valid, group1.valid_rows) and torch.equal(test, group1.test_rows)
    assert torch.equal(audit1.held[valid].sparse, group1.valid.sparse)
    assert torch.equal(audit1.held[test].labels, group1.test.labels)
    other = audit1.split(1)[0]
    assert len(other) == len(valid) and not torch.equal(other, valid)


def test_audit_view_keeps_one_task_and_drops_columns(audit1):
    view = audit1.select(1, ["det_hh_fam_stat", "det_hh_summ"])
    assert [t.name for t in view.tasks] == ["marital"]
    assert view.train.labels.shape == (199_523, 1) and torch.equal(view.train.labels[:, 0], audit1.train.labels[:, 1])
    assert view.held.sparse.shape[1] == len(view.vocab_sizes) == len(view.columns) == 29
    assert "det_hh_summ" not in view.columns
    kept = [audit1.columns.index(c) for c in view.columns]
    assert torch.equal(view.held.sparse, audit1.held.sparse[:, kept])
    with pytest.raises(ValueError, match="no categorical column"):
        audit1.select(None, ["household"])


def test_the_household_columns_predict_marital_status_on_their_own(audit1):
    from mtrank.experiments.census_audit import LEAK_COLUMNS, leakage_table

    rows = {r["column"]: r for r in leakage_table(audit1)}
    assert rows["det_hh_fam_stat"]["marital"] > 0.97
    assert all(rows[c]["marital"] > 0.94 for c in LEAK_COLUMNS)
    others = [r["marital"] for c, r in rows.items() if c not in (*LEAK_COLUMNS, "age")]
    assert max(others) < 0.91  # the next: tax filer status (joint returns are married couples)


def test_stacked_auc_on_torch_equals_the_numpy_auc_with_ties_and_labels_per_row():
    from mtrank.experiments.census_audit import stacked_auc
    from mtrank.stats import auc

    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(4, 300, generator=g) < 0.3).float()
    scores = torch.randint(0, 12, (4, 300), generator=g).float()  # many ties
    got = stacked_auc(labels, scores)
    want = [auc(labels[r].numpy(), scores[r].numpy()) for r in range(4)]
    assert got.tolist() == pytest.approx(want, abs=1e-12)
