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

import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtrank import __version__
from mtrank.serve.limits import DEFAULT_MAX_BODY_BYTES
from mtrank.serve.requests import RequestError
from mtrank.serve.schemas import ErrorResponse, ScoreRequest, ScoreResponse
from mtrank.serve.service import ScoringService


class BodyLimitMiddleware:
    """Answers 413 to a request body over ``max_bytes``: at once by Content-Length, else (a chunked body) by
    reading it up to the limit before the app sees it."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await _too_large(self.max_bytes, send)
                return
            await self.app(scope, receive, send)
            return
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                await _too_large(self.max_bytes, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _too_large(max_bytes: int, send) -> None:
    body = json.dumps({"error": f"request body: larger than the limit of {max_bytes} bytes (--max-body-bytes)"})
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


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

    def scored(self, endpoint: str, seconds: float, candidates: int) -> None:
        """Count a request answered 200 after ``seconds`` of scoring ``candidates`` candidates."""
        self.latency.labels(endpoint).observe(seconds)
        self.candidates.observe(candidates)
        self.candidates_total.inc(candidates)
        self.requests.labels(endpoint, "200").inc()


def _location(loc: tuple) -> str:
    """A pydantic error location (``("body", "candidates", 0)``) as the request's path (``candidates[0]``)."""
    parts = [str(p) for p in loc if p != "body"]
    text = ""
    for part in parts:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text or "body"


def create_app(service: ScoringService, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, warm_up: bool = True) -> FastAPI:
    """The FastAPI app of ``service``. It is ready (``/readyz`` 200) once the warm-up pass has run.

    Args:
        service: the loaded model directory.
        max_body_bytes: larger request bodies are answered 413.
        warm_up: run :meth:`ScoringService.warm_up` when the app starts (else call it yourself).

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
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm_up:
            service.warm_up()
        yield

    app = FastAPI(
        title="mtrank scoring service",
        version=__version__,
        description="Scores candidates with a multi-task ranker and blends the task scores into one ranking.",
        lifespan=lifespan,
    )
    app.state.service = service

    def error(request: Request, status: int, message: str, detail=(), headers=None) -> JSONResponse:
        """A 4xx answer ``{"error": one line, "detail": [...]}``, counted in ``mtrank_requests_total``."""
        metrics.requests.labels(request.url.path, str(status)).inc()
        return JSONResponse({"error": message, "detail": list(detail)}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": _location(tuple(e.get("loc", ()))), "msg": e.get("msg", "")} for e in exc.errors()]
        first = details[0] if details else {"loc": "body", "msg": "invalid request"}
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            first = {
                "loc": "body",
                "msg": "malformed JSON: " + str(exc.errors()[0].get("ctx", {}).get("error", "")),
            }
        return error(request, 422, f"{first['loc']}: {first['msg']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "request body: cannot be parsed as JSON (too deeply nested?)"
        return error(request, exc.status_code, message, headers=exc.headers)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error(request, exc.status, str(exc))

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses={413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
        summary="Score candidates: per-task scores, blended score and ranking",
    )
    def score(body: ScoreRequest) -> ScoreResponse:
        started = time.perf_counter()
        response = service.score(body)
        metrics.scored("/v1/score", time.perf_counter() - started, len(body.candidates))
        return response

    @app.get("/healthz", summary="Liveness: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the model is loaded and warmed up", responses={503: {}})
    def readyz() -> JSONResponse:
        if not service.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", **service.describe()})

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    return app
