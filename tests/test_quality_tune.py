"""`mtrank tune`: the search finds a known optimum, resumes from its SQLite study, prunes, counts failed
settings; the network's trials see validation rows only and the test split is scored once per chosen setting;
the baseline's search; objectives and parameter paths fail naming what to fix."""

import json
import math

import pytest
import yaml

import mtrank.tune as tune
from mtrank.artifacts import open_model_dir
from mtrank.cli import main
from mtrank.config import ConfigError
from mtrank.config.experiment import SearchParam, experiment_from_dict, load_experiment
from mtrank.tune import TuneError, make_objective, search, set_path, with_params
from tabular_helpers import config, make_frame, one_torch_thread  # noqa: F401


def space(**params) -> dict[str, SearchParam]:
    return {name: SearchParam.from_dict(p, f"tune.space.{name}") for name, p in params.items()}


def toy(params, report):
    """A known optimum: x = 2, n = 3, kind = 'b' (value 0)."""
    value = -((params["x"] - 2.0) ** 2) - 0.1 * (params["n"] - 3) ** 2 - (params["kind"] != "b")
    return value, {"x": params["x"]}


TOY = {"x": {"low": -5.0, "high": 5.0}, "n": {"low": 1, "high": 8}, "kind": {"choices": ["a", "b", "c"]}}


def test_the_search_finds_a_known_optimum_and_a_rerun_resumes_the_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = [t.params for t in search(space(**TOY), toy, 15, storage, "toy", "maximize", seed=0).trials]
    assert len(first) == 15
    study = search(space(**TOY), toy, 40, storage, "toy", "maximize", seed=0)
    assert len(study.trials) == 40  # 25 more, the first 15 kept
    assert [t.params for t in study.trials[:15]] == first
    best = study.best_trial.params
    assert abs(best["x"] - 2.0) < 0.3 and best["kind"] == "b" and abs(best["n"] - 3) <= 1
    assert study.best_value > -0.15
    again = search(space(**TOY), toy, 40, storage, "toy", "maximize")
    assert len(again.trials) == 40  # the budget is met: nothing runs


def test_a_trial_below_the_median_is_pruned_and_a_setting_that_cannot_build_fails_and_counts(tmp_path):
    def curve(params, report):
        if params["lr"] > 0.9:
            raise ConfigError("train.lr: too large")
        for step in range(1, 6):
            report(params["lr"] * step, step)  # a higher lr is better at every step
        return params["lr"] * 5, {}

    study = search(
        space(lr={"low": 0.0, "high": 1.0}), curve, 20, f"sqlite:///{tmp_path / 's.db'}", "p", "maximize", 0, 3
    )
    states = [t.state.name for t in study.trials]
    assert "PRUNED" in states and "COMPLETE" in states
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert all(max(t.intermediate_values) < 5 for t in pruned)  # stopped before the last step
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert all(t.user_attrs["error"] == "train.lr: too large" for t in failed)
    assert len(tune.finished_trials(study)) == 20


def tuned_config(tmp_path) -> dict:
    frame = make_frame(600)
    frame.to_csv(tmp_path / "rows.csv", index=False)
    return config(
        name="tiny-tune",
        data={"train": "rows.csv", "split": {"method": "random", "fractions": [0.7, 0.15, 0.15]}},
        train={"epochs": 2},
        tune={
            "trials": 4,
            "startup_trials": 2,
            "space": {
                "train.lr": {"low": 1e-3, "high": 3e-2, "log": True},
                "model.block.num_experts": {"low": 1, "high": 3},
                "model.experts.hidden": {"choices": [[4], [8, 4]]},
                "tasks.buy.weight": {"low": 0.2, "high": 2.0},
            },
        },
        output=str(tmp_path / "model"),
    )


def test_mtrank_tune_scores_trials_on_validation_only_and_the_chosen_setting_on_test_once(tmp_path, monkeypatch):
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(tuned_config(tmp_path)))
    calls = []
    fit_splits = tune.fit_splits

    def recording(config, splits, output="", progress=None, baseline=None, roles=("valid", "test"), callbacks=None):
        calls.append(roles)
        return fit_splits(config, splits, output, progress, baseline, roles, callbacks)

    monkeypatch.setattr(tune, "fit_splits", recording)
    argv = ["tune", str(tmp_path / "exp.yaml"), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    assert calls == [("valid",)] * 4 + [("valid", "test")]  # four trials, then the chosen setting once
    out = tmp_path / "model.tune"
    result = json.loads((out / "result.json").read_text())
    assert len(result["test_evaluations"]) == 1 and "auc/click" in result["test"]
    assert result["objective"] == "maximize 0.5 * auc/click + 0.5 * auc/buy (validation)"
    best = load_experiment(out / "best.yaml")
    assert best.train.lr == pytest.approx(result["best_params"]["train.lr"])
    assert [t.weight for t in best.tasks if t.name == "buy"] == [
        pytest.approx(result["best_params"]["tasks.buy.weight"])
    ]
    assert best.model.experts.hidden == result["best_params"]["model.experts.hidden"]
    lines = (out / "trials.md").read_text().splitlines()
    assert lines[2].startswith("| trial | state | value |") and "| train.lr |" in lines[2] and len(lines) == 4 + 4
    assert open_model_dir(tmp_path / "model").experiment.train.lr == pytest.approx(best.train.lr)  # sealed, whole
    calls.clear()
    assert main(argv) == 0  # the same command: the study is complete, the chosen setting already scored
    assert calls == [] and len(json.loads((out / "result.json").read_text())["test_evaluations"]) == 1


def test_mtrank_tune_baseline_searches_each_task_and_writes_its_best_arguments(tmp_path):
    cfg = tuned_config(tmp_path)
    cfg["tune"]["baseline_space"] = {"learning_rate": {"low": 0.02, "high": 0.3, "log": True}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["tune", str(tmp_path / "exp.yaml"), "--baseline", "--trials", "3", "--no-progress"]) == 0
    out = tmp_path / "model.tune"
    result = json.loads((out / "result-baseline.json").read_text())
    assert set(result["tasks"]) == {"click", "buy"} and "auc/buy" in result["test"]
    tuned = load_experiment(out / "best-baseline.yaml").baseline.task_params
    assert tuned["click"]["learning_rate"] == pytest.approx(result["tasks"]["click"]["best_params"]["learning_rate"])
    assert (out / "gbdt-click-trials.csv").read_text().count("\n") == 1 + 3


def test_objectives_are_one_metric_a_weighted_sum_or_the_mean_of_the_tasks_and_mixtures_fail():
    cfg = experiment_from_dict(config(tasks=[{"name": "click"}, {"name": "spend", "type": "regression"}]))
    assert make_objective("", cfg).weights == {"auc/click": 0.5, "r2/spend": 0.5}
    assert make_objective("mse/spend", cfg).direction == "minimize"
    assert make_objective({"auc/click": 2, "r2/spend": 1}, cfg).value({"auc/click": 0.7, "r2/spend": 0.1}) == 1.5
    with pytest.raises(TuneError, match="mixes metrics to maximise .* and to minimise"):
        make_objective({"auc/click": 1, "mse/spend": 1}, cfg)
    with pytest.raises(TuneError, match="'auc/spend' is not a validation metric of the tasks; choose from"):
        make_objective("auc/spend", cfg)
    assert math.isnan(make_objective("auc/click", cfg).value({}))


def test_parameter_paths_reach_tasks_and_features_by_name_and_bad_ones_fail_naming_the_key():
    cfg = experiment_from_dict(config())
    changed = with_params(cfg, {"tasks.buy.weight": 0.25, "features.numeric.price.embedding.type": "ple"})
    assert changed.tasks[1].weight == 0.25 and changed.features.numeric[1].embedding.type == "ple"
    with pytest.raises(TuneError, match="tune.space.tasks.sell.weight: tasks has no item 'sell'"):
        set_path(cfg.to_dict(), "tasks.sell.weight", 1.0)
    with pytest.raises(ConfigError, match="tune.space.data.train: every trial reads the same data"):
        experiment_from_dict(config(tune={"space": {"data.train": {"choices": ["x.csv"]}}}))
    with pytest.raises(ConfigError, match="tune.space.train.lr.low: must be > 0 on a log scale"):
        experiment_from_dict(config(tune={"space": {"train.lr": {"low": 0, "high": 1, "log": True}}}))
    bad = experiment_from_dict(config(tune={"space": {"train.lrate": {"low": 0.1, "high": 1.0}}}))
    with pytest.raises(
        TuneError, match="tune.space.train.lrate: 0.1 does not build a config: train.lrate: unknown field"
    ):
        tune.check_space(bad)


def test_search_params_infer_int_float_and_categorical_from_how_they_are_written():
    params = space(a={"low": 2, "high": 8}, b={"low": 0.0, "high": 1}, c={"low": "1e-4", "high": "1e-2", "log": True})
    assert (params["a"].type, params["b"].type, params["c"].type) == ("int", "float", "float")
    assert params["c"].low == pytest.approx(1e-4)
    assert space(d={"choices": [[32], [64, 32]]})["d"].type == "categorical"
