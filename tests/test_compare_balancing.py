"""``mtrank compare balancing | mtl-help``: the quick mode end to end, the paired rows and their verdicts, the
single-task datasets and the errors."""

import json

import numpy as np
import pytest
import torch

from mtrank.cli import main
from mtrank.config import TaskConfig
from mtrank.experiments.balancing import BalancingStudy, compact_table, load_dataset, paired_rows, single_task
from tabular_helpers import one_torch_thread  # noqa: F401

TASKS = [TaskConfig("y1", "regression"), TaskConfig("y2", "binary")]


def test_quick_balancing_writes_every_method_against_fixed_and_the_conflict_table(tmp_path, capsys):
    out = tmp_path / "balancing"
    assert main(["compare", "balancing", "--quick", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    report = (out / "results.md").read_text()
    for block in ("mmoe", "shared_bottom"):
        runs = summary["results"][f"synthetic:0.5/{block}"]
        assert set(runs) == {"fixed", "uncertainty", "dwa", "famo", "gradnorm", "pcgrad", "cagrad"}
        assert all(len(seeds) == 3 for seeds in runs.values())
        cosines = [member["cosine/y1~y2_x100"] for member in runs["fixed"]]
        assert all(-1 <= c <= 1 for c in cosines)
        assert "cosine/y1~y2_x100" not in runs["pcgrad"][0]  # measured on the fixed runs only
    assert report.count("| pcgrad | r2/y2_x100 |") == 2
    assert "## Task conflict under fixed weights" in report and "| synthetic:0.5, mmoe | y1~y2_x100 |" in report
    assert "not resolvable" in report or "better" in report or "worse" in report
    table = compact_table(summary, n_boot=200).splitlines()
    assert table[0].startswith("| setting | metric | fixed: mean ± std | uncertainty |") and len(table) == 2 + 2 * 2
    assert table[2].startswith("| synthetic:0.5/mmoe | r2/y1 |") and table[2].count("[") == 6


def test_quick_mtl_help_pairs_every_multi_task_model_with_each_task_alone(tmp_path):
    out = tmp_path / "help"
    args = ["compare", "mtl-help", "--quick", "--no-progress", "--out", str(out), "--methods", "fixed", "uncertainty"]
    assert main(args) == 0
    summary = json.loads((out / "results.json").read_text())
    alone = summary["results"]["synthetic:0.5/single_task"]
    assert len(alone) == 3 and {"r2/y1", "r2/y2_x100"} <= set(alone[0])
    assert {"synthetic:0.5/mmoe/uncertainty", "synthetic:0.5/shared_bottom/fixed"} <= set(summary["results"])
    report = (out / "results.md").read_text()
    assert "| synthetic:0.5: mmoe, uncertainty | r2/y1 |" in report
    assert ("Negative transfer" in report) == bool(summary["negative_transfer"])
    table = compact_table(summary, n_boot=200).splitlines()
    assert table[0] == "| setting | metric | alone: mean ± std | fixed | uncertainty |" and len(table) == 2 + 2 * 2


def test_paired_rows_flag_a_consistent_loss_as_worse_and_a_noisy_one_as_not_resolvable():
    rng = np.random.default_rng(0)
    base = [{"r2/y1": v, "auc/y2": 0.7} for v in rng.normal(0.5, 0.1, 10)]
    worse = [{"r2/y1": b["r2/y1"] - 0.05, "auc/y2": 0.7 + rng.normal(0, 0.01)} for b in base]
    rows = paired_rows("m", worse, base, TASKS, n_boot=2000)
    assert [r[1] for r in rows] == ["r2/y1", "auc/y2"]
    assert rows[0][3] == "-0.0500" and rows[0][-1] == "worse"  # the pairing removes the seeds' spread
    assert rows[1][-1] == "not resolvable"
    assert paired_rows("base", base, base, TASKS, n_boot=10)[0][3] == "(reference)"


def test_a_single_task_dataset_keeps_only_its_label_column():
    study = BalancingStudy.quick()
    data = load_dataset("synthetic:0.5", study)
    alone = single_task(data, 1)
    assert [t.name for t in alone.tasks] == ["y2_x100"]
    assert alone.train.labels.shape == (*data.train.labels.shape[:-1], 1)
    torch.testing.assert_close(alone.test.labels[..., 0], data.test.labels[..., 1])
    assert data.train.labels[..., 1].abs().mean() > 10 * data.train.labels[..., 0].abs().mean()  # the x100 task


def test_errors_name_the_option(tmp_path, capsys):
    assert main(["compare", "balancing", "--quick", "--methods", "fixd", "--out", str(tmp_path)]) == 1
    assert "unknown --methods ['fixd']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", BalancingStudy.quick())
