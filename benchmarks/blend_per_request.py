"""Blend tuning vs serving under per-request score shifts: is each request's top candidate the same when the blend
is computed over a tuning file of many requests as when the service blends that request alone?

    python benchmarks/blend_per_request.py [--requests 500] [--candidates 20] [--seed 0]

Two tasks (click, like) for R requests of C candidates; every request shifts all its candidates' logits by its own
offsets (a user who clicks a lot, a context where nothing is liked), so scores are comparable within a request
but not across requests. Blends: ``weighted_sum`` of ``rank`` transforms, and of ``standardize`` transforms, each
with equal weights and with the weights ``tune_blend`` picks (reward@1 on the same file). The service blends
one request: ``blend.apply(scores of its candidates)``. Tuning computes the blend over the whole file, with the
transform over every row of the file (``request_ids=None``: what mtrank did before) or within each request
(``request_ids``: now). The table counts the requests whose top candidate differs from the service's.
"""

from __future__ import annotations

import argparse

import numpy as np

from mtrank.blend.rules import Blend
from mtrank.blend.tuning import Objective, tune_blend

TASKS = ["click", "like"]


def shifted_requests(requests: int, candidates: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``scores [N, 2]`` (probabilities), ``labels [N, 2]`` and ``request_ids [N]`` with per-request logit shifts."""
    rng = np.random.default_rng(seed)
    request_ids = np.repeat(np.arange(requests), candidates)
    shift = rng.normal(0.0, 2.0, size=(requests, 2))[request_ids]  # (N, 2): one offset per request and task
    logits = rng.normal(0.0, 1.0, size=(len(request_ids), 2)) + shift
    scores = 1 / (1 + np.exp(-logits))
    labels = (rng.uniform(size=scores.shape) < scores).astype(np.float64)
    return scores, labels, request_ids


def top_disagreements(blend: Blend, scores: np.ndarray, request_ids: np.ndarray, per_request: bool) -> int:
    """Requests whose top candidate under the tuning computation differs from the service's."""
    tuned = blend.apply(scores, TASKS, request_ids if per_request else None)
    differ = 0
    for request in np.unique(request_ids):
        rows = np.flatnonzero(request_ids == request)
        served = blend.apply(scores[rows], TASKS)  # what the service computes for this request
        differ += int(np.argmax(tuned[rows]) != np.argmax(served))
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scores, labels, request_ids = shifted_requests(args.requests, args.candidates, args.seed)
    print(
        f"{args.requests} requests x {args.candidates} candidates, per-request logit shifts N(0, 2^2), seed {args.seed}"
    )
    print("requests whose top candidate differs between tuning and serving:")
    print(f"{'transform':<12} {'weights':<26} {'whole file (before)':>20} {'per request (now)':>18}")
    for kind in ("rank", "standardize"):
        transforms = dict.fromkeys(TASKS, kind)
        objective = Objective("reward@k", request_ids=request_ids, top_k=1)
        tuned = tune_blend(scores, labels, TASKS, objective, transforms=transforms, step=0.05).blend
        for label, blend in (("equal", Blend("weighted_sum", dict.fromkeys(TASKS, 1.0), transforms)), ("tuned", tuned)):
            weights = label + " " + ", ".join(f"{k}={v:.2f}" for k, v in blend.weights.items())
            before = top_disagreements(blend, scores, request_ids, per_request=False)
            now = top_disagreements(blend, scores, request_ids, per_request=True)
            print(f"{kind:<12} {weights:<26} {before:>14} / {args.requests} {now:>12} / {args.requests}")


if __name__ == "__main__":
    main()
