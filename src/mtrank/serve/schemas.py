"""Request and response bodies of the scoring service (pydantic models; they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

NUMERIC_POLICY = (
    "Numeric features must be finite JSON numbers (or null for a missing value, which is filled as in training): "
    "NaN, Infinity, -Infinity, an overflowing literal such as 1e400, and a value that overflows once standardised "
    "(such as 1e308) are all refused with 422 naming the candidate and the feature."
)


class BlendSpec(BaseModel):
    """A per-request blend (overrides the model's ``blend.json``)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field("weighted_sum", description="weighted_sum or weighted_product")
    weights: dict[str, float] = Field(..., description="weight of each task, by task name")
    transforms: dict[str, str] = Field(
        default_factory=dict,
        description="identity, log, logit, sigmoid, log1p, rank or standardize, by task name (per request)",
    )


class ScoreRequest(BaseModel):
    """Candidates to score for one request.

    With a model directory that has ``encoders.json``, features are raw values by feature name; the context's
    features are shared by every candidate (a feature must be in the context or in the candidates, not both).
    Without encoders, each candidate is ``{"dense": [F_dense numbers], "sparse": [F_cat integer ids]}`` and
    the context is empty.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"description": "Candidates to score for one request. " + NUMERIC_POLICY},
    )

    context: dict[str, Any] = Field(default_factory=dict, description="features shared by every candidate")
    candidates: list[dict[str, Any]] = Field(..., min_length=1, description="one feature object per candidate")
    blend: BlendSpec | None = Field(None, description="override the service's blend for this request")
    top_k: int | None = Field(None, ge=1, description="return only the best k indices in `ranking`")


class ScoreResponse(BaseModel):
    """Scores in the order of the request's candidates, and the ranking (candidate indices, best first)."""

    tasks: list[str] = Field(..., description="task names, the keys of each `scores` entry")
    scores: list[dict[str, float]] = Field(..., description="per-task scores of each candidate")
    blended: list[float] = Field(..., description="the blended ranking score of each candidate")
    ranking: list[int] = Field(..., description="candidate indices by blended score, best first")
    blend: dict[str, Any] = Field(..., description="the blend that was applied")
    unseen: dict[str, int] = Field(
        default_factory=dict,
        description="candidates per categorical feature whose value was not in the training vocabulary (non-zero only)",
    )


class ErrorResponse(BaseModel):
    """A 4xx answer: what is wrong and where."""

    error: str
    detail: list[dict[str, Any]] = Field(default_factory=list)
