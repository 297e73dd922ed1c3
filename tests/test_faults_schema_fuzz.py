"""A bounded hypothesis run over the service's OpenAPI schema: requests generated from the ``ScoreRequest`` schema
that ``/openapi.json`` serves and its example request (valid shapes and values, each value and key sometimes
replaced by arbitrary JSON, keys dropped or added), posted to the app in-process. No answer is a 5xx; every 4xx body is
bounded and its ``error`` names where the problem is (issue 10, the fault-injection suite).

The number of examples is bounded (``MTRANK_FUZZ_EXAMPLES``, default 400, ~6 s here) and the run is
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

EXAMPLES = int(os.environ.get("MTRANK_FUZZ_EXAMPLES", "400"))
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


def from_example(example):
    """The example value (the OpenAPI example, a valid request for the served model), each part of it sometimes
    replaced by arbitrary JSON, with keys sometimes dropped or added."""
    if isinstance(example, dict):
        base = st.fixed_dictionaries({k: from_example(v) for k, v in example.items()})
        drop = st.just(set()) | st.sets(st.sampled_from(sorted(example) or [""]), max_size=2)
        extra = st.just({}) | st.dictionaries(KEYS, ANY_JSON, max_size=2)
        return st.builds(
            lambda d, gone, more: {**{k: v for k, v in d.items() if k not in gone}, **more}, base, drop, extra
        )
    if isinstance(example, list):
        return st.lists(from_example(example[0]), min_size=0, max_size=8) if example else st.just([])
    return st.one_of(st.just(example), st.just(example), st.just(example), ANY_JSON)


def from_schema(schema: dict, components: dict, example=None) -> st.SearchStrategy:
    """A strategy for values of a JSON schema (the subset pydantic writes): the schema's shapes, the example's
    values mutated (:func:`from_example`), and sometimes any JSON at all."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].rsplit("/", 1)[1]], components, example)
    if "anyOf" in schema:
        shaped = st.one_of([from_schema(s, components) for s in schema["anyOf"]])
    elif schema.get("type") == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        examples = example if isinstance(example, dict) else {}
        shaped = st.fixed_dictionaries(
            {k: from_schema(v, components, examples.get(k)) for k, v in properties.items() if k in required},
            optional={
                k: from_schema(v, components, examples.get(k)) for k, v in properties.items() if k not in required
            },
        )
        if schema.get("additionalProperties", True) is not False:
            extra = schema["additionalProperties"] if isinstance(schema.get("additionalProperties"), dict) else {}
            values = from_schema(extra, components) if extra else ANY_JSON
            shaped = st.builds(lambda a, b: {**b, **a}, shaped, st.dictionaries(KEYS, values, max_size=6))
    elif schema.get("type") == "array":
        item = example[0] if isinstance(example, list) and example else None
        shaped = st.lists(from_schema(schema.get("items", {}), components, item), min_size=0, max_size=8)
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
    if example is not None:  # mostly the example's values, as a client of this model would send
        return st.one_of(from_example(example), from_example(example), shaped, ANY_JSON)
    return st.one_of(shaped, shaped, shaped, ANY_JSON)


@pytest.fixture(scope="module")
def client(model_dir):  # noqa: F811
    app = create_app(ScoringService(model_dir, "eager", max_candidates=50), max_body_bytes=200_000)
    with TestClient(app) as test_client:
        yield test_client


@pytest.mark.slow
def test_requests_generated_from_the_openapi_schema_get_no_5xx_and_bounded_errors_naming_a_field(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    content = schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]
    request_schema, example = content["schema"], content["example"]  # the example: valid for the served model
    statuses: dict[int, int] = {}

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(from_schema(request_schema, components, example))
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
    print(f"{EXAMPLES} generated requests: statuses {statuses}")  # shown with pytest -s
    assert statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 0, statuses
