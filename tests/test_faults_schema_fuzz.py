"""A bounded hypothesis run over the service's OpenAPI schema: requests generated from the ``ScoreRequest`` schema
that ``/openapi.json`` serves (valid shapes, with every value and key sometimes replaced by arbitrary JSON, and
the served model's feature names as keys), posted to the app in-process. No answer is a 5xx; every 4xx body is
bounded and its ``error`` names where the problem is (issue 10, the fault-injection suite).

The number of examples is bounded (``MTRANK_FUZZ_EXAMPLES``, default 250, ~10 s here) and the run is
derandomised: the same requests every time.
"""

import json
import os

import pytest
from fastapi.testclient import TestClient
from tests.test_serve import model_dir  # noqa: F401  (the served model directory fixture)

from mtrank.serve.app import create_app
from mtrank.serve.limits import MAX_ERROR_CHARS, MAX_ERROR_DETAILS
from mtrank.serve.service import ScoringService

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra: pip install -e '.[dev]'")
st = hypothesis.strategies

EXAMPLES = int(os.environ.get("MTRANK_FUZZ_EXAMPLES", "250"))
FEATURES = ["country", "category", "hour", "price"]  # the served model's (tests/test_serve.py)
FIELDS = ("body", "request body", "context", "candidates", "blend", "top_k")  # where an error may point

ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(FEATURES) | st.text(max_size=8)


def from_schema(schema: dict, components: dict) -> st.SearchStrategy:
    """A strategy for values of a JSON schema (the subset pydantic writes), sometimes any JSON instead."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].rsplit("/", 1)[1]], components)
    if "anyOf" in schema:
        shaped = st.one_of([from_schema(s, components) for s in schema["anyOf"]])
    elif schema.get("type") == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        shaped = st.fixed_dictionaries(
            {k: from_schema(v, components) for k, v in properties.items() if k in required},
            optional={k: from_schema(v, components) for k, v in properties.items() if k not in required},
        )
        if schema.get("additionalProperties", True) is not False:
            extra = schema["additionalProperties"] if isinstance(schema.get("additionalProperties"), dict) else {}
            values = from_schema(extra, components) if extra else ANY_JSON
            shaped = st.builds(lambda a, b: {**b, **a}, shaped, st.dictionaries(KEYS, values, max_size=6))
    elif schema.get("type") == "array":
        shaped = st.lists(from_schema(schema.get("items", {}), components), min_size=0, max_size=8)
    elif schema.get("type") == "integer":
        shaped = st.integers(min_value=schema.get("minimum", -(2**70)) - 1, max_value=2**70)
    elif schema.get("type") == "number":
        shaped = st.floats(allow_nan=True, allow_infinity=True) | st.integers()
    elif schema.get("type") == "string":
        shaped = st.sampled_from(["weighted_sum", "weighted_product", "rank", "logit", "click", "like"]) | st.text()
    elif schema.get("type") == "null":
        shaped = st.none()
    else:
        shaped = ANY_JSON
    return st.one_of(shaped, shaped, shaped, ANY_JSON)  # mostly the schema's shape


@pytest.fixture(scope="module")
def client(model_dir):  # noqa: F811
    app = create_app(ScoringService(model_dir, "eager", max_candidates=50), max_body_bytes=200_000)
    with TestClient(app) as test_client:
        yield test_client


@pytest.mark.slow
def test_requests_generated_from_the_openapi_schema_get_no_5xx_and_bounded_errors_naming_a_field(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    request_schema = schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    statuses: dict[int, int] = {}

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(from_schema(request_schema, components))
    def check(payload):
        body = json.dumps(payload, allow_nan=True).encode()
        response = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (payload, response.text[:500])
        if response.status_code >= 400:
            answer = response.json()
            assert len(answer["error"]) <= MAX_ERROR_CHARS and len(answer["detail"]) <= MAX_ERROR_DETAILS
            assert len(response.content) < 8 * MAX_ERROR_CHARS * (MAX_ERROR_DETAILS + 1)
            named = FIELDS + tuple(str(k) for k in payload) if isinstance(payload, dict) else FIELDS
            assert answer["error"].startswith(named), answer["error"]  # where: a field, or an unknown key

    check()
    assert statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 0, statuses
