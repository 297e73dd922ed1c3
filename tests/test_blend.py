"""Blends of task scores, weight tuning against a stated objective, and the learned blend."""

import numpy as np
import pytest
import torch

from mtrank.blend.learned import LearnedBlendConfig, train_learned_blend
from mtrank.blend.rules import Blend, ranking, transform
from mtrank.blend.tuning import Objective, mean_top_k, simplex_grid, tune_blend
from mtrank.experiments.preference import make_preference_logs

TASKS = ["click", "like"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads only add overhead on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def test_weighted_sum_and_weighted_product_follow_their_formulas():
    scores = np.array([[0.2, 0.9], [0.6, 0.5], [0.9, 0.1]])
    blended_sum = Blend("weighted_sum", {"click": 2.0, "like": 1.0}).apply(scores, TASKS)
    np.testing.assert_allclose(blended_sum, 2 * scores[:, 0] + scores[:, 1])
    blended_product = Blend("weighted_product", {"click": 0.5, "like": 2.0}).apply(scores, TASKS)
    np.testing.assert_allclose(blended_product, scores[:, 0] ** 0.5 * scores[:, 1] ** 2.0)
    assert ranking(blended_sum) == [2, 1, 0]


def test_transforms_apply_per_task_before_blending():
    scores = np.array([[0.5, 4.0], [0.25, 0.0]])
    blend = Blend("weighted_sum", {"click": 1.0, "like": 1.0}, {"click": "logit", "like": "log1p"})
    np.testing.assert_allclose(blend.apply(scores, TASKS), [0.0 + np.log(5.0), np.log(1 / 3)], rtol=1e-9)


@pytest.mark.parametrize(
    ("blend", "message"),
    [
        ({"method": "max"}, "blend.method"),
        ({"weights": {"clicks": 1}}, "blend.weights.clicks: unknown task"),
        ({"weights": {"click": "a lot"}}, "blend.weights.click: expected a finite number"),
        ({"weights": {"click": 1}, "transforms": {"like": "cube"}}, "blend.transforms.like"),
        ({"weights": {"click": 0, "like": 0}}, "every weight is 0"),
        ({"weight": {}}, "blend.weight: unknown field"),
    ],
)
def test_bad_blend_configs_name_the_field(blend, message):
    with pytest.raises(ValueError, match=message):
        Blend.from_dict(blend, TASKS)


def test_mean_top_k_sums_the_best_rows_of_each_request():
    blended = np.array([0.9, 0.1, 0.5, 0.3, 0.8, 0.2])
    value = np.array([1.0, 10.0, 100.0, 1.0, 2.0, 3.0])
    requests = np.array([0, 0, 0, 1, 1, 1])
    assert mean_top_k(blended, value, requests, top_k=1) == pytest.approx((1.0 + 2.0) / 2)
    assert mean_top_k(blended, value, requests, top_k=2) == pytest.approx((101.0 + 3.0) / 2)


def test_simplex_grid_covers_weights_summing_to_one():
    grid = simplex_grid(3, 0.25)
    assert len(grid) == 15 and all(abs(w.sum() - 1) < 1e-12 for w in grid)


def _labelled(n=3000, seed=0):
    """Scores of two tasks; the 'like' label depends only on the 'like' score, 'click' labels are noise."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(size=(n, 2))
    labels = np.stack([rng.uniform(size=n) < 0.5, rng.uniform(size=n) < scores[:, 1]], 1).astype(float)
    return scores, labels, np.repeat(np.arange(n // 10), 10)


@pytest.mark.parametrize("search", ["grid", "optuna"])
def test_tuning_moves_weight_to_the_task_that_predicts_the_objective(search):
    scores, labels, _ = _labelled()
    objective = Objective("auc", weights={"click": 0.0, "like": 1.0})
    result = tune_blend(scores, labels, TASKS, objective, search=search, step=0.1, trials=30)
    assert result.value > result.default_value
    assert result.blend.weights["like"] > 0.8


def test_reward_objective_tuning_beats_equal_weights():
    scores, labels, requests = _labelled(seed=1)
    objective = Objective("reward@k", request_ids=requests, top_k=2)
    result = tune_blend(scores, labels, TASKS, objective, method="weighted_product", step=0.1)
    assert result.value > result.default_value


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        ({"name": "reward@k"}, "objective reward@k: request_ids are required"),
        ({"name": "ndcg"}, "objective: unknown 'ndcg'"),
        ({"name": "reward@k", "request_ids": np.zeros(3), "top_k": 0}, "objective top_k: must be >= 1"),
    ],
)
def test_an_objective_that_cannot_be_computed_is_refused_when_made(objective, message):
    with pytest.raises(ValueError, match=message):
        Objective(**objective)


def test_learned_blend_learns_group_weights_and_beats_the_best_global_weights():
    train = make_preference_logs(requests=1500, seed=0)
    test = make_preference_logs(requests=2000, seed=100)
    context, task_scores, engaged, reward = train.impressions()
    model, history = train_learned_blend(
        context, task_scores, engaged, reward, [0.5, 0.5], LearnedBlendConfig(epochs=10, l2_pull=2.0)
    )
    assert history[-1] < history[0]
    with torch.no_grad():
        weights = model.task_weights(test.context)  # (R, K)
    # group 0 values task 0 and group 1 task 1: the learned weights lean that way
    assert weights[test.group == 0, 0].mean() > weights[test.group == 0, 1].mean()
    assert weights[test.group == 1, 1].mean() > weights[test.group == 1, 0].mean()
    learned = test.expected_reward((test.scores * weights.unsqueeze(1)).sum(-1))
    # the strongest global baseline: the single weight vector that is best on the test requests themselves
    best_global = max(
        test.expected_reward((test.scores * torch.tensor(w, dtype=torch.float32)).sum(-1))
        for w in simplex_grid(2, 0.05)
    )
    assert learned > best_global


def test_a_stronger_l2_pull_keeps_the_weights_closer_to_the_default():
    train = make_preference_logs(requests=600, seed=3)
    context, task_scores, engaged, reward = train.impressions()
    default = torch.tensor([0.3, 0.7])
    distances = []
    for l2_pull in (0.0, 2.0):
        model, _ = train_learned_blend(
            context,
            task_scores,
            engaged,
            reward,
            default.tolist(),
            LearnedBlendConfig(epochs=5, l2_pull=l2_pull),
        )
        with torch.no_grad():
            distances.append((model.task_weights(context) - default).norm(dim=1).mean().item())
    assert distances[1] < 0.5 * distances[0]


def test_blend_tune_command_writes_a_blend_the_service_can_read(tmp_path):
    import pandas as pd

    from mtrank.cli import main

    scores, labels, requests = _labelled(n=600, seed=2)
    frame = pd.DataFrame(
        {
            "p_click": scores[:, 0],
            "p_like": scores[:, 1],
            "y_click": labels[:, 0],
            "y_like": labels[:, 1],
            "request": requests,
        }
    )
    frame.to_csv(tmp_path / "valid.csv", index=False)
    out = tmp_path / "blend.json"
    code = main(
        [
            "blend",
            "tune",
            str(tmp_path / "valid.csv"),
            "--tasks",
            "click",
            "like",
            "--scores",
            "p_click",
            "p_like",
            "--labels",
            "y_click",
            "y_like",
            "--objective",
            "reward@k",
            "--request-id",
            "request",
            "--top-k",
            "2",
            "--step",
            "0.25",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    import json

    blend = Blend.from_dict(json.loads(out.read_text()), TASKS)
    assert abs(sum(blend.weights.values()) - 1) < 1e-9
    assert (
        main(
            [
                "blend",
                "tune",
                str(tmp_path / "valid.csv"),
                "--tasks",
                "click",
                "--scores",
                "p_clik",
                "--labels",
                "y_click",
            ]
        )
        == 1
    )  # a missing column is an error that names it


def test_learned_blend_study_reports_every_method():
    from mtrank.experiments.learned_blend import run_learned_blend_demo

    report = run_learned_blend_demo(requests=300, lambdas=[2.0], epochs=2, seeds=1)
    assert set(report["rewards"]) == {
        "default weights (0.5, 0.5)",
        "best global weights (grid on validation)",
        "learned blend, lambda = 2",
        "oracle (true per-group weights)",
    }
    assert "oracle" in report["table"]


def test_fit_learned_from_a_logs_file_then_the_service_blends_per_request(tmp_path, capsys):
    from mtrank.artifacts import save_model
    from mtrank.cli import main
    from mtrank.config import ModelConfig, TaskConfig
    from mtrank.experiments.learned_blend import write_preference_logs
    from mtrank.model import MultiTaskModel
    from mtrank.serve.service import ScoringService

    logs = tmp_path / "logs.parquet"
    write_preference_logs(str(logs), requests=600, seed=0)
    model_dir = tmp_path / "model"
    config = ModelConfig(
        inputs={"num_dense": 3},
        tasks=[TaskConfig("a"), TaskConfig("b")],
        block={"num_experts": 2},
        experts={"hidden": [4]},
    )
    save_model(MultiTaskModel(config), model_dir)
    argv = ["blend", "fit-learned", str(logs), "--model-dir", str(model_dir), "--context", "x0", "x1"]
    argv += ["--tasks", "a", "b", "--scores", "score_a", "score_b", "--engaged", "engaged", "--reward", "reward"]
    argv += ["--default-weights", "0.5", "0.5", "--l2-pull", "0.1", "--epochs", "5"]
    assert main(argv) == 0
    service = ScoringService(model_dir)
    group0, group1 = service.learned.weights({"x0": 1.0, "x1": 0.0}), service.learned.weights({"x0": 0.0, "x1": 1.0})
    # the simulator: group 0 values task a, group 1 task b; the learned weights lean the same way
    assert group0["a"] - group0["b"] > group1["a"] - group1["b"]
    assert main([*argv[:6], "nope", *argv[7:]]) == 1
    assert "column 'nope' is missing" in capsys.readouterr().err


# ------------------------------------------------------------------ per-request transforms: tuning == serving


def _shifted(requests=200, candidates=10, seed=0):
    """Scores whose level shifts per request (and per task): comparable within a request, not across requests."""
    rng = np.random.default_rng(seed)
    request_ids = np.repeat(np.arange(requests), candidates)
    logits = rng.normal(size=(len(request_ids), 2)) + rng.normal(0.0, 2.0, size=(requests, 2))[request_ids]
    scores = 1 / (1 + np.exp(-logits))
    return scores, (rng.uniform(size=scores.shape) < scores).astype(float), request_ids


@pytest.mark.parametrize("kind", ["rank", "standardize"])
def test_per_request_transforms_of_a_file_equal_each_request_transformed_alone(kind):
    scores, _, request_ids = _shifted(requests=30, candidates=7)
    blend = Blend("weighted_sum", {"click": 0.7, "like": 0.3}, {"click": kind, "like": kind})
    on_file = blend.apply(scores, TASKS, request_ids)
    for request in range(30):
        rows = request_ids == request
        np.testing.assert_allclose(on_file[rows], blend.apply(scores[rows], TASKS), atol=1e-12)


def test_tied_scores_share_their_mean_rank_whatever_their_order():
    values = np.array([0.5, 0.1, 0.5, 0.9])
    np.testing.assert_allclose(transform(values, "rank"), [0.625, 0.25, 0.625, 1.0])
    np.testing.assert_allclose(transform(values[::-1], "rank"), [1.0, 0.625, 0.25, 0.625])


@pytest.mark.parametrize("kind", ["rank", "standardize"])
def test_tuning_and_serving_pick_the_same_top_candidate_under_per_request_shifts(kind):
    scores, labels, request_ids = _shifted()
    transforms = {"click": kind, "like": kind}
    objective = Objective("reward@k", request_ids=request_ids)
    blend = tune_blend(scores, labels, TASKS, objective, transforms=transforms, step=0.25).blend
    tuned = blend.apply(scores, TASKS, request_ids)  # what tuning scored
    whole_file = blend.apply(scores, TASKS)  # the transform over every row of the file: mtrank before
    same, before = 0, 0
    for request in range(200):
        rows = np.flatnonzero(request_ids == request)
        served_top = np.argmax(blend.apply(scores[rows], TASKS))  # what the service computes for the request
        same += int(np.argmax(tuned[rows]) == served_top)
        before += int(np.argmax(whole_file[rows]) == served_top)
    assert same == 200
    assert before < 180  # without grouping, many requests get another top candidate (the failure this prevents)


def test_the_service_blends_each_request_as_tuning_scores_it(tmp_path):
    from mtrank import ModelConfig, MultiTaskModel
    from mtrank.artifacts import save_model
    from mtrank.config import TaskConfig
    from mtrank.serve.schemas import ScoreRequest
    from mtrank.serve.service import ScoringService

    torch.manual_seed(0)
    config = ModelConfig(inputs={"num_dense": 3}, tasks=[TaskConfig("click"), TaskConfig("like")])
    service = ScoringService(save_model(MultiTaskModel(config, seed=0), tmp_path), "eager")
    rng = np.random.default_rng(0)
    requests = [rng.normal(size=(8, 3)) + rng.normal(0.0, 3.0, size=3) for _ in range(40)]  # per-request shifts
    blend = Blend("weighted_sum", {"click": 0.6, "like": 0.4}, {"click": "rank", "like": "standardize"})
    served, scores = [], []
    for dense in requests:
        request = ScoreRequest(candidates=[{"dense": row.tolist()} for row in dense], blend=blend.to_dict())
        response = service.score(request)
        served.append(response.blended)
        scores.append([[row["click"], row["like"]] for row in response.scores])
    request_ids = np.repeat(np.arange(40), 8)
    tuned = blend.apply(np.concatenate(scores), TASKS, request_ids)  # the tuning file of the same requests
    np.testing.assert_allclose(tuned, np.concatenate(served), atol=1e-9)


@pytest.mark.parametrize("kind", ["log", "logit", "standardize"])
def test_weighted_product_refuses_transforms_that_give_negative_factors(kind):
    with pytest.raises(ValueError, match=rf"blend.transforms.click: '{kind}' gives negative values.*weighted_sum"):
        Blend.from_dict({"method": "weighted_product", "weights": {"click": 1}, "transforms": {"click": kind}}, TASKS)


def test_weighted_product_of_a_negative_score_is_an_error_and_zero_ranks_last_by_the_other_factors():
    blend = Blend("weighted_product", {"click": 1.0, "like": 1.0})
    with pytest.raises(ValueError, match=r"task 'like' \(identity\) is -0.5 for candidate 1; use transform sigmoid"):
        blend.apply(np.array([[0.5, 0.2], [0.5, -0.5]]), TASKS)
    blended = blend.apply(np.array([[0.0, 0.9], [0.0, 0.1], [0.3, 0.2]]), TASKS)  # underflowed probabilities
    assert ranking(blended) == [2, 0, 1]


def test_tuning_a_per_request_transform_without_request_ids_is_refused(tmp_path, capsys):
    import pandas as pd

    from mtrank.cli import main

    scores, labels, _ = _shifted(requests=20)
    with pytest.raises(ValueError, match=r"transforms.click: 'rank' is computed over each request's candidates"):
        tune_blend(scores, labels, TASKS, transforms={"click": "rank"})
    path = tmp_path / "valid.csv"
    pd.DataFrame({"p": scores[:, 0], "y": labels[:, 0]}).to_csv(path, index=False)
    args = [
        "blend",
        "tune",
        str(path),
        "--tasks",
        "click",
        "--scores",
        "p",
        "--labels",
        "y",
        "--transform",
        "click=rank",
    ]
    assert main(args) == 1
    assert "give request_ids (the tuning file's request id column, --request-id)" in capsys.readouterr().err
