"""The HTTP scoring service: FastAPI app over a model directory.

Endpoints: ``POST /v1/score`` (context + candidates -> per-task scores, blended score, ranking),
``GET /healthz`` (the process is up), ``GET /readyz`` (model loaded and warmed up), ``GET /metrics``
(Prometheus text format), ``GET /openapi.json`` and ``/docs``.

Every problem with a request is a 4xx whose ``error`` names it: malformed JSON or a wrong body shape (422), an
unknown, missing or wrongly typed feature (422), too many candidates (422), a body over the size limit (413).
Inputs that would make non-finite scores are refused (422) rather than answered with NaN.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtrank import __version__
from mtrank.artifacts import load_model, read_model_meta
from mtrank.blend.learned import LEARNED_BLEND_FILE, ServedLearnedBlend
from mtrank.blend.rules import BLEND_FILE, Blend, ranking
from mtrank.data.encoders import ENCODERS_FILE, FeatureEncoder
from mtrank.serve.backends import Scorer
from mtrank.serve.batching import CoalescingScorer
from mtrank.serve.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CANDIDATES
from mtrank.serve.schemas import ErrorResponse, ScoreRequest, ScoreResponse

log = logging.getLogger("mtrank.serve")


class RequestError(ValueError):
    """A problem with a request; ``status`` is the HTTP status to answer with (4xx)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class ScoringService:
    """Loads a model directory and scores requests (no HTTP here; :func:`create_app` wraps it).

    Args:
        model_dir: ``model.safetensors`` + ``config.json`` (+ ``encoders.json``, ``blend.json`` when present).
        backend / precision / threads: see :class:`mtrank.serve.backends.Scorer`.
        max_candidates: most candidates per request.
        blend: the default blend; else the learned blend (``MODEL_DIR/learned_blend.json``: task weights
            computed per request from context fields, :mod:`mtrank.blend.learned`) unless
            ``learned_blend=False``; else ``MODEL_DIR/blend.json``; else equal weights. A request's own
            ``blend`` overrides all of them.
    """

    def __init__(
        self,
        model_dir: str | Path,
        backend: str = "auto",
        precision: str = "fp32",
        threads: int = 0,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        blend: Blend | None = None,
        learned_blend: bool = True,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.meta = read_model_meta(self.model_dir)
        model = load_model(self.model_dir)
        self.model = model
        self.task_names = [t.name for t in model.tasks]
        self.encoder = FeatureEncoder.load(self.model_dir) if (self.model_dir / ENCODERS_FILE).is_file() else None
        encoded = None if self.encoder is None else (self.encoder.num_dense, self.encoder.vocab_sizes)
        if encoded is not None and encoded != (self.model.num_dense, self.model.vocab_sizes):
            raise ValueError(
                f"{self.model_dir / ENCODERS_FILE}: encoders give {encoded[0]} dense features and "
                "vocabularies "
                f"{encoded[1]}; the model expects {self.model.num_dense} and {self.model.vocab_sizes}"
            )
        self.learned = ServedLearnedBlend.load(self.model_dir) if learned_blend and blend is None else None
        self.learned_only: set[str] = set()  # context fields read by the learned blend only, not the model
        if self.learned is not None:
            if sorted(self.learned.tasks) != sorted(self.task_names):
                raise ValueError(
                    f"{self.model_dir / LEARNED_BLEND_FILE}: weights for tasks {self.learned.tasks}; the model's "
                    f"tasks are {self.task_names}"
                )
            inputs = set(self.encoder.input_columns) if self.encoder is not None else set()
            self.learned_only = set(self.learned.context_features) - inputs
        if blend is None and (self.model_dir / BLEND_FILE).is_file():
            blend = Blend.from_dict(json.loads((self.model_dir / BLEND_FILE).read_text()), self.task_names)
        self.blend = (blend or Blend.default(self.task_names)).validate(self.task_names)
        self.scorer = Scorer(model, backend, precision, threads=threads)
        self.max_candidates = max_candidates
        # one forward pass at a time (the model already uses every core); concurrent requests share a pass
        self.batcher = CoalescingScorer(self.scorer, max_rows=max(4096, max_candidates))
        self.ready = False

    @property
    def vocab_sizes(self) -> list[int]:
        return self.model.vocab_sizes

    def warm_up(self) -> None:
        """Forward passes of a one-candidate and a full request (compilation, allocator, kernel caches) and the
        encoders' lookup tables, so the first real requests pay no set-up cost."""
        from mtrank.export.formats import random_inputs

        if self.encoder is not None:
            self.encoder.prepare_lookups()
        for batch in (1, min(self.max_candidates, 1000)):
            dense, sparse = random_inputs(self.model, batch)
            self.batcher(dense.numpy(), sparse.numpy())
        self.ready = True

    def describe(self) -> dict[str, Any]:
        return {
            "tasks": self.task_names,
            "backend": self.scorer.name,
            "features": self.encoder.input_columns
            if self.encoder
            else {"dense": self.model.num_dense, "sparse": self.vocab_sizes},
            "max_candidates": self.max_candidates,
            "forward_passes": self.batcher.batches,
            "requests_per_pass": self.batcher.calls / max(self.batcher.batches, 1),
            "blend": self.blend.to_dict()
            if self.learned is None
            else {"learned": True, "context_features": self.learned.context_features, "tasks": self.learned.tasks},
        }

    # ------------------------------------------------------------------------------------------ encoding

    def encode(self, context: dict[str, Any], candidates: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        if len(candidates) > self.max_candidates:
            raise RequestError(
                f"candidates: {len(candidates)} candidates; at most {self.max_candidates} per request "
                "(split the request, or start the service with a larger --max-candidates)"
            )
        if self.encoder is None:
            return self._encode_raw(context, candidates)
        try:  # the context is checked and encoded once, shared by every candidate
            dense, sparse = self.encoder.transform_records(
                candidates, strict=True, shared=context, shared_name="context"
            )
        except ValueError as err:
            message = str(err).replace("records[", "candidates[")
            if "missing feature" in message:
                message += " (give it in the context or in every candidate)"
            if "is also in context" in message:
                message = message.replace(
                    "is also in context", "is also in the context; give each feature in one place"
                )
            raise RequestError(_name_huge_integer(context, candidates) or message) from None
        except (OverflowError, TypeError, ArithmeticError) as err:
            raise RequestError(
                _name_huge_integer(context, candidates) or f"candidates: a value cannot be encoded ({err})"
            ) from None
        return dense, sparse

    def _encode_raw(self, context: dict[str, Any], candidates: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        if context:
            raise RequestError(
                "context: this model has no encoders.json, so features are given per candidate as "
                '{"dense": [...], "sparse": [...]}; leave the context empty'
            )
        num_dense, vocab = self.model.num_dense, self.vocab_sizes
        dense = np.empty((len(candidates), num_dense), dtype=np.float32)
        sparse = np.empty((len(candidates), len(vocab)), dtype=np.int64)
        for i, candidate in enumerate(candidates):
            unknown = sorted(set(candidate) - {"dense", "sparse"})
            if unknown:
                raise RequestError(f"candidates[{i}]: unknown key {unknown[0]!r}; expected 'dense' and 'sparse'")
            values = candidate.get("dense", [] if num_dense == 0 else None)
            if not isinstance(values, list) or len(values) != num_dense:
                raise RequestError(
                    f"candidates[{i}].dense: expected a list of {num_dense} numbers, got {values!r}"[:300]
                )
            for j, value in enumerate(values):
                if not _is_number(value) or not math.isfinite(value):
                    raise RequestError(f"candidates[{i}].dense[{j}]: expected a finite number, got {value!r}")
            dense[i] = values
            ids = candidate.get("sparse", [] if not vocab else None)
            if not isinstance(ids, list) or len(ids) != len(vocab):
                raise RequestError(
                    f"candidates[{i}].sparse: expected a list of {len(vocab)} integer ids, got {ids!r}"[:300]
                )
            for j, value in enumerate(ids):
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab[j]:
                    raise RequestError(
                        f"candidates[{i}].sparse[{j}]: expected an integer id in [0, {vocab[j]}), got {value!r}"
                    )
            sparse[i] = ids
        return dense, sparse

    # ------------------------------------------------------------------------------------------ scoring

    def score(self, request: ScoreRequest) -> ScoreResponse:
        blend, source = self.blend, "service"
        context = request.context
        try:
            if request.blend is not None:
                blend, source = Blend.from_dict(request.blend.model_dump(), self.task_names), "request"
            elif self.learned is not None:
                blend, source = Blend("weighted_sum", self.learned.weights(context)), "learned"
        except ValueError as err:
            raise RequestError(str(err)) from None
        if self.learned_only:
            context = {k: v for k, v in context.items() if k not in self.learned_only}
        dense, sparse = self.encode(context, request.candidates)
        if not np.isfinite(dense).all():
            row = int(np.flatnonzero(~np.isfinite(dense).all(1))[0])
            raise RequestError(f"candidates[{row}]: a numeric feature is not finite after encoding")
        scores = self.batcher(dense, sparse)  # (N, K)
        blended = blend.apply(scores, self.task_names)
        if not (np.isfinite(scores).all() and np.isfinite(blended).all()):
            bad = int(np.flatnonzero(~(np.isfinite(scores).all(1) & np.isfinite(blended)))[0])
            raise RequestError(
                f"candidates[{bad}]: the scores are not finite (numeric features far outside the training range?)"
            )
        order = ranking(blended)
        if request.top_k is not None:
            order = order[: request.top_k]
        return ScoreResponse(
            tasks=self.task_names,
            scores=[dict(zip(self.task_names, row)) for row in scores.tolist()],
            blended=blended.tolist(),
            ranking=order,
            blend={**blend.to_dict(), "source": source},
        )


def _name_huge_integer(context: dict[str, Any], candidates: list[dict[str, Any]]) -> str | None:
    """The first integer outside int64 (JSON allows any size), as an error message naming where it is."""
    for where, record in (("context", context), *((f"candidates[{i}]", c) for i, c in enumerate(candidates))):
        for name, value in record.items() if isinstance(record, dict) else ():
            if isinstance(value, int) and not -(2**63) <= value < 2**63:
                return f"{where}: feature {name!r} is an integer outside the 64-bit range"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------- HTTP


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


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    text = ""
    for part in parts:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text or "body"


def create_app(service: ScoringService, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, warm_up: bool = True) -> FastAPI:
    """The FastAPI app of ``service``. It is ready (``/readyz`` 200) once the warm-up pass has run."""
    registry = CollectorRegistry()
    requests_total = Counter("mtrank_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram(
        "mtrank_request_seconds",
        "scoring latency (seconds)",
        ["endpoint"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    )
    candidates_hist = Histogram(
        "mtrank_candidates_per_request",
        "candidates per scoring request",
        registry=registry,
        buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
    )
    candidates_total = Counter("mtrank_candidates_scored_total", "candidates scored", registry=registry)

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

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": _location(tuple(e.get("loc", ()))), "msg": e.get("msg", "")} for e in exc.errors()]
        first = details[0] if details else {"loc": "body", "msg": "invalid request"}
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            first = {
                "loc": "body",
                "msg": "malformed JSON: " + str(exc.errors()[0].get("ctx", {}).get("error", "")),
            }
        requests_total.labels(request.url.path, "422").inc()
        return JSONResponse({"error": f"{first['loc']}: {first['msg']}", "detail": details}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "request body: cannot be parsed as JSON (too deeply nested?)"
        requests_total.labels(request.url.path, str(exc.status_code)).inc()
        return JSONResponse({"error": message, "detail": []}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        requests_total.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse({"error": str(exc), "detail": []}, status_code=exc.status)

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses={413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
        summary="Score candidates: per-task scores, blended score and ranking",
    )
    def score(body: ScoreRequest) -> ScoreResponse:
        started = time.perf_counter()
        response = service.score(body)
        latency.labels("/v1/score").observe(time.perf_counter() - started)
        candidates_hist.observe(len(body.candidates))
        candidates_total.inc(len(body.candidates))
        requests_total.labels("/v1/score", "200").inc()
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
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    return app
