"""`mtrank run` and `mtrank reproduce ...` quick modes: each writes its tables, results.json and figures."""

import json

import numpy as np
import pytest
import torch

from mtrank.cli import main
from mtrank.experiments.correlation import CorrelationStudy, replot_correlation, train_ensemble


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _numbers(path):
    """results.json without its timings."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "seconds"}
        return [strip(v) for v in value] if isinstance(value, list) else value

    return strip(json.loads(path.read_text()))


def test_cli_run_quick_writes_results_with_a_row_per_correlation_and_model(tmp_path):
    assert main(["run", "--quick", "--out", str(tmp_path), "--no-progress", "--correlations", "1.0", "0.5"]) == 0
    for name in ("results.json", "results.md", "loss_curves.png", "gate_heatmaps.png"):
        assert (tmp_path / name).stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["lr_search"] is None  # one learning rate: no search
    assert set(results["runs"]) == {f"{b}@{p}" for b in ("shared_bottom", "omoe", "mmoe") for p in ("1", "0.5")}
    assert all(run["seeds"] == [0, 1] and len(run["test_loss"]) == 2 for run in results["runs"].values())
    assert [e["block"] for e in results["ensembles"]] == ["shared_bottom", "omoe", "mmoe"]  # one ensemble per model
    assert results["ensembles"][0]["members"] == [[1.0, 0], [1.0, 1], [0.5, 0], [0.5, 1]]
    rows = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| 1 |")]
    assert [row.split(" | ")[1] for row in rows] == ["Shared-Bottom", "OMoE", "MMoE"]
    assert set(results["gate_reports"]) == {"OMoE p=1", "MMoE p=1", "OMoE p=0.5", "MMoE p=0.5"}


def test_two_quick_main_jobs_write_the_same_numbers_and_report_in_worker_processes_or_not(tmp_path):
    argv = ["run", "--quick", "--no-progress", "--correlations", "0.5", "--models", "omoe", "mmoe", "--out"]
    assert main([*argv, str(tmp_path / "a")]) == 0  # default: one worker process per ensemble
    assert main([*argv, str(tmp_path / "b"), "--workers", "1"]) == 0  # all in this process
    a, b = _numbers(tmp_path / "a" / "results.json"), _numbers(tmp_path / "b" / "results.json")
    assert (a["study"].pop("workers"), b["study"].pop("workers")) == (0, 1)
    assert a == b
    assert (tmp_path / "a" / "results.md").read_bytes() == (tmp_path / "b" / "results.md").read_bytes()


def test_a_runs_numbers_do_not_change_when_another_run_joins_its_ensemble():
    """A run's data, initialisation and batch order come from its own seed; the ensemble around it only changes
    float rounding (batched matmuls of another batch count)."""
    study = CorrelationStudy.quick()
    alone = train_ensemble("mmoe", 1e-3, [(0.5, 1)], study)["members"][0]
    joined = train_ensemble("mmoe", 1e-3, [(1.0, 0), (0.5, 1), (0.9, 7)], study)["members"][1]
    assert joined["seeds"] == alone["seeds"] == 1
    assert joined["best_step"] == alone["best_step"]
    assert joined["curves"] == pytest.approx(alone["curves"], rel=1e-5)
    assert joined["test"] == pytest.approx(alone["test"], rel=1e-5)


def test_presets_main_job_and_paper():
    main_job, paper = CorrelationStudy.main_job(), CorrelationStudy.paper()
    assert (main_job.correlations, main_job.seeds, main_job.steps, main_job.learning_rates) == (
        [1, 0.9, 0.5],
        3,
        4000,
        [1e-3],
    )
    assert (paper.correlations, paper.seeds, paper.steps) == ([1, 0.9, 0.5, 0], 20, 2000)
    assert paper.learning_rates == [1e-4, 1e-3, 1e-2]
    quick = CorrelationStudy.quick(paper)
    assert quick.learning_rates == paper.learning_rates and quick.steps < 100


def test_correlation_quick_picks_a_learning_rate_per_setting_and_checks_the_claims(tmp_path):
    out = tmp_path / "corr"
    argv = ["reproduce", "correlation", "--quick", "--no-progress", "--correlations", "1.0", "0.5", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "loss_curves.png").stat().st_size > 0
    assert "## The paper's claims" in (out / "results.md").read_text()
    assert len(results["runs"]) == 3 * 2  # models x correlations
    for key, entry in results["lr_search"].items():
        assert entry["lr"] == min((float(k) for k in entry["valid"]), key=lambda k: entry["valid"][f"{k:g}"])
        assert results["runs"][key]["lr"] == entry["lr"]
    assert {c["claim"] for c in results["claims"]} >= {"both MoE models beat Shared-Bottom on average"}
    (out / "loss_curves.png").unlink()
    replot_correlation(out)  # the figure again, from results.json alone
    assert (out / "loss_curves.png").stat().st_size > 0

    tr = tmp_path / "trainability"
    argv = ["reproduce", "trainability", "--quick", "--no-progress", "--out", str(tr), "--seeds", "3"]
    assert main([*argv, "--lrs-from", str(out / "results.json"), "--models", "mmoe", "--correlations", "1.0"]) == 0
    results = json.loads((tr / "results.json").read_text())
    assert (tr / "trainability.png").stat().st_size > 0
    run = results["runs"]["mmoe@1"]
    assert len(run["test_loss"]) == 3 and run["seeds"] == [200_000, 200_001, 200_002]
    assert run["lr"] == json.loads((out / "results.json").read_text())["lr_search"]["mmoe@1"]["lr"]
    assert set(run["stats"]) >= {"mean", "std", "min", "p90"}
    assert results["equivalence"]["abs_diff"] < 1e-4
    # the final loss (weights after the last step) beside the best step's; equal where the best step is the last
    assert len(run["final_test_loss"]) == len(run["label_var"]) == 3 and set(run["final_stats"]) >= {"median"}
    last = [(f, b) for f, b, step in zip(run["final_test_loss"], run["test_loss"], run["best_step"]) if step == 60]
    assert last and all(f == pytest.approx(b, rel=1e-6) for f, b in last)
    assert set(run["tail"]) == {"final", "best", "label_var_rank_correlation"}
    assert "**final**: the weights after the last step" in (tr / "results.md").read_text()


def test_census_quick_writes_a_table_beside_the_papers(tmp_path, shared_data):
    out = tmp_path / "census"
    argv = [
        "reproduce",
        "census",
        "--quick",
        "--group",
        "2",
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


def test_census_without_data_or_shared_folder_says_what_to_pass(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MTRANK_SHARED_DATA", raising=False)
    assert main(["reproduce", "census", "--quick", "--no-progress", "--out", str(tmp_path / "o")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--data DIR" in error and "MTRANK_SHARED_DATA" in error


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
    argv = ["reproduce", "census", "--quick", "--methods", "mmoe", "ple", "--no-progress"]
    argv += ["--out", str(out), "--data", str(shared_data / "census-income")]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"mmoe", "ple"}
    assert results["table"]["ple"]["paper"] is None and "| PLE |" in (out / "results.md").read_text()
    assert results["finals"]["ple"]["params"] > 0


def test_census_audit_quick_writes_verdicts_per_claim_and_resumes_from_its_parts(tmp_path, shared_data, capsys):
    out = tmp_path / "audit"
    argv = ["reproduce", "census-audit", "--quick", "--no-progress", "--out", str(out)]
    argv += ["--data", str(shared_data / "census-income")]
    assert main([*argv, "--stop-after", "0"]) == 0  # a call whose time is up starts nothing and writes no report
    assert "0 of 27 jobs finished" in capsys.readouterr().out and not (out / "results.json").exists()
    assert main(argv) == 0
    for name in ("results.json", "results.md", "census_auc.png", "intervals.png", "searches.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert {c["status"] for c in results["claims"]} <= {"reproduced", "not reproduced", "not resolvable"}
    assert [c["claim"][:8] for c in results["claims"]] == ["Table 1:", "MMoE bea", "MMoE's m"]
    primary = results["comparisons"]["primary"]
    assert {(c["baseline"], c["variant"]) for c in primary} == {
        ("single_task", "full"),
        ("shared_bottom", "full"),
        ("omoe", "full"),
        ("shared_bottom", "matched"),
        ("", "paper"),
    }
    for c in primary:
        assert c["p_holm"] >= c["p"] and c["se"] >= max(c["se_runs"], c["se_rows"])
        assert (c["low"] > 0 or c["high"] < 0) == (c["p_holm"] < 0.05)
    # Single-task: one model per task, each searched on its own task; the other methods once, on income
    searches = results["searches"]
    assert {s["task"] for n, s in searches.items() if "single_task" in n} == {"income", "marital"}
    for s in searches.values():
        assert set(s["checks"]) == set(s["space"]) and s["trials"] >= 3
        assert all(low <= s["best"]["params"][p] <= high for p, (low, high, _) in s["space"].items())
    table = results["tables"]["1/full"]["income"]
    assert set(table) == {"single_task", "shared_bottom", "omoe", "mmoe"} and table["mmoe"]["n"] == 2 * 2
    assert results["tables"]["1/noleak"]["marital"]["mmoe"]["n"] == 2 * 1
    assert "## The paper's claims" in (out / "results.md").read_text()

    parts = sorted((out / "parts").iterdir())
    stamps = [p.stat().st_mtime_ns for p in parts]
    assert main(argv) == 0  # every part is there: nothing trains again, the same numbers
    assert [p.stat().st_mtime_ns for p in sorted((out / "parts").iterdir())] == stamps
    again = json.loads((out / "results.json").read_text())
    assert again["comparisons"] == results["comparisons"] and again["claims"] == results["claims"]

    assert main([*argv, "--runs", "3"]) == 1  # parts of another config: refused, not mixed


def test_census_audit_range_checks_and_widening():
    from mtrank.experiments.census_audit import edge_check, widen

    assert edge_check(0.029, 3e-4, 3e-2, True) == "upper edge"
    assert edge_check(3.2e-4, 3e-4, 3e-2, True) == "lower edge"
    assert edge_check(300, 32, 2048, True) == "inside"
    assert widen("lr", "upper edge", 3e-4, 3e-2) == pytest.approx((3e-4, 0.12))
    assert widen("lr", "lower edge", 3e-4, 3e-2) == pytest.approx((7.5e-5, 3e-2))
    assert widen("width", "upper edge", 32, 2048) is None  # the paper's cap
    assert widen("width", "upper edge", 32, 512) == (32, 2048)
    assert widen("experts", "lower edge", 2, 16) is None and widen("experts", "upper edge", 2, 16) == (2, 32)


def test_census_audit_single_task_is_one_model_per_task_with_its_own_embeddings(tmp_path, shared_data):
    from mtrank.experiments.census_audit import AuditConfig, AuditData, audit_model
    from mtrank.model import MultiTaskModel

    cfg = AuditConfig.quick()
    data = AuditData.load(shared_data / "census-income", 1, cfg.train_rows, cfg.held_rows)
    models = [MultiTaskModel(audit_model("single_task", {"width": 16}, data.select(k), cfg)) for k in (0, 1)]
    assert [m.tasks[0].name for m in models] == ["income", "marital"]
    table = sum(data.vocab_sizes) * cfg.embedding_dim
    assert [m.embedding.table.weight.numel() for m in models] == [table, table]  # each its own, of every column
    shared = MultiTaskModel(audit_model("shared_bottom", {"width": 16}, data, cfg))
    assert [t.name for t in shared.tasks] == ["income", "marital"]


def test_claims_are_resolved_only_by_intervals_over_enough_seeds():
    from mtrank.experiments.correlation import check_claims

    rng = np.random.default_rng(0)
    ps = [1.0, 0.5]

    def runs(seeds, gap):
        base = {p: rng.gamma(2.0, 0.04, seeds) for p in ps}  # a shared draw per (p, seed): runs pair up
        out = {}
        for b, extra in (("shared_bottom", 0.08), ("omoe", gap), ("mmoe", 0.0)):
            for p in ps:
                noise = rng.normal(0, 0.002, seeds)
                out[f"{b}@{p:g}"] = {
                    "test_loss": (base[p] + (extra if b != "omoe" or p == 0.5 else 0) + noise).tolist()
                }
        return out

    big = {c["claim"]: c for c in check_claims(runs(40, 0.02), ["shared_bottom", "omoe", "mmoe"], ps)}
    assert big["both MoE models beat Shared-Bottom on average"]["status"] == "holds"
    assert big["OMoE worse than MMoE at correlation 0.5"]["status"] == "holds"
    assert big["MMoE ~ OMoE at correlation 1 (within 10%)"]["status"] == "holds"
    assert big["OMoE worse than MMoE at correlation 0.5"]["interval"][0] > 0
    small = check_claims(runs(3, 0.02), ["shared_bottom", "omoe", "mmoe"], ps)
    assert all(not c["resolved"] and c["status"].endswith("within noise") for c in small)
    none = {c["claim"]: c for c in check_claims(runs(40, 0.0), ["shared_bottom", "omoe", "mmoe"], ps)}
    assert not none["OMoE worse than MMoE at correlation 0.5"]["resolved"]


def test_census_audit_estimate_times_a_few_steps_and_trains_nothing_else(tmp_path, shared_data, capsys):
    out = tmp_path / "audit"
    argv = ["reproduce", "census-audit", "--quick", "--estimate", "--no-progress", "--out", str(out)]
    assert main([*argv, "--data", str(shared_data / "census-income")]) == 0
    printed = capsys.readouterr().out
    assert "census audit (quick) on cpu: at most" in printed and "trials of" in printed
    assert not (out / "parts").exists() or not any((out / "parts").iterdir())
