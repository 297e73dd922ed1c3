"""Serving: the scoring service of a model directory.

=============  ==============================================================================================
``requests``   a request's features checked and encoded into ``(dense, sparse)``; errors that name the fix
``service``    :class:`~mtrank.serve.service.ScoringService`: load, encode, score, blend, rank (no HTTP)
``app``        the FastAPI app over a service: middleware, error answers, Prometheus metrics
``backends``   :class:`~mtrank.serve.backends.Scorer`: eager / compile / TorchScript / onnxruntime x precision
``batching``   concurrent requests share one forward pass
``schemas``    request and response bodies (the OpenAPI schema); ``limits``: default limits
=============  ==============================================================================================

Export formats and reduced precision live in :mod:`mtrank.export`, blending in :mod:`mtrank.blend`. The heavy
dependencies (onnxruntime, FastAPI) are imported by the modules that need them.
"""
