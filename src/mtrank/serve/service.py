"""The scoring service without HTTP: a model directory loaded once, requests scored, blended and ranked.

:func:`mtrank.serve.app.create_app` puts it behind FastAPI; benchmarks and tests call it directly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from mtrank.artifacts import open_model_dir
from mtrank.blend.learned import LEARNED_BLEND_FILE, ServedLearnedBlend
from mtrank.blend.rules import BLEND_FILE, Blend, ranking
from mtrank.export.common import random_inputs
from mtrank.export.model_dir import AOTI_FILE
from mtrank.serve.backends import Scorer, check_backend
from mtrank.serve.batching import Coalescer, CoalescingScorer, forward_many
from mtrank.serve.limits import DEFAULT_MAX_CANDIDATES
from mtrank.serve.requests import FeatureRequests, RawRequests, RequestError
from mtrank.serve.schemas import ScoreRequest, ScoreResponse

log = logging.getLogger(__name__)
UNSEEN_WARN_SHARE = 0.5  # a request whose candidates are mostly unseen in a categorical feature is logged


class ScoringService:
    """Loads a model directory (:func:`mtrank.artifacts.open_model_dir`) and scores requests.

    A request's candidates are encoded (:mod:`mtrank.serve.requests`) into ``dense [N, F_dense]`` and
    ``sparse [N, F_cat]``, scored (``scores [N, K]``, concurrent requests sharing a forward pass), blended
    into one score per candidate (``[N]``) and ranked.

    Args:
        model_dir: ``model.safetensors`` + ``config.json`` (+ ``encoders.json``, ``blend.json``,
            ``learned_blend.json`` when present).
        backend / precision / threads: see :class:`mtrank.serve.backends.Scorer`.
        max_candidates: most candidates per request.
        blend: the default blend; else the learned blend (``MODEL_DIR/learned_blend.json``: task weights
            computed per request from context fields, :mod:`mtrank.blend.learned`) unless
            ``learned_blend=False``; else ``MODEL_DIR/blend.json``; else equal weights. A request's own
            ``blend`` overrides all of them.
        start: build the scorer now; ``False`` leaves it to :meth:`start` (a server that forks worker processes
            loads the directory once, then each worker starts its own scorer: onnxruntime sessions and OpenMP
            thread pools do not survive a fork).
        batch_encoding: concurrent requests are encoded together, then scored together (default); ``False``: each
            request is encoded in its own thread and only the forward pass is shared (the old path, measured
            against in docs/serving.md).

    Example:
        >>> import tempfile
        >>> from mtrank import ModelConfig, MultiTaskModel
        >>> from mtrank.artifacts import save_model
        >>> with tempfile.TemporaryDirectory() as tmp:  # the service keeps what it needs in memory
        ...     service = ScoringService(save_model(MultiTaskModel(ModelConfig(inputs={"num_dense": 2})), tmp), "eager")
        >>> response = service.score(ScoreRequest(candidates=[{"dense": [0.1, 0.2]}, {"dense": [3.0, -1.0]}]))
        >>> response.tasks, len(response.scores), sorted(response.ranking)
        (['task1', 'task2'], 2, [0, 1])
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
        start: bool = True,
        batch_encoding: bool = True,
    ) -> None:
        loaded = open_model_dir(model_dir)
        self.model_dir, self.model, self.meta, self.encoder = loaded.path, loaded.model, loaded.meta, loaded.encoder
        self.task_names = self.model.task_names
        if self.encoder is None:
            self.requests = RawRequests(self.model.num_dense, self.model.vocab_sizes)
        else:
            self.requests = FeatureRequests(self.encoder)
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
        self.backend, self.precision, self.threads = check_backend(backend, precision), precision, threads
        self.max_candidates, self.batch_encoding = max_candidates, batch_encoding
        self.scorer: Scorer | None = None
        self.batcher: CoalescingScorer | None = None
        self.coalescer: Coalescer | None = None
        if start:
            self.start()
        self.ready = False
        self.not_ready = "warming up"  # why /readyz is 503

    def start(self, threads: int | None = None) -> None:
        """Build the scorer (``threads``: onnxruntime intra-op threads, default the constructor's) and the batcher:
        one forward pass at a time (the model already uses every core), concurrent requests share a pass."""
        self.threads = self.threads if threads is None else threads
        package = self.model_dir / "export" / AOTI_FILE  # from `mtrank export --format aoti`, verified at load
        package = package if self.backend == "aoti" and package.is_file() else None
        self.scorer = Scorer(self.model, self.backend, self.precision, threads=self.threads, package=package)
        max_rows = max(4096, self.max_candidates)
        self.batcher = CoalescingScorer(self.scorer, max_rows=max_rows)  # (dense, sparse) -> scores
        # requests: checked one by one, then encoded and scored together (one encoding pass, one forward pass)
        self.coalescer = Coalescer(self._encode_and_score, rows=self.requests.rows, max_rows=max_rows)

    def example_request(self) -> dict[str, Any]:
        """A valid request for this model (the OpenAPI example and the warm-up request)."""
        return self.requests.example()

    def warm_up(self) -> None:
        """Forward passes of a one-candidate and a full request (compilation, allocator, kernel caches), the
        encoders' lookup tables, then :meth:`example_request` scored end to end; ready only if every warm-up
        score is finite (a model with a non-finite weight never reports ready)."""
        if self.encoder is not None:
            self.encoder.prepare_lookups()
        for batch in (1, min(self.max_candidates, 1000)):
            dense, sparse = random_inputs(self.model, batch)
            if not np.isfinite(self.batcher(dense.numpy(), sparse.numpy())).all():
                self.not_ready = f"warm-up: {batch} random candidates gave non-finite scores; check the model weights"
                log.error("%s: %s", self.model_dir, self.not_ready)
                return
        try:
            self.score(ScoreRequest.model_validate(self.example_request()))
        except RequestError as err:
            self.not_ready = f"warm-up request refused: {err}"
            log.error("%s: %s", self.model_dir, self.not_ready)
            return
        self.ready, self.not_ready = True, ""

    def describe(self) -> dict[str, Any]:
        """What ``/readyz`` reports: tasks, backend, the request features, limits, the process, batching and the
        blend."""
        if self.encoder is not None:
            features: Any = self.encoder.input_columns
        else:
            features = {"dense": self.model.num_dense, "sparse": self.model.vocab_sizes}
        if self.learned is None:
            blend = self.blend.to_dict()
        else:
            blend = {"learned": True, "context_features": self.learned.context_features, "tasks": self.learned.tasks}
        return {
            "tasks": self.task_names,
            "backend": f"{self.backend}/{self.precision}",
            "features": features,
            "max_candidates": self.max_candidates,
            "pid": os.getpid(),  # which worker answered (mtrank serve --workers N)
            "forward_passes": self.coalescer.batches + self.batcher.batches,
            "requests_per_pass": (self.coalescer.calls + self.batcher.calls)
            / max(self.coalescer.batches + self.batcher.batches, 1),
            "blend": blend,
        }

    def encode(self, context: dict[str, Any], candidates: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """A request's features -> ``(dense float32 [N, F_dense], sparse int64 [N, F_cat])``; a
        :class:`RequestError` names what is wrong."""
        self._check_count(candidates)
        return self.requests(context, candidates)

    def _check_count(self, candidates: list[Any]) -> None:
        if len(candidates) > self.max_candidates:
            raise RequestError(
                f"candidates: {len(candidates)} candidates; at most {self.max_candidates} per request "
                "(split the request, or start the service with a larger --max-candidates)"
            )

    def _encode_many(self, prepared: list[Any]) -> list[tuple[np.ndarray, np.ndarray] | RequestError]:
        """Prepared requests (``self.requests.prepare``) -> ``(dense, sparse)`` each in one encoding pass, or the
        :class:`RequestError` of that request alone."""
        results: list[Any] = self.requests.encode_many(prepared)
        for i, encoded in enumerate(results):
            if not isinstance(encoded, RequestError) and not np.isfinite(encoded[0]).all():
                row = int(np.flatnonzero(~np.isfinite(encoded[0]).all(1))[0])
                results[i] = RequestError(f"candidates[{row}]: a numeric feature is not finite after encoding")
        return results

    def _encode_and_score(self, prepared: list[Any]) -> list[tuple[np.ndarray, np.ndarray] | RequestError]:
        """Prepared requests -> ``(sparse [n_i, F_cat], scores [n_i, K])`` each, or the request's error: one
        encoding pass, one forward pass for all of them."""
        results: list[Any] = self._encode_many(prepared)
        good = [i for i, encoded in enumerate(results) if not isinstance(encoded, RequestError)]
        for i, scores in zip(good, forward_many(self.scorer, [results[i] for i in good])):
            results[i] = (results[i][1], scores)
        return results

    def score(self, request: ScoreRequest) -> ScoreResponse:
        """Per-task scores ``[N, K]``, the blended score ``[N]`` and the ranking of a request's candidates."""
        return ScoreResponse(**self.answer(request))

    def answer(self, request: ScoreRequest) -> dict[str, Any]:
        """:meth:`score` as plain lists and dicts (the fields of :class:`ScoreResponse`), for a fast encoder."""
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
        self._check_count(request.candidates)
        prepared = self.requests.prepare(context, request.candidates)
        if self.batch_encoding:
            sparse, scores = self.coalescer(prepared)  # (N, F_cat), (N, K)
        else:  # the old path: encoded in the request's own thread, only the forward pass shared
            encoded = self._encode_many([prepared])[0]
            if isinstance(encoded, RequestError):
                raise encoded
            sparse, scores = encoded[1], self.batcher(*encoded)
        try:
            blended = blend.apply(scores, self.task_names)  # (N,)
        except ValueError as err:  # e.g. weighted_product of negative transformed scores
            raise RequestError(str(err)) from None
        if not (np.isfinite(scores).all() and np.isfinite(blended).all()):
            bad = int(np.flatnonzero(~(np.isfinite(scores).all(1) & np.isfinite(blended)))[0])
            raise RequestError(
                f"candidates[{bad}]: the scores are not finite (numeric features far outside the training range?)"
            )
        unseen = self.requests.unseen(sparse)
        for feature, count in unseen.items():
            if count >= UNSEEN_WARN_SHARE * len(request.candidates):
                log.warning(
                    "request: %d of %d candidates have a value of %r unseen in training (scored as unknown); "
                    "check the feature's spelling and spacing against the training data",
                    count,
                    len(request.candidates),
                    feature,
                )
        order = ranking(blended)
        if request.top_k is not None:
            order = order[: request.top_k]
        return {
            "tasks": self.task_names,
            "scores": [dict(zip(self.task_names, row)) for row in scores.tolist()],
            "blended": blended.tolist(),
            "ranking": order,
            "blend": {**blend.to_dict(), "source": source},
            "unseen": unseen,
        }
