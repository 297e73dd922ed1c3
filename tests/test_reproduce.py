"""`mtrank reproduce ...` quick modes: each writes its tables, results.json and figures."""

import json

import pytest
import torch

from mtrank.cli import main
from mtrank.experiments.paper_synthetic import replot_correlation


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_correlation_quick_picks_a_learning_rate_per_setting_and_checks_the_claims(tmp_path):
    out = tmp_path / "corr"
    assert main(["reproduce", "correlation", "--quick", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "loss_curves.png").stat().st_size > 0
    assert "## The paper's claims" in (out / "results.md").read_text()
    assert len(results["runs"]) == 3 * 2  # models x correlations
    for entry in results["lr_search"].values():
        assert entry["lr"] == min((float(k) for k in entry["valid"]), key=lambda k: entry["valid"][f"{k:g}"])
    assert {c["claim"] for c in results["claims"]} >= {"both MoE models beat Shared-Bottom on average"}
    (out / "loss_curves.png").unlink()
    replot_correlation(out)  # the figure again, from results.json alone
    assert (out / "loss_curves.png").stat().st_size > 0

    tr = tmp_path / "trainability"
    argv = [
        "reproduce",
        "trainability",
        "--quick",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(tr),
        "--lrs-from",
        str(out / "results.json"),
        "--models",
        "mmoe",
    ]
    assert main(argv) == 0
    results = json.loads((tr / "results.json").read_text())
    assert (tr / "trainability.png").stat().st_size > 0
    run = results["runs"]["mmoe@1"]
    assert len(run["test_loss"]) == 3
    assert run["lr"] == json.loads((out / "results.json").read_text())["lr_search"]["mmoe@1"]["lr"]
    assert set(run["stats"]) >= {"mean", "std", "min", "p90"}
    assert results["equivalence"]["abs_diff"] < 1e-4


def test_census_quick_writes_a_table_beside_the_papers(tmp_path, shared_data):
    out = tmp_path / "census"
    argv = [
        "reproduce",
        "census",
        "--quick",
        "--group",
        "2",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
        "--data",
        str(shared_data / "census-income"),
        "--sizes",
        "small",
        "xlarge",
        "--tune-seeds",
        "2",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["education", "marital"]
    assert results["config"]["sizes"] == ["small", "xlarge"] and results["config"]["tune_seeds"] == 2
    assert [t["size"] for t in results["tuning"]["mmoe"]] == ["small", "xlarge"]
    xlarge = results["tuning"]["single_task"][1]["params"]
    assert xlarge > results["tuning"]["single_task"][0]["params"]
    assert set(results["table"]) == {"single_task", "shared_bottom", "omoe", "mmoe"}
    assert results["table"]["mmoe"]["paper"]["main_mean"] == 0.8826
    assert "0.8826" in (out / "results.md").read_text()
    assert (out / "census_auc.png").stat().st_size > 0


def test_census_with_a_wrong_folder_fails_with_a_message_naming_it(tmp_path, capsys):
    argv = [
        "reproduce",
        "census",
        "--quick",
        "--no-progress",
        "--out",
        str(tmp_path / "o"),
        "--data",
        str(tmp_path / "nowhere"),
    ]
    assert main(argv) == 1
    assert "nowhere/census-income.data" in capsys.readouterr().err


def test_curve_bands_are_std_or_a_confidence_interval_of_the_mean(tmp_path):
    from mtrank.evaluate.report import plot_curves

    panels = {"p": {"a": ([1, 2], [[1.0, 0.5], [3.0, 0.1]])}}
    plot_curves(tmp_path / "ci.png", panels, band="ci95")
    assert (tmp_path / "ci.png").stat().st_size > 0
    with pytest.raises(ValueError, match="band"):
        plot_curves(tmp_path / "x.png", panels, band="iqr")


def test_census_can_add_ple_beyond_the_paper_with_the_same_expert_budget(tmp_path, shared_data):
    out = tmp_path / "ple"
    argv = ["reproduce", "census", "--quick", "--methods", "mmoe", "ple", "--threads", "1", "--no-progress"]
    argv += ["--out", str(out), "--data", str(shared_data / "census-income")]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"mmoe", "ple"}
    assert results["table"]["ple"]["paper"] is None and "| PLE |" in (out / "results.md").read_text()
    assert results["finals"]["ple"]["params"] > 0
