"""CUDA check of the graphed ensemble step: graphed == eager on the GPU, then the 200-run speed-up.

    python3 benchmarks/ensemble_gpu_check.py

Trains the same 200-member MMoE ensemble (the paper's synthetic setting, one fresh dataset per member) twice
from the same start, eager (``cuda_graphs=False``) and graphed, and compares the weights; then times the graphed
ensemble against one run trained alone with ``Trainer`` (also graphed), same steps and evaluation schedule.
"""

from __future__ import annotations

import time

import torch

from mtrank.config import TrainConfig
from mtrank.data.synthetic import SyntheticConfig, make_synthetic
from mtrank.experiments.synthetic import paper_model
from mtrank.models import MultiTaskModel
from mtrank.train import Trainer
from mtrank.train.ensemble import Ensemble, EnsembleData


def member_data(seed: int, n: int = 10_000):
    return make_synthetic(SyntheticConfig(n=n + 2_000, correlation=1.0, seed=seed))


def main() -> None:
    runs, steps = 200, 2_000
    cfg = TrainConfig(lr=1e-2, batch_size=128, steps=steps, eval_every=100, device="cuda", progress=False)
    parts = [member_data(s) for s in range(runs)]
    train = EnsembleData.stack([p[:10_000] for p in parts])
    valid = EnsembleData.stack([p[10_000:] for p in parts])

    short = TrainConfig(lr=1e-2, batch_size=128, steps=50, eval_every=25, device="cuda", progress=False)
    eager = Ensemble(paper_model("mmoe"), list(range(8)), "cuda", cuda_graphs=False)
    graphed = Ensemble(paper_model("mmoe"), list(range(8)), "cuda")
    small_train = EnsembleData.stack([p[:10_000] for p in parts[:8]])
    small_valid = EnsembleData.stack([p[10_000:] for p in parts[:8]])
    eager.fit(small_train, small_valid, short)
    graphed.fit(small_train, small_valid, short)
    step = graphed.graphed_step
    diff = max(float((eager.params[k] - graphed.params[k]).detach().abs().max()) for k in eager.params)
    print(
        f"graphed ensemble step: replays {step.replays}, eager steps {step.eager_steps}, "
        f"failure {step.failure!r}; max |w_graphed - w_eager| after 50 steps: {diff:.2e}"
    )

    for _ in range(2):  # warm-up of both paths, then the timed pair
        ensemble = Ensemble(paper_model("mmoe"), list(range(runs)), "cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        ensemble.fit(train, valid, cfg)
        torch.cuda.synchronize()
        ensemble_s = time.perf_counter() - start
        torch.manual_seed(0)
        single = MultiTaskModel(paper_model("mmoe"))
        torch.cuda.synchronize()
        start = time.perf_counter()
        Trainer(single, TrainConfig(**{**cfg.__dict__, "seed": 0})).fit(parts[0][:10_000], parts[0][10_000:])
        torch.cuda.synchronize()
        single_s = time.perf_counter() - start
    print(
        f"{runs} runs x {steps} steps as one graphed ensemble: {ensemble_s:.1f} s; one run alone (Trainer, "
        f"graphed): {single_s:.1f} s; ratio {ensemble_s / single_s:.1f}x (sequential: {runs}x)"
    )


if __name__ == "__main__":
    main()
