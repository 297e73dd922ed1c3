"""Study 7 (blending): requests split by request, the study ranks as the service ranks, the --quick run."""

import json

import numpy as np
import pytest
import torch

from mtrank.blend.learned import LearnedBlend, ServedLearnedBlend
from mtrank.blend.rules import Blend, ranking
from mtrank.cli import main
from mtrank.config import ModelConfig, TaskConfig
from mtrank.experiments.studies.blending import TASKS, BlendingSetting, served_scores, simulate


def test_tuning_and_held_out_requests_are_disjoint_and_cover_every_request():
    setting = BlendingSetting.quick()
    splits = simulate(setting, 0)
    tuning, held_out = set(splits["tuning"].request_index), set(splits["held_out"].request_index)
    assert not tuning & held_out
    assert len(tuning | held_out) == setting.requests
    assert set(splits["train"].request_index) | set(splits["valid"].request_index) == tuning
    # the logs of a split are its own requests' impressions, every row of a request together
    *_, request = splits["held_out"].logs()
    assert np.array_equal(request, np.repeat(np.arange(len(held_out)), setting.shown))


def _service(tmp_path, blend: Blend | None = None, learned: ServedLearnedBlend | None = None):
    from mtrank.artifacts import save_model, seal_model_dir
    from mtrank.model import MultiTaskModel
    from mtrank.serve.service import ScoringService

    config = ModelConfig(
        inputs={"num_dense": 3, "vocab_sizes": [5], "embedding_dim": 2},
        tasks=[TaskConfig(name) for name in TASKS],
        block={"num_experts": 2},
        experts={"hidden": [4]},
        towers={"hidden": [2]},
    )
    save_model(MultiTaskModel(config, seed=0), tmp_path, seal=False)
    if blend is not None:
        blend.save(tmp_path)
    if learned is not None:
        learned.save(tmp_path)
    seal_model_dir(tmp_path)
    return ScoringService(tmp_path)


def _requests(count: int, size: int) -> list[list[dict]]:
    rng = np.random.default_rng(0)
    return [
        [{"dense": rng.normal(size=3).tolist(), "sparse": [int(rng.integers(5))]} for _ in range(size)]
        for _ in range(count)
    ]


@pytest.mark.parametrize("transform", ["identity", "rank", "standardize"])
def test_the_studys_blend_of_many_requests_ranks_each_request_as_the_service_does(tmp_path, transform):
    from mtrank.serve.schemas import ScoreRequest

    method = "weighted_product" if transform == "identity" else "weighted_sum"
    blend = Blend(method, {"click": 0.6, "save": 0.3, "share": 0.1}, dict.fromkeys(TASKS, transform))
    service = _service(tmp_path, blend)
    answers = [service.score(ScoreRequest(candidates=c)) for c in _requests(4, 7)]
    scores = np.array([[row[t] for t in TASKS] for answer in answers for row in answer.scores])
    request_ids = np.repeat(np.arange(4), 7)
    blended = blend.apply(scores, list(TASKS), request_ids)  # the study's path: every request at once
    for r, answer in enumerate(answers):
        assert ranking(blended[request_ids == r]) == answer.ranking
        np.testing.assert_allclose(blended[request_ids == r], answer.blended, rtol=1e-6, atol=1e-9)


def test_the_studys_learned_blend_scores_as_the_service_does(tmp_path):
    from mtrank.serve.schemas import ScoreRequest

    torch.manual_seed(0)
    net = LearnedBlend(context_dim=2, default_weights=[1 / 3] * 3, hidden=[4])
    torch.nn.init.normal_(net.head.weight)  # weights that depend on the context
    learned = ServedLearnedBlend(net, ["x0", "x1"], list(TASKS))
    service = _service(tmp_path, learned=learned)
    contexts = [{"x0": 1.0, "x1": -0.5}, {"x0": -2.0, "x1": 0.3}]
    answers = [service.score(ScoreRequest(context=x, candidates=c)) for x, c in zip(contexts, _requests(2, 6))]
    scores = np.array([[row[t] for t in TASKS] for answer in answers for row in answer.scores])
    context = np.repeat([[x["x0"], x["x1"]] for x in contexts], 6, axis=0)
    blended = served_scores(learned, context, scores, np.repeat(np.arange(2), 6))
    for r, answer in enumerate(answers):
        np.testing.assert_allclose(blended[6 * r : 6 * r + 6], answer.blended, rtol=1e-6, atol=1e-9)
        assert answer.blend["source"] == "learned"


def test_quick_study_reports_every_blend_held_out_and_in_sample(tmp_path):
    out = tmp_path / "blending"
    assert main(["study", "blending", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "tuned product (YouTube)" in results["arms"] and "learned blend (pull 2, Closeup's)" in results["arms"]
    for runs in results["runs"].values():
        for run in runs:
            assert 0 < run["metrics"]["ndcg"] <= 1 and 0 < run["metrics"]["ndcg_in_sample"] <= 1
            assert all(0 <= run["metrics"][f"auc_{t}"] <= 1 for t in TASKS)
    tuned = results["runs"]["tuned product (YouTube)"][0]["weights"]
    assert sorted(tuned) == sorted(TASKS) and sum(tuned.values()) == pytest.approx(1.0)
    assert results["runs"]["learned blend (pull chosen)"][0]["l2_pull"] in (0.0, 2.0)
    assert results["runs"]["learned blend (pull 2, Closeup's)"][0]["l2_pull"] == 2.0
    # the oracle knows each request's true weights: it beats every blend that does not
    oracle = results["summary"]["oracle: true group weights"]["ndcg"]["mean"]
    assert all(oracle > results["summary"][a]["ndcg"]["mean"] for a in results["arms"] if a.startswith("equal"))
    assert (out / "blending.png").exists() and "held-out" in (out / "results.md").read_text()


def test_reward_at_k_on_a_logged_row_value_scores_the_top_row_of_each_request():
    from mtrank.blend.tuning import Objective

    blended, request = np.array([0.9, 0.1, 0.2, 0.8]), np.array([0, 0, 1, 1])
    labels = np.zeros((4, 3))  # the task labels are not what this objective values
    objective = Objective("reward@k", request_ids=request, row_value=np.array([2.0, 5.0, 1.0, 3.0]))
    assert objective(blended, labels, list(TASKS)) == pytest.approx((2.0 + 3.0) / 2)
    with pytest.raises(ValueError, match=r"row_value has shape \(3,\), expected \(4,\)"):
        Objective("reward@k", request_ids=request, row_value=np.ones(3))(blended, labels, list(TASKS))
    with pytest.raises(ValueError, match="row_value is only for reward@k"):
        Objective("auc", row_value=np.ones(4))
