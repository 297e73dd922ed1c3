"""The service under hostile and broken input: limits checked before work, bounded error bodies, bounded metrics,
a body-read timeout, HEAD on health endpoints, one policy for non-finite numbers, a valid OpenAPI example,
readiness only after a finite warm-up, and blend errors that are 4xx (issue 10)."""

import asyncio
import json

import pytest
import torch
from fastapi.testclient import TestClient
from tests.test_serve import CANDIDATES, CONTEXT, model_dir  # noqa: F401  (the served model directory fixture)

from mtrank.artifacts import save_model
from mtrank.config import ModelConfig
from mtrank.model import MultiTaskModel
from mtrank.serve.app import BodyLimitMiddleware, create_app, parse_score_request
from mtrank.serve.limits import MAX_ERROR_CHARS
from mtrank.serve.requests import RequestError
from mtrank.serve.service import ScoringService


@pytest.fixture(scope="module")
def client(model_dir):  # noqa: F811
    app = create_app(ScoringService(model_dir, max_candidates=50), max_body_bytes=2_000_000)
    with TestClient(app) as test_client:
        yield test_client


def test_a_huge_candidate_list_is_refused_before_any_candidate_is_validated(client, monkeypatch):
    validated = []
    monkeypatch.setattr("mtrank.serve.schemas.ScoreRequest.model_validate", lambda data: validated.append(data))
    body = b'{"candidates": [' + b",".join([b"1"] * 990_000) + b"]}"  # 1.98 MB, under the body limit
    response = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"].startswith("candidates: 990000 candidates")
    assert len(response.content) < 1_000 and validated == []


def test_parse_refuses_the_count_before_validation():
    with pytest.raises(RequestError, match="at most 3 per request"):
        parse_score_request(json.dumps({"candidates": [1, 2, 3, 4]}).encode(), max_candidates=3)


def test_a_large_body_is_counted_fast_and_otherwise_decoded_as_a_small_one(monkeypatch):
    from mtrank.serve import app as app_module

    huge = json.dumps({"candidates": [1] * 100_000}).encode()
    assert len(huge) > app_module.FAST_COUNT_BYTES
    strict = []
    monkeypatch.setattr(app_module, "_decode_strict", lambda body: strict.append(body) or json.loads(body))
    with pytest.raises(RequestError, match="100000 candidates; at most 1000"):
        parse_score_request(huge, max_candidates=1000)
    assert strict == [] or app_module.orjson is None  # refused on the fast count, before the strict decode
    # under the limit, the answer is the strict decode's: a 90-digit integer stays an integer (orjson: a float)
    padded = {"context": {"pad": "x" * 70_000}, "candidates": [{"country": 10**90}]}
    request = parse_score_request(json.dumps(padded).encode(), max_candidates=1000)
    assert request.candidates[0]["country"] == 10**90 and len(strict) == 1


def test_error_bodies_are_bounded_and_do_not_echo_huge_values(client):
    huge = "x" * 1_500_000
    response = client.post("/v1/score", json={"context": CONTEXT, "candidates": [{"category": huge, "price": 1.0}]})
    assert response.status_code == 422 and "length 1500000; at most 1000" in response.json()["error"]
    assert len(response.content) < 4 * MAX_ERROR_CHARS
    many = client.post("/v1/score", json={"candidates": [[i] for i in range(40)]})  # 40 pydantic errors
    assert many.status_code == 422 and len(many.json()["detail"]) <= 10 and len(many.content) < 5_000


def test_metrics_are_labelled_by_route_template_so_unknown_paths_share_one_series(client):
    for i in range(50):
        assert client.get(f"/no/such/path/{i}").status_code == 404
    metrics = client.get("/metrics").text
    assert "/no/such/path" not in metrics
    assert 'mtrank_requests_total{endpoint="unmatched",status="404"} 50.0' in metrics


def test_head_on_health_endpoints(client):
    for path in ("/healthz", "/readyz"):
        response = client.head(path)
        assert response.status_code == 200 and response.content == b""


def test_non_utf8_body_is_a_clear_400(client):
    response = client.post(
        "/v1/score", content=b'{"candidates": ["\xff\xfe"]}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not UTF-8" in response.json()["error"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "1e308"])
def test_every_non_finite_or_overflowing_number_is_the_same_422_naming_the_field(client, literal):
    body = '{"context": {"country": "fr", "price": 3.0}, "candidates": [{"category": "hats", "hour": 1.0}, '
    body += '{"category": "hats", "hour": ' + literal + "}]}"  # hour is standardised: 1e308 overflows float32
    response = client.post("/v1/score", content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert "'hour'" in response.json()["error"] and "candidates[1]" in response.json()["error"]


def test_openapi_states_the_policy_lists_400_and_its_example_is_served(client):
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/v1/score"]["post"]
    assert {"400", "408", "413", "422"} <= set(operation["responses"])
    assert "Infinity" in schema["components"]["schemas"]["ScoreRequest"]["description"]
    assert "standardize" in json.dumps(schema["components"]["schemas"]["BlendSpec"])
    example = operation["requestBody"]["content"]["application/json"]["example"]
    response = client.post("/v1/score", json=example)
    assert response.status_code == 200, response.text


def test_weighted_product_of_negative_transformed_scores_is_a_422(client):
    blend = {"method": "weighted_product", "weights": {"click": 1, "like": 1}, "transforms": {"click": "logit"}}
    response = client.post("/v1/score", json={"context": CONTEXT, "candidates": CANDIDATES, "blend": blend})
    assert response.status_code == 422 and "weighted_product" in response.json()["error"]


def test_unseen_categorical_values_are_reported_and_counted(client):
    response = client.post("/v1/score", json={"context": CONTEXT, "candidates": CANDIDATES})
    assert response.json()["unseen"] == {"category": 1}
    assert 'mtrank_unseen_categorical_values_total{feature="category"}' in client.get("/metrics").text


def test_a_model_with_a_nan_weight_never_reports_ready(tmp_path):
    model = MultiTaskModel(ModelConfig(inputs={"num_dense": 2}))
    service = ScoringService(save_model(model, tmp_path), "eager")
    with torch.no_grad():  # a weight corrupted after load: the warm-up request must catch it
        next(service.model.parameters()).fill_(float("nan"))
    service.start()  # a scorer of the corrupted weights
    with TestClient(create_app(service)) as test_client:
        response = test_client.get("/readyz")
        assert response.status_code == 503 and "non-finite" in response.json()["problem"]


def test_a_body_that_never_arrives_is_cut_off_with_408():
    async def app(scope, receive, send):  # never reached
        raise AssertionError("the app saw a request whose body never arrived")

    sent = []

    async def receive():  # a client that promised a body and went quiet
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": [(b"content-length", b"100")]}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=1_000, timeout_s=0.05)(scope, receive, send))
    assert sent[0]["status"] == 408 and b"not received within" in sent[1]["body"]


def test_a_key_made_of_digits_is_named_as_a_key_not_as_a_list_index(client):
    response = client.post("/v1/score", json={"candidates": [{"category": "hats", "price": 1.0}], "0": 1})
    assert response.status_code == 422 and response.json()["error"].startswith("0: ")  # found by the schema fuzz
