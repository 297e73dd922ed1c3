"""The scoring service over HTTP: scores match the model, blends and rankings, every bad request is a 4xx naming
the problem, health / readiness / metrics, the real `mtrank serve` command, request coalescing."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from mtrank.artifacts import load_model, save_model, seal_model_dir
from mtrank.config import ModelConfig, TaskConfig
from mtrank.config.experiment import CategoricalFeature, FeaturesSpec, NumericFeature
from mtrank.data.encoders import FeatureEncoder
from mtrank.model import MultiTaskModel
from mtrank.serve.app import create_app
from mtrank.serve.service import ScoringService

TASKS = [TaskConfig("click"), TaskConfig("like")]


def _encoder() -> FeatureEncoder:
    spec = FeaturesSpec(
        categorical=[CategoricalFeature("country"), CategoricalFeature("category")],
        numeric=[NumericFeature("hour"), NumericFeature("price", log1p=True)],
    )
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "country": rng.choice(["fr", "de", "us"], 200),
            "category": rng.choice(["shoes", "hats", "bags"], 200),
            "hour": rng.integers(0, 24, 200).astype(float),
            "price": rng.uniform(1, 100, 200),
        }
    )
    return FeatureEncoder(spec).fit(frame)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("served")
    encoder = _encoder()
    torch.manual_seed(0)
    config = ModelConfig(
        inputs={"num_dense": encoder.num_dense, "vocab_sizes": encoder.vocab_sizes, "embedding_dim": 4},
        tasks=TASKS,
        block={"num_experts": 3},
        experts={"hidden": [8]},
        towers={"hidden": [4]},
    )
    save_model(MultiTaskModel(config), directory, seal=False)
    encoder.save(directory)
    seal_model_dir(directory)  # last: every file of the directory in its manifest
    return directory


@pytest.fixture(scope="module")
def client(model_dir):
    app = create_app(ScoringService(model_dir, max_candidates=50), max_body_bytes=20_000)
    with TestClient(app) as test_client:
        yield test_client


CONTEXT = {"country": "fr", "hour": 21}
CANDIDATES = [
    {"category": "shoes", "price": 35.0},
    {"category": "hats", "price": 12.5},
    {"category": "never-seen", "price": None},
]


def test_score_returns_model_scores_blend_and_ranking(client, model_dir):
    response = client.post("/v1/score", json={"context": CONTEXT, "candidates": CANDIDATES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tasks"] == ["click", "like"]
    scores = np.array([[row["click"], row["like"]] for row in body["scores"]])
    rows = pd.DataFrame([{**CONTEXT, **c} for c in CANDIDATES])  # the same rows as a file would hold them
    dense, sparse = FeatureEncoder.load(model_dir).transform(rows)
    expected = load_model(model_dir).predict(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    np.testing.assert_allclose(body["blended"], scores.sum(1), atol=1e-6)  # default: equal-weight sum
    assert body["ranking"] == np.argsort(-scores.sum(1), kind="stable").tolist()


def test_a_request_blend_overrides_the_default(client):
    blend = {"method": "weighted_product", "weights": {"click": 1.0, "like": 0.0}}
    body = client.post(
        "/v1/score", json={"context": CONTEXT, "candidates": CANDIDATES, "blend": blend, "top_k": 2}
    ).json()
    clicks = [row["click"] for row in body["scores"]]
    np.testing.assert_allclose(body["blended"], clicks, rtol=1e-6)
    assert body["ranking"] == np.argsort(clicks)[::-1][:2].tolist()


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        (
            {"context": CONTEXT, "candidates": [{"category": "shoes"}]},
            422,
            "candidates[0]: missing feature 'price'",
        ),
        (
            {"context": CONTEXT, "candidates": [{"category": "shoes", "price": 3, "colour": "red"}]},
            422,
            "unknown feature 'colour'",
        ),
        (
            {"context": CONTEXT, "candidates": [{"category": "shoes", "price": "cheap"}]},
            422,
            "feature 'price' has str 'cheap'",
        ),
        ({"context": {"country": ["fr"], "hour": 1}, "candidates": CANDIDATES[:1]}, 422, "feature 'country'"),
        (
            {"context": CONTEXT, "candidates": [{"category": "shoes", "price": 3, "hour": 2}]},
            422,
            "'hour' is also in the context",
        ),
        ({"context": CONTEXT, "candidates": [CANDIDATES[0]] * 51}, 422, "at most 50 per request"),
        ({"context": CONTEXT, "candidates": []}, 422, "candidates"),
        ({"context": CONTEXT}, 422, "candidates: Field required"),
        ({"context": CONTEXT, "candidates": "all of them"}, 422, "candidates"),
        ({"context": CONTEXT, "candidates": [5]}, 422, "candidates[0]"),
        (
            {"context": CONTEXT, "candidates": CANDIDATES, "blend": {"weights": {"clicks": 1}}},
            422,
            "blend.weights.clicks: unknown task",
        ),
        ({"context": CONTEXT, "candidates": CANDIDATES, "top_k": 0}, 422, "top_k"),
        ({"context": CONTEXT, "candidates": CANDIDATES, "extra": 1}, 422, "extra"),
        (
            {"context": {"country": 10**30, "hour": 1}, "candidates": CANDIDATES},
            422,
            "context: feature 'country' is an integer outside the 64-bit range",
        ),
        ({"context": {**CONTEXT, "colour": "red"}, "candidates": CANDIDATES}, 422, "context: unknown feature 'colour'"),
        ({"context": {"country": "fr", "hour": 10**400}, "candidates": CANDIDATES}, 422, "feature 'hour'"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(client, payload, status, message):
    response = client.post("/v1/score", json=payload)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_malformed_json_is_a_422(client):
    response = client.post("/v1/score", content=b'{"candidates": [', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "malformed JSON" in response.json()["error"]


def test_deeply_nested_json_is_a_4xx(client):
    body = b"[" * 5_000 + b"]" * 5_000  # under the 20 kB limit, deeper than the JSON parser goes
    response = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "cannot be parsed" in response.json()["error"]


def test_oversized_body_is_a_413_with_or_without_content_length(client):
    big = json.dumps({"context": CONTEXT, "candidates": [{"category": "x" * 30_000, "price": 1.0}]}).encode()
    response = client.post("/v1/score", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than the limit of 20000 bytes" in response.json()["error"]

    def chunks():  # no Content-Length: the body streams in
        yield big[:10_000]
        yield big[10_000:]

    response = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_health_readiness_metrics_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["tasks"] == ["click", "like"]
    client.post("/v1/score", json={"context": CONTEXT, "candidates": CANDIDATES})
    metrics = client.get("/metrics").text
    assert 'mtrank_requests_total{endpoint="/v1/score",status="200"}' in metrics
    assert "mtrank_candidates_scored_total" in metrics
    schema = client.get("/openapi.json").json()
    assert "/v1/score" in schema["paths"] and "ScoreRequest" in schema["components"]["schemas"]


def test_readyz_is_503_until_warmed_up(model_dir):
    service = ScoringService(model_dir)
    with TestClient(create_app(service, warm_up=False)) as test_client:
        assert test_client.get("/readyz").status_code == 503
        service.warm_up()
        assert test_client.get("/readyz").status_code == 200


@pytest.fixture(scope="module")
def raw_client(tmp_path_factory):
    directory = tmp_path_factory.mktemp("raw")
    save_model(
        MultiTaskModel(
            ModelConfig(
                inputs={"num_dense": 3, "vocab_sizes": [5, 7], "embedding_dim": 2},
                tasks=TASKS,
                block={"num_experts": 2},
                experts={"hidden": [4]},
                towers={"hidden": [2]},
            )
        ),
        directory,
    )
    with TestClient(create_app(ScoringService(directory, backend="onnx"))) as test_client:
        yield test_client


def test_models_without_encoders_take_dense_and_sparse_lists(raw_client):
    candidates = [{"dense": [0.1, -1.0, 2.0], "sparse": [4, 6]}, {"dense": [0, 0, 0], "sparse": [0, 0]}]
    body = raw_client.post("/v1/score", json={"candidates": candidates}).json()
    assert len(body["scores"]) == 2 and sorted(body["ranking"]) == [0, 1]


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ({"dense": [0.1, 1.0], "sparse": [1, 1]}, "candidates[0].dense: expected a list of 3 numbers"),
        ({"dense": [0.1, 1.0, "x"], "sparse": [1, 1]}, "candidates[0].dense[2]: expected a finite number"),
        ({"dense": [0, 0, 0], "sparse": [1, 7]}, "candidates[0].sparse[1]: expected an integer id in [0, 7)"),
        ({"dense": [0, 0, 0], "sparse": [1.5, 1]}, "candidates[0].sparse[0]"),
        ({"dense": [0, 0, 0], "sparse": [1, 1], "price": 3}, "unknown key 'price'"),
        ({"dense": [0, 0, 10**400], "sparse": [1, 1]}, "candidates[0].dense[2]: expected a finite number"),
    ],
)
def test_raw_feature_errors_name_candidate_and_position(raw_client, candidate, message):
    response = raw_client.post("/v1/score", json={"candidates": [candidate]})
    assert response.status_code == 422 and message in response.json()["error"]


def test_mtrank_serve_starts_uvicorn_and_answers(model_dir):
    """The real command: a child process on a free loopback port, polled until ready, then stopped."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtrank.cli",
            "serve",
            str(model_dir),
            "--port",
            str(port),
            "--backend",
            "eager",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready within 60 s"
            time.sleep(0.05)  # polling interval of the readiness probe
        response = httpx.post(f"{url}/v1/score", json={"context": CONTEXT, "candidates": CANDIDATES}, timeout=10)
        assert response.status_code == 200 and len(response.json()["ranking"]) == 3
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_concurrent_calls_share_one_forward_pass_and_get_their_own_rows(model_dir):
    """Eight requests queued while a pass is running are scored together, each getting exactly its rows."""
    import threading

    from mtrank.export.common import random_inputs
    from mtrank.serve.batching import CoalescingScorer

    model = load_model(model_dir)
    passes = []

    def scorer(dense, sparse):  # the real model, recording the size of each pass
        passes.append(len(dense))
        return model.predict(dense, sparse)

    batcher = CoalescingScorer(scorer)
    inputs = [random_inputs(model, rows, seed=rows) for rows in range(1, 9)]
    results = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, batcher(*map(np.asarray, inputs[i]))))
        for i in range(8)
    ]
    with batcher.held():  # as if a forward pass were running: the eight calls queue, then run as one batch
        for thread in threads:
            thread.start()
        with batcher.condition:
            assert batcher.condition.wait_for(lambda: len(batcher.pending) == 8, timeout=30)
    for thread in threads:
        thread.join(timeout=30)
    assert passes == [sum(range(1, 9))]
    for i, (dense, sparse) in enumerate(inputs):
        np.testing.assert_allclose(results[i], model.predict(dense, sparse).numpy(), atol=1e-6)


def test_an_error_in_a_shared_pass_reaches_every_caller():
    from mtrank.serve.batching import CoalescingScorer

    def failing(dense, sparse):
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        CoalescingScorer(failing)(np.zeros((2, 3), np.float32), np.zeros((2, 0), np.int64))


def test_a_learned_blend_in_the_model_dir_sets_each_requests_weights(model_dir, tmp_path):
    import shutil

    from mtrank.blend.learned import LearnedBlend, ServedLearnedBlend

    directory = tmp_path / "with_learned"
    shutil.copytree(model_dir, directory)
    torch.manual_seed(0)
    net = LearnedBlend(context_dim=2, default_weights=[1.0, 1.0], hidden=[4])
    torch.nn.init.normal_(net.head.weight)  # not the default weights any more
    ServedLearnedBlend(net, ["hour", "segment"], ["click", "like"]).save(directory)
    service = ScoringService(directory)
    with TestClient(create_app(service)) as learned_client:
        for segment in (0.0, 1.0):
            context = {**CONTEXT, "segment": segment}  # "segment": read by the blend only, not the model
            body = learned_client.post("/v1/score", json={"context": context, "candidates": CANDIDATES}).json()
            with torch.no_grad():
                w = net.task_weights(torch.tensor([[21.0, segment]]))[0].numpy()
            scores = np.array([[row["click"], row["like"]] for row in body["scores"]])
            assert body["blend"]["source"] == "learned"
            np.testing.assert_allclose([body["blend"]["weights"][t] for t in ("click", "like")], w, rtol=1e-6)
            np.testing.assert_allclose(body["blended"], scores @ w, rtol=1e-5, atol=1e-6)
        missing = learned_client.post("/v1/score", json={"context": CONTEXT, "candidates": CANDIDATES})
        assert missing.status_code == 422 and "'segment'" in missing.json()["error"]
        explicit = {"weights": {"click": 1.0}}
        body = learned_client.post(
            "/v1/score", json={"context": {**CONTEXT, "segment": 1}, "candidates": CANDIDATES, "blend": explicit}
        ).json()
        assert body["blend"]["source"] == "request"
    assert ScoringService(directory, learned_blend=False).learned is None
    (directory / "learned_blend.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"learned_blend.json: .* manifest.json"):
        ScoringService(directory)
    seal_model_dir(directory)  # sealed as it is: the learned blend's own check refuses it
    with pytest.raises(ValueError, match="learned_blend.json: cannot load"):
        ScoringService(directory)
