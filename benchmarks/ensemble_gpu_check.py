"""CUDA check of the ensemble: graphed == eager, member == single run, and the 200-run speed-up.

    python3 benchmarks/ensemble_gpu_check.py [--runs 200] [--steps 2000] [--json FILE]

1. Exactness (8 members, 50 steps at lr 1e-2, the paper's synthetic MMoE, one fresh dataset per member): the
   eager ensemble (``cuda_graphs=False``) and the graphed one from the same start must end with the same
   weights, also with dropout and with gate dropout (random masks inside the graph).
   Then member 0 of a 4-member ensemble against seed 0 trained alone over the full run, in float32 and in
   float64 (where the two must agree to rounding: the float32 gap is rounding amplified by training).
2. Speed: ``runs`` runs x ``steps`` steps as one graphed ensemble against one run alone (``Trainer``, graphed),
   same steps and evaluation schedule (every 100 steps on 2,000 validation rows), each timed after a warm-up
   fit. Also the bare step (graph replay) time of both, and the ensemble's time spent evaluating.
Prints a table; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from mtrank.config import GateConfig, TrainConfig
from mtrank.data import TensorData
from mtrank.data.synthetic import SyntheticConfig, make_synthetic
from mtrank.experiments.common import paper_model
from mtrank.model import MultiTaskModel
from mtrank.train import Trainer
from mtrank.train.ensemble import Ensemble, EnsembleData


def member_data(seed: int, n: int = 10_000):
    return make_synthetic(SyntheticConfig(n=n + 2_000, correlation=1.0, seed=seed))


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def replay_ms(step, index: torch.Tensor, n: int = 500) -> float:
    """Milliseconds per graph replay of ``step`` (a :class:`~mtrank.train.cuda_graph.GraphedStep`), same rows."""
    _, seconds = timed(lambda: [step(index) for _ in range(n)])
    return 1e3 * seconds / n


def member_vs_single(parts, dtype: torch.dtype, steps: int) -> tuple[float, int]:
    """Max |weight| gap between member 0 of a graphed ensemble and seed 0 trained alone, in ``dtype``."""
    parts = [TensorData(p.dense.to(dtype), p.sparse, p.labels.to(dtype)) for p in parts]
    cfg = TrainConfig(lr=1e-2, batch_size=128, steps=steps, eval_every=100, device="cuda", progress=False)
    ensemble = Ensemble(paper_model("mmoe"), list(range(len(parts))), "cuda")
    ensemble.fit(EnsembleData.stack([p[:10_000] for p in parts]), EnsembleData.stack([p[10_000:] for p in parts]), cfg)
    single = MultiTaskModel(paper_model("mmoe"), seed=0)
    Trainer(single, TrainConfig(**{**cfg.__dict__, "seed": 0})).fit(parts[0][:10_000], parts[0][10_000:])
    member = ensemble.member(0).state_dict()
    gaps = [
        float((member[k].double() - v.detach().cpu().double()).abs().max())
        for k, v in single.state_dict().items()
        if v.is_floating_point() and v.numel()
    ]
    return max(gaps), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=2_000)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    runs, steps = args.runs, args.steps
    parts = [member_data(s) for s in range(runs)]
    train = EnsembleData.stack([p[:10_000] for p in parts])
    valid = EnsembleData.stack([p[10_000:] for p in parts])
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": runs, "steps": steps}
    print(f"device: {report['device']}, torch {report['torch']}")

    # 1. exactness
    short = TrainConfig(lr=1e-2, batch_size=128, steps=50, eval_every=25, device="cuda", progress=False)
    small_train = EnsembleData.stack([p[:10_000] for p in parts[:8]])
    small_valid = EnsembleData.stack([p[10_000:] for p in parts[:8]])
    eager = Ensemble(paper_model("mmoe"), list(range(8)), "cuda", cuda_graphs=False)
    graphed = Ensemble(paper_model("mmoe"), list(range(8)), "cuda")
    eager.fit(small_train, small_valid, short)
    graphed.fit(small_train, small_valid, short)
    g = graphed.graphed_step
    report["graphed_vs_eager_max_abs"] = max(
        float((eager.params[k] - graphed.params[k]).detach().abs().max()) for k in eager.params
    )
    report["graph"] = {"replays": g.replays, "eager_steps": g.eager_steps, "failure": g.failure}
    print(f"graphed vs eager ensemble, max |w| difference after 50 steps: {report['graphed_vs_eager_max_abs']:.3e}")
    print(f"  ({g.replays} graph replays, {g.eager_steps} eager steps, failure: {g.failure or 'none'})")
    for name, extra in (
        ("dropout 0.1", {"experts": {"hidden": [16], "dropout": 0.1}}),
        ("gate dropout 0.1", {"gate": GateConfig.from_dict({"dropout": 0.1})}),
    ):
        config = dataclasses.replace(paper_model("mmoe"), **extra)  # random masks inside the graph
        pair = [Ensemble(config, list(range(8)), "cuda", cuda_graphs=graphs) for graphs in (False, True)]
        for member_set in pair:
            torch.manual_seed(7)  # the same GPU generator state for both
            member_set.fit(small_train, small_valid, short)
        gap = max(float((pair[0].params[k] - pair[1].params[k]).detach().abs().max()) for k in pair[0].params)
        report[f"graphed_vs_eager_max_abs_{name.replace(' ', '_')}"] = gap
        print(f"  with {name}: max |w| difference {gap:.3e} ({pair[1].graphed_step.replays} replays)")
    for dtype in (torch.float32, torch.float64):  # member 0 vs seed 0 alone; float64 shows what is rounding
        torch.set_default_dtype(dtype)
        try:
            gap, steps_done = member_vs_single(parts[:4], dtype, steps)
        finally:
            torch.set_default_dtype(torch.float32)
        report[f"member_vs_single_max_abs_{str(dtype)[6:]}"] = gap
        print(
            f"member 0 vs the same seed alone, {str(dtype)[6:]}, max |w| difference after {steps_done} steps: {gap:.3e}"
        )

    # 2. speed: warm-up pair, then the timed pair
    cfg = TrainConfig(lr=1e-2, batch_size=128, steps=steps, eval_every=100, device="cuda", progress=False)
    for _ in range(2):
        ensemble = Ensemble(paper_model("mmoe"), list(range(runs)), "cuda")
        result, ensemble_s = timed(lambda e=ensemble: e.fit(train, valid, cfg))
        trainer = Trainer(MultiTaskModel(paper_model("mmoe"), seed=0), TrainConfig(**{**cfg.__dict__, "seed": 0}))
        _, single_s = timed(lambda t=trainer: t.fit(parts[0][:10_000], parts[0][10_000:]))
    ens_index = torch.randint(0, 10_000, (runs, 128), device="cuda")
    one_index = torch.randint(0, 10_000, (128,), device="cuda")
    report.update(
        ensemble_s=ensemble_s,
        ensemble_eval_s=result.eval_seconds,
        single_s=single_s,
        ratio=ensemble_s / single_s,
        ensemble_step_ms=replay_ms(ensemble.graphed_step, ens_index),
        single_step_ms=replay_ms(trainer.graphed_step, one_index),
    )
    r = report
    print("| | fit (s) | of which evaluation (s) | step, graph replay (ms) |")
    print("|---|---|---|---|")
    print(f"| {runs} runs, one ensemble | {ensemble_s:.2f} | {result.eval_seconds:.2f} | {r['ensemble_step_ms']:.3f} |")
    print(f"| one run (Trainer) | {single_s:.2f} | | {r['single_step_ms']:.3f} |")
    print(f"{runs} runs x {steps} steps: {r['ratio']:.1f}x the time of one run (sequential: {runs}x); target < 10x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
