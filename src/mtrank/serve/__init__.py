"""Serving: the scoring service (request validation, scoring without HTTP, the FastAPI app, backends, batching).

Export formats and reduced precision live in :mod:`mtrank.export`, blending in :mod:`mtrank.blend`. The heavy
dependencies (onnxruntime, FastAPI) are imported by the modules that need them.
"""
