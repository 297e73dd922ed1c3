"""The study runner: paired arms over seeds -> results.json, a table with intervals and verdicts, a figure."""

import json
from dataclasses import dataclass

import pytest

from mtrank.cli import main
from mtrank.experiments.studies import get_study
from mtrank.experiments.studies.runner import Metric, Study, number, paired_difference, rewrite_study, run_study


@dataclass
class ToySetting:
    gap: float = 1.0


def toy_study() -> Study:
    """Arm "b" scores ``seed``; arm "a" scores ``seed + gap``; arm "c" scores ``seed`` plus noise of either sign."""
    offsets = {"a": lambda s, seed: s.gap, "b": lambda s, seed: 0.0, "c": lambda s, seed: (-1) ** seed * 0.5}

    def run(setting, arm, seed):
        return {"metrics": {"score": seed + offsets[arm](setting, seed)}, "curve": [seed]}

    def figure(results, path):
        path.write_bytes(b"png")

    return Study(
        name="toy",
        title="Toy",
        setting=lambda quick: ToySetting(),
        arms=lambda s: ["a", "b", "c"],
        comparisons=lambda s: [("a", "b"), ("c", "b")],
        metrics=[Metric("score", "score")],
        run=run,
        figure=figure,
        notes=lambda s: "toy notes",
    )


def test_the_runner_writes_json_table_and_figure_with_paired_verdicts(tmp_path):
    results = run_study(toy_study(), tmp_path, seeds=6, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["a"]["score"]["mean"] == pytest.approx(3.5)
    assert saved["summary"]["b"]["score"]["std"] == pytest.approx(1.8708, abs=1e-4)
    verdicts = {(d["a"], d["b"]): d["verdict"] for d in saved["differences"]}
    assert verdicts == {("a", "b"): "a better", ("c", "b"): "not resolvable"}
    assert (tmp_path / "toy.png").exists()
    text = (tmp_path / "results.md").read_text()
    assert "toy notes" in text and "| a | 3.5000 ± 1.8708 |" in text and "not resolvable" in text
    assert results["runs"]["a"][0]["curve"] == [0]


def test_the_interval_is_the_wider_of_bootstrap_and_t_and_lower_is_better_flips_the_verdict():
    diff = paired_difference([1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 1.2, 2.6, 3.1, 4.4], False, ("new", "old"))
    assert diff["low"] <= min(diff["bootstrap"][0], diff["t_interval"][0])
    assert diff["high"] >= max(diff["bootstrap"][1], diff["t_interval"][1])
    assert diff["undercovered_bootstrap"] and diff["verdict"] == "old better"


def test_fewer_than_two_seeds_and_unknown_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="--seeds must be >= 2"):
        run_study(toy_study(), tmp_path, seeds=1, progress=False)
    with pytest.raises(ValueError, match="no field 'width'"):
        run_study(toy_study(), tmp_path, seeds=2, progress=False, width=3)


def test_an_unknown_study_name_is_a_one_line_error_with_a_suggestion(capsys):
    with pytest.raises(ValueError, match="did you mean 'gate-polarization'"):
        get_study("gate-polarisation")
    assert main(["study", "position-bais", "--quick"]) == 1
    assert "did you mean 'position-bias'" in capsys.readouterr().err


def test_rewrite_redraws_the_same_report_from_results_json_and_small_numbers_keep_their_digits(tmp_path):
    study = toy_study()
    run_study(study, tmp_path, seeds=3, progress=False)
    before = (tmp_path / "results.md").read_text()
    (tmp_path / "results.md").unlink()
    rewrite_study(study, tmp_path)
    assert (tmp_path / "results.md").read_text() == before
    assert number(3e-6, "+") == "+3.0e-06" and number(-29712.0, "+") == "-29,712" and number(0.0) == "0.0000"


def test_rewrite_without_results_is_a_one_line_error(tmp_path, capsys):
    assert main(["study", "infra-cost", "--rewrite", "--out", str(tmp_path)]) == 1
    assert "run the study first" in capsys.readouterr().err
