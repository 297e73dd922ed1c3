"""Study 2, position / selection bias (YouTube, Zhao et al. RecSys 2019, section 5): a shallow tower reads the
position, its logit is added to the main logits in training (10% of rows dropped), and it is left out at
serving, so the main logits rank by relevance, not by where the old ranker showed an item.

Data: :mod:`mtrank.data.impressions` (known true relevance, a logging policy that promotes a feature unrelated
to relevance, a position-based examination model of configurable ``severity``). Arms, at each severity:

* ``no position``: the model reads the item features only;
* ``position feature``: position is one more input of the main model, served at a fixed position (0, the top);
* ``bias tower``: YouTube's shallow tower over position (``model.bias``) with dropout 0.1;
* ``bias tower, no dropout``: the same with dropout 0 (what the dropout is for).

Measured on fresh queries of the same world: NDCG@5 of the order the main logits serve (gains: true relevance),
and the bias left in the main logits: ``|b|`` of the least-squares fit ``logit ~ a + c * true_logit + b *
log(1 + logged position)`` (0: the logged position explains nothing beyond relevance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import ndcg_score

from mtrank.config import ModelConfig, TaskConfig, TrainConfig
from mtrank.data.impressions import ImpressionConfig, Impressions, make_impressions
from mtrank.evaluate.metrics import predict_batches
from mtrank.evaluate.report import _pyplot
from mtrank.experiments.studies.runner import Metric, Study
from mtrank.model import MultiTaskModel
from mtrank.train.trainer import Trainer

METHODS = ("no position", "position feature", "bias tower", "bias tower, no dropout")
TOWER_DROPOUT = 0.1  # YouTube's


@dataclass
class PositionBiasSetting:
    """Sizes of the study (``quick``: seconds, for the tests)."""

    severities: tuple[float, ...] = (0.0, 1.0, 2.0)
    queries: int = 3000
    test_queries: int = 1000
    list_size: int = 10
    policy_boost: float = 1.0
    policy_noise: float = 1.0
    num_experts: int = 4
    expert_hidden: int = 16
    epochs: int = 8
    batch_size: int = 256
    lr: float = 3e-3
    ndcg_at: int = 5
    device: str = "cpu"

    @classmethod
    def quick(cls) -> PositionBiasSetting:
        return cls(severities=(1.0,), queries=150, test_queries=60, epochs=1, batch_size=128)


def setting(quick: bool) -> PositionBiasSetting:
    return PositionBiasSetting.quick() if quick else PositionBiasSetting()


def arm_name(method: str, severity: float) -> str:
    return f"{method}, severity {severity:g}"


def arms(s: PositionBiasSetting) -> list[str]:
    return [arm_name(m, v) for v in s.severities for m in METHODS]


def comparisons(s: PositionBiasSetting) -> list[tuple[str, str]]:
    pairs = [
        ("bias tower", "no position"),
        ("bias tower", "position feature"),
        ("bias tower", "bias tower, no dropout"),
    ]
    return [(arm_name(a, v), arm_name(b, v)) for v in s.severities for a, b in pairs]


def simulate(s: PositionBiasSetting, severity: float, seed: int, test: bool) -> Impressions:
    config = ImpressionConfig(
        queries=s.test_queries if test else s.queries,
        list_size=s.list_size,
        severity=severity,
        policy_boost=s.policy_boost,
        policy_noise=s.policy_noise,
        seed=2 * seed + int(test),
    )
    return make_impressions(config)


def model_config(s: PositionBiasSetting, method: str, num_dense: int) -> ModelConfig:
    reads_position = method != "no position"
    bias = {}
    if method.startswith("bias tower"):
        bias = {"features": [0], "dropout": 0.0 if method.endswith("no dropout") else TOWER_DROPOUT}
    return ModelConfig(
        inputs={"num_dense": num_dense, "vocab_sizes": [s.list_size] if reads_position else [], "embedding_dim": 4},
        tasks=[TaskConfig("click", "binary")],
        block={"type": "mmoe", "num_experts": s.num_experts},
        experts={"hidden": [s.expert_hidden]},
        towers={"hidden": [8]},
        bias=bias,
    )


def served_rows(impressions: Impressions, method: str):
    """The rows as the service sees them: no position column (no position), position 0 (position feature),
    the logged position (bias tower: it is not read at serving)."""
    rows = impressions.rows
    if method == "no position":
        return type(rows)(rows.dense, rows.sparse[:, :0], rows.labels)
    if method == "position feature":
        return type(rows)(rows.dense, torch.zeros_like(rows.sparse), rows.labels)
    return rows


def bias_left(logits: np.ndarray, impressions: Impressions) -> float:
    """``|b|`` of the least-squares fit ``logit ~ a + c * true_logit + b * log(1 + logged position)``."""
    r = np.clip(impressions.relevance, 1e-6, 1 - 1e-6)
    design = np.stack([np.ones_like(r), np.log(r / (1 - r)), np.log1p(impressions.position)], 1)
    coef, *_ = np.linalg.lstsq(design, logits, rcond=None)
    return float(abs(coef[2]))


def run(s: PositionBiasSetting, arm: str, seed: int) -> dict:
    method, severity = arm.rsplit(", severity ", 1)
    train, test = (simulate(s, float(severity), seed, t) for t in (False, True))
    train_rows = served_rows(train, "no position") if method == "no position" else train.rows
    model = MultiTaskModel(model_config(s, method, train.rows.dense.shape[1]), seed=seed)
    config = TrainConfig(lr=s.lr, batch_size=s.batch_size, epochs=s.epochs, seed=seed, device=s.device, progress=False)
    Trainer(model, config, callbacks=[]).fit(train_rows)
    logits = predict_batches(model, served_rows(test, method))[0][:, 0].double().numpy()
    relevance = test.by_query(test.relevance)
    ndcg = ndcg_score(relevance, test.by_query(logits), k=s.ndcg_at)
    logged = ndcg_score(relevance, -test.by_query(test.position).astype(float), k=s.ndcg_at)
    return {"metrics": {"ndcg": float(ndcg), "bias_left": bias_left(logits, test), "logged_ndcg": float(logged)}}


def figure(results: dict, path: Path) -> None:
    """NDCG and the bias left against severity, one line per method through the median over seeds, every seed
    a dot (a failed fit stays visible without dragging a mean)."""
    plt = _pyplot()
    severities = np.asarray(results["setting"]["severities"], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (key, title) in zip(axes, (("ndcg", "NDCG@k of the served order"), ("bias_left", "bias left |b|"))):
        for i, method in enumerate(METHODS):
            runs = np.asarray([[r["metrics"][key] for r in results["runs"][arm_name(method, v)]] for v in severities])
            shift = severities + 0.04 * (i - 1.5)  # (S,) side by side
            ax.plot(shift, np.median(runs, 1), marker="o", color=f"C{i}", label=method)
            ax.scatter(np.repeat(shift, runs.shape[1]), runs.ravel(), s=8, alpha=0.4, color=f"C{i}")
        if key == "ndcg":
            logged = [results["summary"][arm_name(METHODS[0], v)]["logged_ndcg"]["mean"] for v in severities]
            ax.plot(severities, logged, "k--", label="logging policy")
        ax.set_xlabel("position-bias severity (examination = (1/(p+1))^severity)")
        ax.set_title(title + " (median line, dots: seeds)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def notes(s: PositionBiasSetting) -> str:
    return (
        f"Impression simulator (`mtrank.data.impressions`): {s.queries:,} training queries and {s.test_queries:,} "
        f"test queries of {s.list_size} items, 8 features; logging policy boost {s.policy_boost:g} on a feature "
        f"unrelated to relevance, noise {s.policy_noise:g}; severities {', '.join(f'{v:g}' for v in s.severities)}. "
        f"MMoE ({s.num_experts} experts of {s.expert_hidden}, one task: click), Adam lr {s.lr:g}, batch "
        f"{s.batch_size}, {s.epochs} epochs. NDCG@{s.ndcg_at} of the order served by the main logits, gains = true "
        "relevance; `logged NDCG`: the logging policy's own order."
    )


STUDY = Study(
    name="position-bias",
    title="Study 2: position / selection bias and the shallow tower (YouTube)",
    setting=setting,
    arms=arms,
    comparisons=comparisons,
    metrics=[
        Metric("ndcg", "NDCG@k (true relevance)"),
        Metric("bias_left", "bias left (abs. b)", higher_is_better=False),
        Metric("logged_ndcg", "logging policy NDCG@k"),
    ],
    run=run,
    figure=figure,
    notes=notes,
)
