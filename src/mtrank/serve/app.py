"""The HTTP scoring service: a FastAPI app over a :class:`~mtrank.serve.service.ScoringService`, its
middleware (the body size limit) and its Prometheus metrics.

Endpoints: ``POST /v1/score`` (context + candidates -> per-task scores, blended score, ranking),
``GET /healthz`` (the process is up), ``GET /readyz`` (model loaded and warmed up), ``GET /metrics``
(Prometheus text format), ``GET /openapi.json`` and ``/docs``.

Every problem with a request is a 4xx whose ``error`` names it: malformed JSON or a wrong body shape (422), an
unknown, missing or wrongly typed feature (422), too many candidates (422), a body over the size limit (413).
Inputs that would make non-finite scores are refused (422) rather than answered with NaN.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtrank import __version__
from mtrank.serve.limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, MAX_ERROR_CHARS, MAX_ERROR_DETAILS
from mtrank.serve.requests import RequestError
from mtrank.serve.schemas import BlendSpec, ErrorResponse, ScoreRequest, ScoreResponse
from mtrank.serve.service import ScoringService

try:  # a faster decode of request bodies; without it the standard library's
    import orjson
except ImportError:  # pragma: no cover - orjson is in the serve extra
    orjson = None

UNMATCHED = "unmatched"  # the metrics label of every path no route serves (one series, whatever the paths)


class BodyLimitMiddleware:
    """Reads a request's whole body before the app sees it, bounded in size and time: 413 for a body over
    ``max_bytes`` (at once by Content-Length, else as soon as the streamed chunks pass it), 408 when the body
    has not arrived within ``timeout_s`` (a client that promises more body than it sends is cut off)."""

    def __init__(self, app, max_bytes: int, timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _refuse(
                send, 413, f"request body: larger than the limit of {self.max_bytes} bytes (--max-body-bytes)"
            )
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except TimeoutError:
            await _refuse(send, 408, f"request body: not received within {self.timeout_s:g} s (--body-timeout)")
            return
        if body is None:
            await _refuse(
                send, 413, f"request body: larger than the limit of {self.max_bytes} bytes (--max-body-bytes)"
            )
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The body's bytes, or None once they pass ``max_bytes``."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "detail": []}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + [(b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of their own (several apps may run in one process).

    ``mtrank_requests_total{endpoint, status}``, ``mtrank_request_seconds{endpoint}`` (scoring latency),
    ``mtrank_candidates_per_request``, ``mtrank_candidates_scored_total``.
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("mtrank_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry)
        self.latency = Histogram(
            "mtrank_request_seconds",
            "scoring latency (seconds)",
            ["endpoint"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.candidates = Histogram(
            "mtrank_candidates_per_request",
            "candidates per scoring request",
            registry=registry,
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
        )
        self.candidates_total = Counter("mtrank_candidates_scored_total", "candidates scored", registry=registry)
        self.unseen = Counter(
            "mtrank_unseen_categorical_values_total",
            "candidate values of a categorical feature not in its training vocabulary",
            ["feature"],
            registry=registry,
        )

    def scored(self, endpoint: str, seconds: float, candidates: int) -> None:
        """Count a request answered 200 after ``seconds`` of scoring ``candidates`` candidates."""
        self.latency.labels(endpoint).observe(seconds)
        self.candidates.observe(candidates)
        self.candidates_total.inc(candidates)
        self.requests.labels(endpoint, "200").inc()

    def unseen_values(self, counts: dict[str, int]) -> None:
        """Count a request's unseen categorical values, by feature."""
        for feature, count in counts.items():
            self.unseen.labels(feature).inc(count)


def _location(loc: tuple) -> str:
    """A pydantic error location (``("body", "candidates", 0)``) as the request's path (``candidates[0]``)."""
    text = ""
    for part in (p for p in loc if p != "body"):  # ints index lists; strings (even "0") are keys
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _route(request: Request) -> str:
    """The metrics label of a request: its route's template, or one label for every unknown path."""
    route = request.scope.get("route")
    return getattr(route, "path", UNMATCHED) if route is not None else UNMATCHED


FAST_COUNT_BYTES = 1 << 16  # bodies above this are counted by orjson before the strict decode
CODECS = ("orjson", "json")  # request/response JSON: orjson (default), or the standard library (the old path)
# an integer literal of 19+ digits may be outside int64, which orjson reads as a float where json keeps an int
DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
LONG_RUN = b"0" * 19


def _may_hold_a_long_integer(body: bytes) -> bool:
    """Whether ``body`` has a run of 19+ digits that is not the fraction or exponent of a number (it does not
    follow ``.``, ``e`` or ``E``). One C pass and a substring search: 0.1 ms for a 51 kB request, where a regular
    expression with a look-behind took 2.2 ms, more than decoding the body."""
    digits = body.translate(DIGITS_TO_ZERO)
    start = digits.find(LONG_RUN)
    while start >= 0:
        if start == 0 or digits[start - 1] not in b".eE":
            return True
        start = digits.find(LONG_RUN, start + len(LONG_RUN))
    return False


def _bounded(message: str) -> str:
    """A 4xx message cut to :data:`MAX_ERROR_CHARS` (no echo of a huge value)."""
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 3] + "..."


def parse_score_request(body: bytes, max_candidates: int, codec: str = "json") -> ScoreRequest:
    """A ``/v1/score`` body -> :class:`ScoreRequest`, the cheap limits first: bytes that are not UTF-8 (400),
    JSON too deep to parse (400), malformed JSON (422), then the candidate count (422) before any candidate
    is validated, so a request of a million tiny candidates is refused for the price of one JSON decode.

    ``codec="orjson"``: the body is decoded by orjson (3.5x faster than :mod:`json` on a 100-candidate request)
    unless orjson would read it differently from :mod:`json`: a body orjson refuses (NaN literals, lone
    surrogates, not UTF-8, too deep) or one with an integer literal of 19+ digits (orjson reads integers
    beyond 64 bits as floats) goes to the strict decode, so both codecs give the same answer to every body.

    ``codec="json"`` (the old path): a large body (over :data:`FAST_COUNT_BYTES`) is first counted with orjson
    where installed, so a huge request is refused in milliseconds; then every body is decoded by :mod:`json`."""
    data = _decode(body, max_candidates, codec)
    _check_count(data, max_candidates)
    try:
        return ScoreRequest.model_validate(data)
    except RecursionError:
        raise RequestError("request body: nested too deeply; send a flatter request", 400) from None


def _decode(body: bytes, max_candidates: int, codec: str) -> object:
    if orjson is not None and codec == "orjson" and not _may_hold_a_long_integer(body):
        with contextlib.suppress(orjson.JSONDecodeError):  # the strict decode says what is wrong
            return orjson.loads(body)
    elif orjson is not None and len(body) > FAST_COUNT_BYTES:
        with contextlib.suppress(orjson.JSONDecodeError):
            _check_count(orjson.loads(body), max_candidates)
    return _decode_strict(body)


def _check_count(data: object, max_candidates: int) -> None:
    candidates = data.get("candidates") if isinstance(data, dict) else None
    if isinstance(candidates, list) and len(candidates) > max_candidates:
        raise RequestError(
            f"candidates: {len(candidates)} candidates; at most {max_candidates} per request "
            "(split the request, or start the service with a larger --max-candidates)"
        )


def _decode_strict(body: bytes) -> object:
    """The standard library's decode, whose errors name the problem: not UTF-8 (400), too deep (400), malformed
    (422)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(
            f"request body: not UTF-8 text (byte {err.start}); send JSON encoded as UTF-8", 400
        ) from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise RequestError(
            "request body: JSON cannot be parsed: nested too deeply; send a flatter request", 400
        ) from None
    except json.JSONDecodeError as err:
        raise RequestError(f"body: malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if b"\\u" in body:  # an escape such as \ud800 decodes to a lone surrogate, which is not text (nor UTF-8)
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(
                "request body: a string holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff); send valid "
                "Unicode text",
                400,
            ) from None
    return data


def create_app(
    service: ScoringService,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    warm_up: bool = True,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    codec: str = "orjson",
) -> FastAPI:
    """The FastAPI app of ``service``. It is ready (``/readyz`` 200) once the warm-up pass has run.

    Args:
        service: the loaded model directory.
        max_body_bytes: larger request bodies are answered 413.
        warm_up: run :meth:`ScoringService.warm_up` when the app starts (else call it yourself).
        body_timeout_s: a request body not received within this many seconds is answered 408.
        codec: ``orjson`` (default): bodies decoded by orjson (see :func:`parse_score_request`) and answers
            written by orjson from plain lists; ``json``: the old path, the standard library's decode and the
            answer validated against :class:`ScoreResponse` and encoded by FastAPI. Same answers, same errors.

    Example:
        >>> import tempfile
        >>> from fastapi.testclient import TestClient
        >>> from mtrank import ModelConfig, MultiTaskModel
        >>> from mtrank.artifacts import save_model
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     service = ScoringService(save_model(MultiTaskModel(ModelConfig(inputs={"num_dense": 2})), tmp), "eager")
        >>> with TestClient(create_app(service)) as client:
        ...     ok = client.post("/v1/score", json={"candidates": [{"dense": [0.5, 1.0]}]})
        ...     bad = client.post("/v1/score", json={"candidates": [{"dense": [0.5]}]})
        >>> ok.status_code, ok.json()["ranking"], bad.status_code
        (200, [0], 422)
        >>> bad.json()["error"]
        'candidates[0].dense: expected a list of 2 numbers, got [0.5]'
    """
    if codec not in CODECS:
        raise ValueError(f"codec: unknown {codec!r}; expected one of {CODECS}")
    if codec == "orjson" and orjson is None:
        raise ValueError("codec orjson: orjson is not installed; pip install 'mtrank[serve]', or use codec json")
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm_up:
            await run_in_threadpool(service.warm_up)
        yield

    app = FastAPI(
        title="mtrank scoring service",
        version=__version__,
        description="Scores candidates with a multi-task ranker and blends the task scores into one ranking.",
        lifespan=lifespan,
    )
    app.state.service = service

    def error(request: Request, status: int, message: str, detail=(), headers=None) -> JSONResponse:
        """A 4xx answer ``{"error": one line, "detail": [...]}``, both bounded, counted in ``mtrank_requests_total``."""
        metrics.requests.labels(_route(request), str(status)).inc()
        detail = [{k: _bounded(str(v)) for k, v in d.items()} for d in list(detail)[:MAX_ERROR_DETAILS]]
        return JSONResponse({"error": _bounded(message), "detail": detail}, status_code=status, headers=headers)

    def validation_error(request: Request, errors: list[dict[str, Any]]) -> JSONResponse:
        details = [{"loc": _location(tuple(e.get("loc", ()))), "msg": e.get("msg", "")} for e in errors]
        first = details[0] if details else {"loc": "body", "msg": "invalid request"}
        return error(request, 422, f"{first['loc']}: {first['msg']}", details)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(request, list(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _model_validation_error(request: Request, exc: ValidationError) -> JSONResponse:
        return validation_error(request, exc.errors(include_url=False, include_input=False))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(request, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error(request, exc.status, str(exc))

    def score_body(body: bytes) -> tuple[ScoreResponse | Response, dict[str, int], int]:
        parsed = parse_score_request(body, service.max_candidates, codec)
        if codec == "json":  # FastAPI validates the model against response_model and encodes it
            response = service.score(parsed)
            return response, response.unseen, len(parsed.candidates)
        answer = service.answer(parsed)  # plain lists and dicts, written as they are
        return Response(orjson.dumps(answer), media_type="application/json"), answer["unseen"], len(parsed.candidates)

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses={
            400: {"model": ErrorResponse, "description": "the body is not UTF-8, or JSON too deeply nested"},
            408: {"model": ErrorResponse, "description": "the body did not arrive within the body timeout"},
            413: {"model": ErrorResponse, "description": "the body is over the size limit"},
            422: {"model": ErrorResponse, "description": "malformed JSON or a bad feature, count or value"},
        },
        summary="Score candidates: per-task scores, blended score and ranking",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/ScoreRequest"},
                        "example": service.example_request(),
                    }
                },
            }
        },
    )
    async def score(request: Request) -> ScoreResponse | Response:
        started = time.perf_counter()
        response, unseen, candidates = await run_in_threadpool(score_body, await request.body())
        metrics.scored("/v1/score", time.perf_counter() - started, candidates)
        metrics.unseen_values(unseen)
        return response

    @app.get("/healthz", summary="Liveness: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: the model is loaded and a warm-up request gave finite scores",
        responses={503: {}},
    )
    def readyz() -> JSONResponse:
        if not service.ready:
            return JSONResponse({"status": "loading", "problem": service.not_ready}, status_code=503)
        return JSONResponse({"status": "ready", **service.describe()})

    for path, endpoint in (("/healthz", healthz), ("/readyz", readyz)):  # HEAD: the GET's status, no body
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, plus the request body's models (the score route reads its body itself)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            models = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ScoreRequest, BlendSpec):
                models[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
                models[model.__name__].pop("$defs", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    return app
