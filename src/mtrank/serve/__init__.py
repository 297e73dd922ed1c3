"""Serving: export (TorchScript, ONNX), reduced-precision scorers, blending of task scores, the HTTP service.

Modules: ``export`` (files + onnxruntime runner), ``precision`` (bf16 / mixed / fp16 / int8 models),
``backends`` (:class:`Scorer`, one call over every path), ``blend`` (weighted sum / product, tuning),
``learned_blend`` (per-request weights), ``app`` (FastAPI service), ``cli`` (``mtrank export | serve |
blend``). The heavy dependencies (onnxruntime, FastAPI) are imported by the modules that need them.
"""
