"""Study 7, blending task scores into one ranking score, measured on held-out requests: YouTube's tuned
weighted-product blend (Zhao et al. RecSys 2019, section 4) and Pinterest Closeup's learned blend ("learned
utility": per-request weights from request features), beside the baselines.

Data: :mod:`mtrank.experiments.preference` with three tasks and three user groups that value them differently.
Each candidate has true task probabilities ``r [K]``; the ranker's scores are ``sigmoid(logit(r) + e)``,
``e ~ N(0, score_noise^2)`` (a ranker that is right on average, not exactly); the true utility of a candidate for
a user of group ``g`` is its engagement probability ``sigmoid(bias + sharpness * a_g . r)``. The logs are the
simulator's impressions under randomised blend weights (``shown`` items per request, engaged or not, reward).

The requests of a seed are split **by request**: a ``tune_fraction`` share tunes or trains every blend (its logs:
the shown impressions with their engagement, reward and per-task labels drawn from ``r``); the rest are held out.
Every blend ranks with the service's code: :meth:`mtrank.blend.rules.Blend.apply` with the rows' request ids
(per-request transforms within each request, as the service computes them for one request), and the learned
blend through :class:`~mtrank.blend.learned.ServedLearnedBlend` ``.weights(context)`` once per request, then a
weighted sum, as ``ScoringService`` does.

Arms: each single task; equal-weight sum and product; weights tuned on the tuning logs' reward@1 (grid over the
simplex, :func:`mtrank.blend.tuning.tune_blend`) for a weighted sum, a weighted product (YouTube's) and a weighted
sum of per-request ranks; a weighted sum tuned on the sum of task AUCs (``mtrank blend tune``'s default
objective); the learned blend, pulled toward the production weights (the tuned sum's) with Closeup's L2 pull 2 and
with the pull chosen on a validation share of the tuning requests; the true
per-group weights on the ranker's scores (an oracle that knows ``a_g``).

Metrics on the held-out requests: NDCG@k of the blended order (gains: true utility, all candidates), expected
reward of the top candidate, and each task's AUC of the one blended score against labels drawn from ``r`` for
every candidate. The same NDCG on the tuning requests is reported as the in-sample number.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import ndcg_score, roc_auc_score

from mtrank.blend.learned import LearnedBlendConfig, ServedLearnedBlend, train_learned_blend
from mtrank.blend.rules import Blend
from mtrank.blend.tuning import Objective, tune_blend
from mtrank.evaluate.report import _pyplot
from mtrank.experiments.preference import PreferenceData, make_preference_logs
from mtrank.experiments.studies.runner import Metric, Study

TASKS = ("click", "save", "share")
SINGLE = tuple(f"single task: {t}" for t in TASKS)
EQUAL_SUM, EQUAL_PRODUCT = "equal-weight sum", "equal-weight product"
TUNED_SUM, TUNED_PRODUCT = "tuned sum", "tuned product (YouTube)"
TUNED_RANK, TUNED_AUC = "tuned sum of ranks", "tuned sum, AUC objective"
LEARNED, LEARNED_CLOSEUP = "learned blend (pull chosen)", "learned blend (pull 2, Closeup's)"
ORACLE = "oracle: true group weights"
ARMS = (
    *SINGLE,
    EQUAL_SUM,
    EQUAL_PRODUCT,
    TUNED_SUM,
    TUNED_PRODUCT,
    TUNED_RANK,
    TUNED_AUC,
    LEARNED_CLOSEUP,
    LEARNED,
    ORACLE,
)
CLOSEUP_PULL = 2.0  # lambda of Closeup's L2 prior toward the production weights
# arm -> (method, transform, objective) of the global blends tuned on the tuning logs
TUNED = {
    TUNED_SUM: ("weighted_sum", "identity", "reward@1"),
    TUNED_PRODUCT: ("weighted_product", "identity", "reward@1"),
    TUNED_RANK: ("weighted_sum", "rank", "reward@1"),
    TUNED_AUC: ("weighted_sum", "identity", "auc"),
}


@dataclass(frozen=True)
class BlendingSetting:
    """Sizes of the study (``quick``: seconds, for the tests)."""

    requests: int = 8000
    candidates: int = 20
    shown: int = 3
    preference: tuple[tuple[float, ...], ...] = ((1.0, 0.5, 0.0), (0.2, 1.0, 0.2), (0.6, 0.0, 1.0))
    score_noise: float = 0.5
    tune_fraction: float = 0.5
    valid_fraction: float = 0.2  # of the tuning requests: chooses the learned blend's L2 pull
    grid_step: float = 0.05
    l2_pulls: tuple[float, ...] = (0.0, 0.1, 0.5, 2.0)
    epochs: int = 20
    ndcg_at: int = 5

    @classmethod
    def quick(cls) -> BlendingSetting:
        return cls(requests=600, grid_step=0.25, l2_pulls=(0.0, 2.0), epochs=2)


def setting(quick: bool) -> BlendingSetting:
    return BlendingSetting.quick() if quick else BlendingSetting()


def arms(s: BlendingSetting) -> list[str]:
    return list(ARMS)


def comparisons(s: BlendingSetting) -> list[tuple[str, str]]:
    return [
        (TUNED_SUM, EQUAL_SUM),
        (TUNED_PRODUCT, EQUAL_PRODUCT),
        (TUNED_PRODUCT, TUNED_SUM),
        (TUNED_SUM, TUNED_AUC),
        (LEARNED_CLOSEUP, TUNED_SUM),
        (LEARNED, TUNED_SUM),
        (LEARNED, TUNED_PRODUCT),
        (ORACLE, LEARNED),
    ]


@dataclass
class Split:
    """One share of a seed's requests: what a blend sees (ranker scores, context, logs) and the truth."""

    data: PreferenceData  # the requests of this share; ``scores`` = true task probabilities r [R, C, K]
    served: np.ndarray  # [R, C, K] the ranker's scores
    labels: np.ndarray  # [R, C, K] per-task labels drawn from r (every candidate)
    request_index: np.ndarray  # [R] the requests' numbers among the seed's requests

    @property
    def requests(self) -> int:
        return self.served.shape[0]

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """The ranker's scores of every candidate ``[R * C, K]`` and its request id ``[R * C]``."""
        r, c, k = self.served.shape
        return self.served.reshape(r * c, k), np.repeat(np.arange(r), c)

    def logs(self) -> tuple[np.ndarray, ...]:
        """The shown impressions: context ``[N, F]``, ranker scores ``[N, K]``, per-task labels ``[N, K]``,
        engaged ``[N]``, reward ``[N]``, request id ``[N]`` (``N = R * shown``), in request order."""
        shown = self.data.shown.numpy()  # (R, S)
        rows = np.arange(self.requests)[:, None]
        context = np.repeat(self.data.context.numpy(), shown.shape[1], axis=0)
        k = self.served.shape[-1]
        scores = self.served[rows, shown].reshape(-1, k)
        labels = self.labels[rows, shown].reshape(-1, k)
        request = np.repeat(np.arange(self.requests), shown.shape[1])
        return (
            context,
            scores,
            labels,
            self.data.engaged.numpy().reshape(-1),
            self.data.reward.numpy().reshape(-1),
            request,
        )


def _take(data: PreferenceData, index: np.ndarray) -> PreferenceData:
    """The requests ``index`` of ``data``."""
    idx = torch.from_numpy(index)
    per_request = ("context", "group", "scores", "shown", "engaged", "reward")
    fields = {name: getattr(data, name)[idx] for name in per_request}
    return PreferenceData(**fields, preference=data.preference, sharpness=data.sharpness, bias=data.bias)


@functools.lru_cache(maxsize=4)
def simulate(s: BlendingSetting, seed: int) -> dict[str, Split]:
    """The seed's requests split by request: ``tuning`` (= ``train`` + ``valid``, the learned blend's
    validation share) and ``held_out``."""
    data = make_preference_logs(
        requests=s.requests,
        candidates=s.candidates,
        shown=s.shown,
        preference=[list(row) for row in s.preference],
        seed=seed,
    )
    rng = np.random.default_rng([seed, 7])
    truth = data.scores.double().numpy()  # (R, C, K)
    logit = np.log(truth) - np.log1p(-truth)
    served = 1 / (1 + np.exp(-(logit + s.score_noise * rng.normal(size=truth.shape))))
    labels = (rng.random(truth.shape) < truth).astype(np.float64)
    order = rng.permutation(s.requests)
    tune = int(round(s.tune_fraction * s.requests))
    valid = int(round(s.valid_fraction * tune))
    parts = {"train": order[valid:tune], "valid": order[:valid], "tuning": order[:tune], "held_out": order[tune:]}
    splits = {}
    for name, index in parts.items():
        index = np.sort(index)
        splits[name] = Split(_take(data, index), served[index], labels[index], index)
    return splits


def tuned_blend(arm: str, tuning: Split, s: BlendingSetting) -> Blend:
    """The global blend of a tuned arm: grid over the simplex on the tuning logs (:func:`tune_blend`)."""
    method, kind, objective_name = TUNED[arm]
    _, scores, labels, _, reward, request = tuning.logs()
    if objective_name == "auc":
        objective = Objective("auc")
    else:
        objective = Objective("reward@k", request_ids=request, top_k=1, row_value=reward)
    transforms = dict.fromkeys(TASKS, kind)
    result = tune_blend(
        scores, labels, list(TASKS), objective, method, transforms, step=s.grid_step, request_ids=request
    )
    return result.blend


def learned_blend(
    splits: dict[str, Split], s: BlendingSetting, seed: int, pulls: tuple[float, ...]
) -> tuple[ServedLearnedBlend, float]:
    """Closeup's learned blend trained on the ``train`` logs, pulled toward the production weights (the tuned sum's,
    tuned on all tuning logs), its L2 pull among ``pulls`` chosen by the ``valid`` logs' reward@1 (ranked through
    the served path); returns the served blend and the pull."""
    production = tuned_blend(TUNED_SUM, splits["tuning"], s).weights
    train, valid = splits["train"], splits["valid"]
    context, scores, _, engaged, reward, _ = train.logs()
    features = [f"x{i}" for i in range(context.shape[1])]
    v_context, v_scores, v_labels, _, v_reward, v_request = valid.logs()
    objective = Objective("reward@k", request_ids=v_request, top_k=1, row_value=v_reward)
    candidates = []
    for pull in pulls:
        model, _ = train_learned_blend(
            *(torch.from_numpy(a).float() for a in (context, scores, engaged, reward)),
            [production[task] for task in TASKS],
            LearnedBlendConfig(l2_pull=pull, epochs=s.epochs, seed=seed),
        )
        served = ServedLearnedBlend(model, features, list(TASKS))
        blended = served_scores(served, v_context, v_scores, v_request)
        candidates.append((objective(blended, v_labels, list(TASKS)), pull, served))
    _, pull, served = max(candidates, key=lambda c: c[0])
    return served, pull


def served_scores(
    blend: ServedLearnedBlend, context: np.ndarray, scores: np.ndarray, request: np.ndarray
) -> np.ndarray:
    """The service's path for a learned blend: per request, ``weights(context)`` once, then a weighted sum of
    that request's candidates (``Blend.apply`` of one request)."""
    blended = np.empty(len(scores))
    starts = np.flatnonzero(np.r_[True, request[1:] != request[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(request)]):
        row = dict(zip(blend.context_features, context[start].tolist()))
        blended[start:stop] = Blend("weighted_sum", blend.weights(row)).apply(scores[start:stop], list(TASKS))
    return blended


def arm_scores(arm: str, split: Split, s: BlendingSetting, blend: Blend | ServedLearnedBlend | None) -> np.ndarray:
    """Blended score of every candidate of ``split`` ``[R, C]`` under ``arm``."""
    scores, request = split.flat()
    if isinstance(blend, ServedLearnedBlend):
        context = np.repeat(split.data.context.numpy(), split.served.shape[1], axis=0)
        return served_scores(blend, context, scores, request).reshape(split.served.shape[:2])
    if arm == ORACLE:  # the true weights of each request's group, applied to the ranker's scores
        weights = split.data.preference[split.data.group].double().numpy()  # (R, K)
        return (split.served * weights[:, None, :]).sum(-1)
    return blend.apply(scores, list(TASKS), request).reshape(split.served.shape[:2])


def fixed_blend(arm: str) -> Blend | None:
    """The blend of an arm that needs no tuning (single task, equal weights); None for the others."""
    if arm in SINGLE:
        return Blend("weighted_sum", {TASKS[SINGLE.index(arm)]: 1.0})
    if arm in (EQUAL_SUM, EQUAL_PRODUCT):
        return Blend("weighted_sum" if arm == EQUAL_SUM else "weighted_product", dict.fromkeys(TASKS, 1.0))
    return None


def quality(blended: np.ndarray, split: Split, s: BlendingSetting) -> dict[str, float]:
    """NDCG@k against the true utility, expected reward of the top candidate, per-task AUC of the blend."""
    utility = split.data.engagement_probability().double().numpy()  # (R, C)
    metrics = {
        "ndcg": float(ndcg_score(utility, blended, k=s.ndcg_at)),
        "reward": split.data.expected_reward(torch.from_numpy(blended)),
    }
    for k, task in enumerate(TASKS):
        metrics[f"auc_{task}"] = float(roc_auc_score(split.labels[..., k].ravel(), blended.ravel()))
    return metrics


def run(s: BlendingSetting, arm: str, seed: int) -> dict:
    splits = simulate(s, seed)
    tuning, held_out = splits["tuning"], splits["held_out"]
    extra: dict = {}
    blend: Blend | ServedLearnedBlend | None = fixed_blend(arm)
    if arm in TUNED:
        blend = tuned_blend(arm, tuning, s)
        extra["weights"] = blend.weights
    elif arm in (LEARNED, LEARNED_CLOSEUP):
        pulls = s.l2_pulls if arm == LEARNED else (CLOSEUP_PULL,)
        blend, extra["l2_pull"] = learned_blend(splits, s, seed, pulls)
    metrics = quality(arm_scores(arm, held_out, s, blend), held_out, s)
    metrics["ndcg_in_sample"] = quality(arm_scores(arm, tuning, s, blend), tuning, s)["ndcg"]
    return {"metrics": metrics, **extra}


def figure(results: dict, path: Path) -> None:
    """Held-out NDCG@k per arm (every seed a dot, mean a bar) beside the in-sample NDCG@k on the tuning
    requests, and the per-task AUCs of each blend."""
    plt = _pyplot()
    arms_ = results["arms"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    x = np.arange(len(arms_))
    for offset, key, label in ((-0.18, "ndcg", "held-out"), (0.18, "ndcg_in_sample", "in-sample (tuning requests)")):
        values = np.asarray([[r["metrics"][key] for r in results["runs"][a]] for a in arms_])  # (A, seeds)
        axes[0].bar(x + offset, values.mean(1), width=0.34, alpha=0.6, label=label)
        axes[0].scatter(np.repeat(x + offset, values.shape[1]), values.ravel(), s=6, color="black")
    low = min(r["metrics"]["ndcg"] for runs in results["runs"].values() for r in runs)
    axes[0].set_ylim(low - 0.02, 1.0)
    axes[0].set_title("NDCG@k of the blended order vs true utility", fontsize=10)
    axes[0].legend(fontsize=7)
    for task in TASKS:
        values = np.asarray([[r["metrics"][f"auc_{task}"] for r in results["runs"][a]] for a in arms_])
        axes[1].plot(x, values.mean(1), marker="o", label=f"AUC {task}")
    axes[1].set_title("per-task AUC of the blended score (held-out)", fontsize=10)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(x, arms_, rotation=40, ha="right", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def notes(s: BlendingSetting) -> str:
    held = s.requests - int(round(s.tune_fraction * s.requests))
    return (
        f"Simulator `mtrank.experiments.preference`: {s.requests:,} requests of {s.candidates} candidates, 3 tasks "
        f"({', '.join(TASKS)}), 3 user groups valuing them {[list(p) for p in s.preference]}; ranker scores = true "
        f"task probabilities with logit noise {s.score_noise:g}; logs: {s.shown} impressions per request shown "
        f"under random Dirichlet(1) blend weights. Split by request: {s.requests - held:,} tuning requests "
        f"({s.valid_fraction:.0%} of them validate the learned blend's L2 pull among {list(s.l2_pulls)}), "
        f"{held:,} held-out requests. Tuned blends: grid step {s.grid_step:g} over the simplex on the tuning logs' "
        f"reward@1 (or the sum of task AUCs). Learned blend: {s.epochs} epochs, pulled toward the tuned sum's "
        "weights (the production blend). Metrics on the held-out requests "
        f"(every candidate): NDCG@{s.ndcg_at} against the true utility (engagement probability), expected reward "
        "of the top candidate, per-task AUC of the blended score against labels drawn from the true task "
        f"probabilities; `NDCG@{s.ndcg_at} in-sample`: the same on the tuning requests. Rankings computed with the "
        "service's code (`Blend.apply` per request; the learned blend's `ServedLearnedBlend.weights` once per "
        "request). CPU, torch threads 1."
    )


STUDY = Study(
    name="blending",
    title="Study 7: blending on held-out requests (YouTube's tuned weighted product, Closeup's learned blend)",
    setting=setting,
    arms=arms,
    comparisons=comparisons,
    metrics=[
        Metric("ndcg", "NDCG@k held-out"),
        Metric("ndcg_in_sample", "NDCG@k in-sample"),
        Metric("reward", "reward@1 held-out"),
        *(Metric(f"auc_{task}", f"AUC {task}") for task in TASKS),
    ],
    run=run,
    figure=figure,
    notes=notes,
)
