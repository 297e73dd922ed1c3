"""Study 5, score regularization and ranking stability (Pinterest Closeup): a retrained model is pulled toward
the production model's scores (``train.distill: score_l2``, ``mean((score - production score)^2)`` added to
the label loss with weight ``distill_weight``), so consecutive retrains rank the same candidates alike.

Also ``pointwise`` distillation toward the previous retrain (cross-entropy to its probabilities), the same
mechanism in logit space.

Retrains: census-income (income + marital); a fixed shuffle of the training file, retrain ``r`` trains on rows
``[r * shift, r * shift + window)`` (a shifted data window) with seed ``seed * 100 + r`` (a new seed). Retrain 0
is the same model in every arm; retrain ``r > 0`` of a regularised arm uses retrain ``r - 1`` of that arm as its
production model (its logits on the new window). Measured on the test rows between consecutive retrains, on the
main task (income): Kendall's tau of the scores, the mean absolute change of the scores, rank-biased overlap
(RBO, p = 0.9, extrapolated) of the top-``top_k`` candidates, and the test AUC of the retrains after the first
(mean over the two tasks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from mtrank.config import ModelConfig, TrainConfig
from mtrank.evaluate.metrics import predict_batches, task_metrics
from mtrank.evaluate.report import _pyplot
from mtrank.experiments.studies.gate_polarization import census_splits
from mtrank.experiments.studies.runner import Metric, Study
from mtrank.model import MultiTaskModel
from mtrank.train.trainer import Trainer


@dataclass(frozen=True)
class ScoreStabilitySetting:
    """Sizes of the study (``quick``: seconds, for the tests). ``regularizers``: ``(train.distill mode,
    distill_weight)`` toward the previous retrain, each compared with none (``score_l2``: Closeup's squared
    error of probabilities; ``pointwise``: cross-entropy to the previous model's probabilities, which also
    weighs the low-score tail in logit terms; ``pairwise``: score differences in logit space)."""

    census: str = ""  # the census-income folder; empty: $MTRANK_SHARED_DATA/census-income
    regularizers: tuple[tuple[str, float], ...] = (
        ("score_l2", 10.0),
        ("score_l2", 100.0),
        ("pointwise", 10.0),
        ("pairwise", 10.0),
    )
    retrains: int = 4
    window: int = 20_000
    shift: int = 10_000
    eval_rows: int = 10_000
    top_k: int = 200
    num_experts: int = 8
    expert_hidden: int = 32
    epochs: int = 2
    batch_size: int = 256
    lr: float = 2e-3
    device: str = "cpu"

    @classmethod
    def quick(cls) -> ScoreStabilitySetting:
        return cls(
            regularizers=(("score_l2", 10.0),),
            retrains=2,
            window=600,
            shift=300,
            eval_rows=400,
            top_k=20,
            num_experts=2,
            epochs=1,
        )


def setting(quick: bool) -> ScoreStabilitySetting:
    import dataclasses

    base = ScoreStabilitySetting.quick() if quick else ScoreStabilitySetting()
    folder = Path(os.environ.get("MTRANK_SHARED_DATA", "../shared/data")) / "census-income"
    return dataclasses.replace(base, census=base.census or str(folder))


NONE = "no regularization"


def arm_specs(s: ScoreStabilitySetting) -> dict[str, tuple[str, float]]:
    """``{arm name: (distill mode, weight)}``, the unregularised arm first."""
    return {NONE: ("none", 0.0), **{f"{mode} weight {weight:g}": (mode, weight) for mode, weight in s.regularizers}}


def arms(s: ScoreStabilitySetting) -> list[str]:
    return list(arm_specs(s))


def comparisons(s: ScoreStabilitySetting) -> list[tuple[str, str]]:
    return [(arm, NONE) for arm in arms(s)[1:]]


def rank_biased_overlap(a: np.ndarray, b: np.ndarray, p: float = 0.9) -> float:
    """Extrapolated rank-biased overlap (Webber, Moffat, Zobel 2010, eq. 32) of two rankings of equal length k
    (ids, best first): 1 = the same list, 0 = disjoint; the top weighs most (``p``).

    >>> same, disjoint = np.array([1, 2, 3]), np.array([4, 5, 6])
    >>> round(rank_biased_overlap(same, same), 6), rank_biased_overlap(same, disjoint)
    (1.0, 0.0)
    """
    k = len(a)
    seen_a, seen_b, overlap, total = set(), set(), 0, 0.0
    for d in range(1, k + 1):
        x, y = a[d - 1], b[d - 1]
        overlap += (x == y) + (x in seen_b) + (y in seen_a)
        seen_a.add(x)
        seen_b.add(y)
        total += overlap / d * p**d
    return float(overlap / k * p**k + (1 - p) / p * total)


def model_config(s: ScoreStabilitySetting, tasks, vocab, num_dense: int) -> ModelConfig:
    return ModelConfig(
        inputs={"num_dense": num_dense, "vocab_sizes": vocab, "embedding_dim": 4},
        tasks=list(tasks),
        block={"type": "mmoe", "num_experts": s.num_experts},
        experts={"hidden": [s.expert_hidden]},
        towers={"hidden": [8]},
    )


def run(s: ScoreStabilitySetting, arm: str, seed: int) -> dict:
    mode, weight = arm_specs(s)[arm]
    rows = s.window + (s.retrains - 1) * s.shift
    tasks, vocab, pool, _, test = census_splits(s.census, rows)
    test = test[: s.eval_rows]
    config = model_config(s, tasks, vocab, pool.dense.shape[1])
    previous, scores, aucs, objectives = None, [], [], []
    for r in range(s.retrains):
        window = pool[r * s.shift : r * s.shift + s.window]
        regularise = mode != "none" and previous is not None
        if regularise:
            window = window.with_teacher(predict_batches(previous, window)[0])
        train_config = TrainConfig(
            lr=s.lr,
            batch_size=s.batch_size,
            epochs=s.epochs,
            seed=seed * 100 + r,
            device=s.device,
            progress=False,
            distill=mode if regularise else "none",
            distill_weight=weight or 1.0,
        )
        model = MultiTaskModel(config, seed=seed * 100 + r)
        Trainer(model, train_config, callbacks=[]).fit(window)
        objectives.append(f"{train_config.distill} x {train_config.distill_weight:g}" if regularise else "labels")
        logits = predict_batches(model, test)[0]
        metrics = task_metrics(list(tasks), logits, test.labels)
        aucs.append(float(np.mean([metrics[f"auc/{t.name}"] for t in tasks])))
        scores.append(torch.sigmoid(logits[:, 0]).double().numpy())
        previous = model
    taus = [float(kendalltau(a, b)[0]) for a, b in zip(scores, scores[1:])]
    tops = [np.argsort(-v, kind="stable")[: s.top_k] for v in scores]
    rbos = [rank_biased_overlap(a, b) for a, b in zip(tops, tops[1:])]
    last_two = [v[:2000].round(5).tolist() for v in scores[-2:]] if seed == 0 else []
    shifts = [float(np.abs(a - b).mean()) for a, b in zip(scores, scores[1:])]
    metrics = {
        "kendall_tau": float(np.mean(taus)),
        "rbo": float(np.mean(rbos)),
        "score_shift": float(np.mean(shifts)),
        "auc": float(np.mean(aucs[1:])),
    }
    return {
        "metrics": metrics,
        "objectives": objectives,
        "per_retrain_auc": aucs,
        "taus": taus,
        "rbos": rbos,
        "last_two_scores": last_two,
    }


def figure(results: dict, path: Path) -> None:
    """Per arm, seed 0: the income scores of the last two retrains (histograms and one against the other)."""
    plt = _pyplot()
    arms_ = results["arms"]
    fig, axes = plt.subplots(2, len(arms_), figsize=(4.0 * len(arms_), 6.4), squeeze=False)
    for i, arm in enumerate(arms_):
        first, second = (np.asarray(v) for v in results["runs"][arm][0]["last_two_scores"])
        bins = np.linspace(0, 1, 41)
        axes[0][i].hist(first, bins=bins, alpha=0.5, label="retrain n-1", log=True)
        axes[0][i].hist(second, bins=bins, alpha=0.5, label="retrain n", log=True)
        axes[0][i].set_title(f"{arm}: income scores (seed 0)", fontsize=9)
        axes[0][i].legend(fontsize=7)
        axes[1][i].scatter(first, second, s=2, alpha=0.3)
        axes[1][i].plot([0, 1], [0, 1], "k--", lw=0.8)
        tau = np.mean([r["metrics"]["kendall_tau"] for r in results["runs"][arm]])
        axes[1][i].set_title(f"retrain n vs n-1 (mean tau over seeds {tau:.3f})", fontsize=9)
        axes[1][i].set_xlabel("retrain n-1 score")
    axes[1][0].set_ylabel("retrain n score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def notes(s: ScoreStabilitySetting) -> str:
    return (
        f"{s.retrains} retrains per seed on census-income windows of {s.window:,} rows shifted by {s.shift:,}, each "
        f"with a new seed; MMoE {s.num_experts} experts of {s.expert_hidden}, {s.epochs} epochs, batch "
        f"{s.batch_size}, Adam lr {s.lr:g}. Stability between consecutive retrains on {s.eval_rows:,} test rows "
        f"(income score): Kendall tau, RBO (p 0.9) of the top {s.top_k}; AUC: mean of the two tasks over retrains "
        "1.. (retrain 0 is shared by every arm)."
    )


STUDY = Study(
    name="score-stability",
    title="Study 5: score regularization and ranking stability between retrains (Pinterest Closeup)",
    setting=setting,
    arms=arms,
    comparisons=comparisons,
    metrics=[
        Metric("kendall_tau", "Kendall tau"),
        Metric("rbo", "RBO top-k"),
        Metric("score_shift", "mean abs. score change", higher_is_better=False),
        Metric("auc", "test AUC"),
    ],
    run=run,
    figure=figure,
    notes=notes,
)
