"""docs/model-zoo.md: every config snippet loads into the census experiment and trains a few steps on census
rows; the zoo's benchmark scripts run in their quick modes."""

import gzip
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mtrank.pipeline import fit
from tabular_helpers import one_torch_thread  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from zoo_snippets import zoo_snippets  # noqa: E402

SNIPPETS = zoo_snippets()


def test_the_doc_has_a_snippet_for_every_architecture():
    assert set(SNIPPETS) == {"mmoe", "ple", "dselect_k", "topk", "adatt", "home", "stem", "pepnet"}


@pytest.fixture
def census_rows(shared_data) -> pd.DataFrame:
    """The first 1,500 rows of the census training file, in configs/census_income.yaml's columns."""
    raw = yaml.safe_load((REPO / "configs" / "census_income.yaml").read_text())
    with gzip.open(shared_data / "census-income" / "census-income.data.gz", "rt") as handle:
        return pd.read_csv(handle, header=None, names=raw["data"]["csv_columns"], nrows=1500)


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_every_doc_snippet_trains_on_census_rows(name, census_rows):
    raw = yaml.safe_load((REPO / "configs" / "census_income.yaml").read_text())
    raw["data"] = {"split": {"method": "random", "fractions": [0.8, 0.1, 0.1], "seed": 0}}
    raw["model"] = SNIPPETS[name]
    raw["train"].update(epochs=1, batch_size=256, progress=False)
    result = fit(raw, census_rows, output=None)
    assert result.metrics["test"]["loss"] < 1.0, result.metrics["test"]


def test_zoo_smoke_quick_mode_writes_its_table(tmp_path, shared_data):
    import zoo_smoke

    args = ["--quick", "--models", "mmoe", "home", "--shared-data", str(shared_data), "--out", str(tmp_path / "smoke")]
    assert zoo_smoke.main(args) == 0
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert list(results["runs"]) == ["mmoe", "home"] and results["rows"]["train"] == 3000
    run = results["runs"]["home"][0]
    assert run["health"]["max_zero_activation"] == 0 and run["samples_per_second"] > 0
    assert "| home |" in (tmp_path / "smoke.md").read_text()


def test_zoo_memory_quick_mode_puts_stem_above_ple(tmp_path):
    import zoo_memory

    assert zoo_memory.main(["--quick", "--models", "ple", "stem", "--out", str(tmp_path / "memory")]) == 0
    models = json.loads((tmp_path / "memory.json").read_text())["results"]["large-vocab"]
    # STEM: 3 embedding tables (2 tasks + shared) of 26 x 1,000 ids x 8
    assert models["stem"]["params"] - models["ple"]["params"] > 2 * 26 * 1000 * 8 - 5000
    assert models["stem"]["saved_activation_bytes"] > models["ple"]["saved_activation_bytes"]


def test_zoo_study_quick_mode_matches_the_parameter_budget_and_pairs_with_mmoe(tmp_path, shared_data):
    import zoo_study

    out = tmp_path / "study"
    args = ["--quick", "--datasets", "census2", "--models", "mmoe", "adatt", "pepnet"]
    assert zoo_study.main([*args, "--shared-data", str(shared_data), "--out", str(out)]) == 0
    census = json.loads(out.with_suffix(".json").read_text())["datasets"]["census2"]
    assert census["tasks"] == ["education", "never_married"] and census["rows"]["train"] == 3000
    models = census["models"]
    for name in ("adatt", "pepnet"):  # within 10% of MMoE's count, by the knob that was sized
        assert abs(models[name]["params"] - census["target_params"]) < 0.1 * census["target_params"]
    assert models["pepnet"]["sized"].startswith("pepnet.hidden")
    assert len(models["adatt"]["runs"]) == 2 and set(census["paired_vs_mmoe"]) == {"adatt", "pepnet"}
    interval = census["paired_vs_mmoe"]["adatt"]["education"]
    assert interval["low"] <= interval["estimate"] <= interval["high"]
    assert "| adatt |" in out.with_suffix(".md").read_text()
