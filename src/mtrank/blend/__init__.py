"""Blending task scores into one ranking score: ``rules`` (weighted sum / product, transforms, ranking),
``tuning`` (objectives, the simplex grid, :func:`~mtrank.blend.tuning.tune_blend`), ``learned`` (per-request
weights from request features)."""
