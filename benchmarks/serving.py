"""Inference latency of every scoring path, and what reduced precision costs in scores and AUC.

    .venv/bin/python benchmarks/serving.py                      # CPU, writes docs/results/serving.json
    .venv/bin/python benchmarks/serving.py --device cuda        # GPU paths: fp32, bf16, fp16, compile, TorchScript
    .venv/bin/python benchmarks/serving.py --render             # docs/serving.md from the JSON results

Model: W2 (26 categorical features, vocab 10,000, dim 16, + 13 numeric; MMoE, 8 experts [256, 128], towers [64],
2 binary tasks). It is first trained for ``--train-steps`` steps on data labelled by a fixed random teacher, so
score and AUC differences between precisions are measured on a model whose scores spread out (0 = untrained).

Latency: each timed call scores B candidates end to end (inputs in, float32 scores out). The paths are timed
side by side: every round calls each path once, in a rotating order, so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from mtrank.config import ModelConfig, TaskConfig, TrainConfig
from mtrank.data import TensorData
from mtrank.models import MultiTaskModel
from mtrank.serve.backends import Scorer
from mtrank.train import Trainer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
CPU_PATHS = [
    ("eager", "fp32"), ("compile", "fp32"), ("torchscript", "fp32"), ("onnx", "fp32"),
    ("eager", "bf16"), ("torchscript", "bf16"), ("compile", "bf16"),
    ("eager", "mixed"), ("torchscript", "mixed"), ("compile", "mixed"), ("eager", "int8"), ("onnx", "int8"),
]
GPU_PATHS = [
    ("eager", "fp32"), ("compile", "fp32"), ("torchscript", "fp32"),
    ("eager", "bf16"), ("compile", "bf16"), ("eager", "mixed"), ("compile", "mixed"),
    ("eager", "fp16"), ("compile", "fp16"), ("torchscript", "fp16"),
]
BATCHES = (1, 100, 1000)


def w2_config() -> ModelConfig:
    return ModelConfig(
        num_dense=13, vocab_sizes=[10_000] * 26, embedding_dim=16,
        tasks=[TaskConfig("click", "binary"), TaskConfig("like", "binary")],
        block="mmoe", num_experts=8, expert_hidden=[256, 128], tower_hidden=[64],
    )


def teacher_data(n: int, seed: int) -> TensorData:
    """W2-shaped rows labelled by a fixed random teacher: Zipf-like ids with per-id effects, a dense term and a
    shared nonlinear interaction (the same teacher for every seed)."""
    gen, teacher = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(12345)
    num_cat, vocab, num_dense = 26, 10_000, 13
    sparse = torch.clamp((vocab ** torch.rand(n, num_cat, generator=gen) - 1).long(), 0, vocab - 1)
    dense = torch.randn(n, num_dense, generator=gen)
    id_effect = torch.randn(num_cat, vocab, 2, generator=teacher) * 0.5  # (F, V, K)
    dense_w = torch.randn(num_dense, 2, generator=teacher) * 0.3
    hidden = torch.randn(num_cat, vocab, 4, generator=teacher)
    rows = torch.arange(num_cat)
    score = id_effect[rows, sparse].sum(1) / num_cat**0.5  # (n, K)
    h = hidden[rows, sparse].sum(1) / num_cat**0.5  # (n, 4)
    inter = torch.tanh(h[:, :1] * h[:, 1:2]) + torch.relu(h[:, 2:3] + dense[:, :1]) - 0.4
    score = score + dense @ dense_w + torch.cat([inter, -0.5 * inter], 1) - 1.0
    return TensorData(dense, sparse, torch.bernoulli(torch.sigmoid(score), generator=gen))


def train_model(steps: int, seed: int = 0) -> tuple[MultiTaskModel, TensorData, dict]:
    torch.manual_seed(seed)
    model = MultiTaskModel(w2_config())
    test = teacher_data(20_000, seed=99)
    info = {"train_steps": steps}
    if steps:
        train = teacher_data(steps * 512, seed=seed)
        started = time.perf_counter()
        Trainer(model, TrainConfig(steps=steps, batch_size=512, lr=2e-3, progress=False)).fit(train)
        info["train_seconds"] = round(time.perf_counter() - started, 1)
    return model.eval(), test, info


def quality(model: MultiTaskModel, scorer: Scorer, reference: np.ndarray, test: TensorData) -> dict:
    """Score change and per-task AUC of a path on the test rows (scored in batches of 1000)."""
    scores = np.concatenate([
        scorer(test.dense[i : i + 1000], test.sparse[i : i + 1000]).numpy() for i in range(0, len(test), 1000)
    ])
    labels = test.labels.numpy()
    return {
        "max_abs_diff": float(np.abs(scores - reference).max()),
        "mean_abs_diff": float(np.abs(scores - reference).mean()),
        "auc": [float(roc_auc_score(labels[:, k], scores[:, k])) for k in range(scores.shape[1])],
    }


def time_paths(scorers: dict[str, Scorer], test: TensorData, batch: int, rounds: int) -> dict[str, dict]:
    dense, sparse = test.dense[:batch].contiguous(), test.sparse[:batch].contiguous()
    names = list(scorers)
    for name in names:  # warm-up (compilation, allocator, oneDNN primitive caches)
        for _ in range(3):
            scorers[name](dense, sparse)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            scorers[name](dense, sparse)
            if torch.cuda.is_available() and scorers[name].device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
    return {
        name: {"p50_ms": 1e3 * float(np.percentile(t, 50)), "p99_ms": 1e3 * float(np.percentile(t, 99)),
               "mean_ms": 1e3 * float(np.mean(t)), "calls": len(t)}
        for name, t in times.items()
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, test, info = train_model(args.train_steps)
    paths = GPU_PATHS if args.device == "cuda" else CPU_PATHS
    if args.paths:
        paths = [tuple(p.split("/")) for p in args.paths]
    scorers: dict[str, Scorer] = {}
    setup: dict[str, float] = {}
    for backend, precision in paths:
        started = time.perf_counter()
        scorer = Scorer(model, backend, precision, device=args.device, threads=args.threads)
        scorer(test.dense[:8], test.sparse[:8])  # compile / first call
        setup[scorer.name] = time.perf_counter() - started
        scorers[scorer.name] = scorer
        print(f"  set up {scorer.name:<18} {setup[scorer.name]:6.1f} s", file=sys.stderr, flush=True)
    reference_scorer = scorers.get("eager/fp32") or Scorer(model, "eager", "fp32", device=args.device)
    reference = np.concatenate([
        reference_scorer(test.dense[i : i + 1000], test.sparse[i : i + 1000]).numpy()
        for i in range(0, len(test), 1000)
    ])
    results = {name: {"setup_s": setup[name], **quality(model, s, reference, test)} for name, s in scorers.items()}
    latency = {}
    for batch in args.batches:
        rounds = {1: 300, 100: 200}.get(batch, 100) if not args.quick else 10
        latency[str(batch)] = time_paths(scorers, test, batch, rounds)
        print(f"  timed batch {batch}", file=sys.stderr, flush=True)
    return {
        "model": "W2 (26 cat x vocab 10k x dim 16 + 13 numeric; MMoE 8 experts [256, 128]; towers [64]; 2 binary)",
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        **info,
        "test_rows": len(test),
        "paths": results,
        "latency": latency,
        "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]),
    }


# ------------------------------------------------------------------------------------------------ report


def latency_table(result: dict) -> str:
    batches = list(result["latency"])
    header = "| path | " + " | ".join(f"{b} cand. p50 / p99 (ms)" for b in batches) + " | max \\|Δscore\\| | AUC click / like |"
    lines = [header, "|" + "---|" * (len(batches) + 3)]
    for name, info in result["paths"].items():
        cells = [f"{result['latency'][b][name]['p50_ms']:.2f} / {result['latency'][b][name]['p99_ms']:.2f}"
                 for b in batches]
        auc = " / ".join(f"{a:.4f}" for a in info["auc"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {info['max_abs_diff']:.1e} | {auc} |")
    return "\n".join(lines)


def render(results_dir: Path, out: Path) -> None:
    """Write docs/serving.md from the JSON results of this benchmark and benchmarks/loadtest.py."""
    from serving_doc import render_doc  # benchmarks/serving_doc.py

    out.write_text(render_doc(results_dir, latency_table))
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2, this machine's cores)")
    parser.add_argument("--train-steps", type=int, default=300, help="training steps before measuring (0 = untrained)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--paths", nargs="+", help="backend/precision pairs, e.g. eager/fp32 onnx/int8")
    parser.add_argument("--quick", action="store_true", help="10 timing rounds per batch size (a smoke test)")
    parser.add_argument("--json", type=Path, help="output JSON (default docs/results/serving[_cuda].json)")
    parser.add_argument("--render", action="store_true", help="only write docs/serving.md from the JSON results")
    args = parser.parse_args()
    if args.render:
        render(RESULTS, REPO / "docs" / "serving.md")
        return 0
    result = run(args)
    path = args.json or RESULTS / ("serving.json" if args.device == "cpu" else f"serving_{args.device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(latency_table(result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
