"""Self-check of mtrank's CUDA fast path, then W2 training speed against the peers on the GPU.

    python3 benchmarks/gpu_check.py --json docs/results/peers-h100.json

1. Numerics (every check must pass): the same model, data and seed trained by
   ``Trainer(..., cuda_graphs=False)`` (eager) and by the default Trainer (the whole step in a CUDA graph)
   for two epochs of W2 (and W1), with a short last batch in every epoch (eager inside the graphed run);
   per-step losses and final weights must agree to float tolerance. Also: schedules, clipping, random
   masks, a resumed graphed run, and whole batches copied into the graph's buffers (the streaming path).
   Prints the step path the Trainer chose, how many steps were replayed, and any capture failure.
2. Speed: ``peers.py --device cuda --workloads W2`` (mtrank graphed, mtrank eager, DeepCTR-Torch ``fit``,
   torch-rechub ``MTLTrainer``), then the ratio of mtrank to the faster peer against the target (>= 30x).

Exit status 1 when a numerical check fails (the timing still runs and prints).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: the peers' progress bars stay quiet

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers.workloads import WORKLOADS, make_data  # noqa: E402
from mtrank.config import GateConfig, TrainConfig  # noqa: E402
from mtrank.model import MultiTaskModel  # noqa: E402
from mtrank.train import Trainer  # noqa: E402

# per-step loss relative difference, and relative L2 distance of the final weights, graphed vs eager
TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2}


def check_numerics(
    workload: str,
    precision: str,
    batches: int = 10,
    epochs: int = 2,
    device: str = "cuda",
    schedule: str = "constant",
    warmup_steps: int = 0,
    grad_clip: float = 0.0,
    model_overrides: dict | None = None,
) -> dict:
    wl = WORKLOADS[workload]
    data = make_data(wl, wl.batch_size * batches + wl.batch_size // 3, seed=3).to(device)
    torch.manual_seed(0)
    reference = MultiTaskModel(dataclasses.replace(wl.model_config(), **(model_overrides or {})))
    graphed_model = copy.deepcopy(reference)
    config = TrainConfig(
        lr=1e-3,
        batch_size=wl.batch_size,
        epochs=epochs,
        eval_every=1,
        precision=precision,
        device=device,
        progress=False,
        schedule=schedule,
        warmup_steps=warmup_steps,
        grad_clip=grad_clip,
    )
    eager = Trainer(reference, config, cuda_graphs=False)
    graphed = Trainer(graphed_model, config)
    eager_result = eager.fit(data)
    graphed_result = graphed.fit(data)
    step = graphed.graphed_step
    eager_losses = torch.tensor([h["train_loss"] for h in eager_result.history])
    graphed_losses = torch.tensor([h["train_loss"] for h in graphed_result.history])
    loss_rel = float(((graphed_losses - eager_losses).abs() / eager_losses.abs().clamp_min(1e-6)).max())
    pairs = [
        (a.float(), b.float())
        for a, b in zip(reference.state_dict().values(), graphed_model.state_dict().values())
        if a.is_floating_point() and a.numel()
    ]
    weight_diff = max(float((a - b).abs().max()) for a, b in pairs)
    # relative L2 distance of all weights: robust to the few near-zero-gradient weights whose Adam step can
    # flip sign on a last-bit difference (a different cuBLAS algorithm inside the graph, say)
    weight_rel = float(sum(((a - b) ** 2).sum() for a, b in pairs).sqrt() / sum((a**2).sum() for a, _ in pairs).sqrt())
    ok = (
        graphed.step_path == "cuda_graph"
        and step is not None
        and not step.failure
        and step.replays > 0
        and loss_rel <= TOLERANCE[precision]
        and weight_rel <= TOLERANCE[precision]
    )
    lrs_equal = [h["lr"] for h in eager_result.history] == [h["lr"] for h in graphed_result.history]
    ok = ok and lrs_equal
    out = {
        "workload": workload,
        "precision": precision,
        "schedule": f"{schedule}, warm-up {warmup_steps}, grad clip {grad_clip:g}"
        + "".join(f", {k}={v}" for k, v in (model_overrides or {}).items()),
        "lr_first_last": [graphed_result.history[0]["lr"], graphed_result.history[-1]["lr"]],
        "step_path": graphed.step_path,
        "reason": graphed.step_path_reason,
        "replays": step.replays if step else 0,
        "eager_steps_in_graphed_run": step.eager_steps if step else 0,
        "capture_failure": step.failure if step else "",
        "steps": graphed_result.steps,
        "max_loss_rel_diff": loss_rel,
        "max_weight_abs_diff": weight_diff,
        "weight_rel_l2_diff": weight_rel,
        "ok": ok,
    }
    print(
        f"{'PASS' if ok else 'FAIL'} {workload} {precision} ({out['schedule']}): path {out['step_path']}, "
        f"{out['replays']} replays + {out['eager_steps_in_graphed_run']} eager steps of {out['steps']}; "
        f"max loss rel diff {loss_rel:.2e}, "
        f"weights: relative L2 diff {weight_rel:.2e}, max abs diff {weight_diff:.2e}"
        + (f"; capture failed: {out['capture_failure']}" if step and step.failure else ""),
        flush=True,
    )
    return out


def check_resume(workload: str = "W2", device: str = "cuda") -> dict:
    """A graphed run (dropout, lr warm-up, so the lr tensor and the RNG state matter) interrupted after 2 of 4
    epochs and resumed from its checkpoint, against the same 4 epochs uninterrupted: identical weights."""
    import tempfile

    wl = WORKLOADS[workload]
    data = make_data(wl, wl.batch_size * 10 + wl.batch_size // 3, seed=3).to(device)
    steps_per_epoch = -(-len(data) // wl.batch_size)

    def run(epochs: int, checkpoint_dir: str = "") -> MultiTaskModel:
        torch.manual_seed(0)
        base = wl.model_config()
        model = MultiTaskModel(dataclasses.replace(base, experts=dataclasses.replace(base.experts, dropout=0.1)))
        config = TrainConfig(
            lr=1e-3,
            batch_size=wl.batch_size,
            steps=epochs * steps_per_epoch,  # warm-up then constant: the lr does not depend on the run length
            eval_every=steps_per_epoch,
            warmup_steps=3,
            device=device,
            progress=False,
            checkpoint_dir=checkpoint_dir,
        )
        Trainer(model, config).fit(data)
        return model

    full = run(4)
    with tempfile.TemporaryDirectory() as ckpt:
        run(2, ckpt)  # "interrupted" after 2 epochs
        resumed = run(4, ckpt)
    diff = max(
        float((a.float() - b.float()).abs().max())
        for a, b in zip(full.state_dict().values(), resumed.state_dict().values())
        if a.is_floating_point() and a.numel()
    )
    out = {"check": "resume", "workload": workload, "max_weight_abs_diff": diff, "ok": diff == 0.0}
    print(
        f"{'PASS' if out['ok'] else 'FAIL'} {workload} graphed, resumed after 2 of 4 epochs: max weight diff {diff:.2e}"
    )
    return out


class StreamedBatches:
    """A batch source that hands the loop whole batches, as the file stream does (batch keys are TensorData,
    copied into the graph's static input buffers), here cut from in-memory rows in a seeded order."""

    def __init__(self, data, batch_size: int, seed: int = 0) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rows = len(data)
        self.steps_per_epoch = -(-self.rows // batch_size)

    def keys(self, epoch: int, skip: int = 0, limit: int | None = None):
        order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        for i in range(skip, self.steps_per_epoch):
            index = order[i * self.batch_size : (i + 1) * self.batch_size].to(self.data.labels.device)
            yield self.data.take(index)

    def batch(self, key):
        return key

    def is_full(self, key) -> bool:
        return len(key) == self.batch_size

    def rows_in(self, key) -> int:
        return len(key)

    def identity(self) -> tuple:
        return (self,)

    def describe(self) -> dict:
        return {"rows": self.rows}

    def position(self) -> dict:
        return {}

    def check_position(self, saved: dict) -> None:
        pass


def check_streamed(workload: str = "W2", device: str = "cuda") -> dict:
    """Batches handed over whole (the streaming path: static input buffers refilled before each replay):
    graphed vs eager, identical losses and weights."""
    wl = WORKLOADS[workload]
    data = make_data(wl, wl.batch_size * 8 + wl.batch_size // 3, seed=5).to(device)
    config = TrainConfig(lr=1e-3, batch_size=wl.batch_size, epochs=2, eval_every=1, device=device, progress=False)
    models, results, trainers = [], [], []
    for graphs in (False, None):
        model = MultiTaskModel(wl.model_config(), seed=0)
        trainer = Trainer(model, config, cuda_graphs=graphs)
        results.append(trainer.fit(StreamedBatches(data, wl.batch_size)))
        models.append(model)
        trainers.append(trainer)
    step = trainers[1].graphed_step
    losses = [[h["train_loss"] for h in r.history] for r in results]
    diff = max(
        float((a.float() - b.float()).abs().max())
        for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values())
        if a.is_floating_point() and a.numel()
    )
    ok = step is not None and step.replays > 0 and not step.failure and losses[0] == losses[1] and diff == 0.0
    out = {
        "check": "streamed batches",
        "workload": workload,
        "replays": step.replays if step else 0,
        "max_weight_abs_diff": diff,
        "losses_equal": losses[0] == losses[1],
        "ok": ok,
    }
    print(f"{'PASS' if ok else 'FAIL'} {workload} streamed batches, graphed vs eager: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="", help="write the checks and the timings here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-batches", type=int, default=0, help="timed W2 batches (0 = peers.py default)")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA device")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    checks = [check_numerics(w, p) for w in ("W2", "W1") for p in ("fp32", "bf16")]
    # a learning-rate schedule inside the graph (the lr tensor is updated in place between replays), and
    # gradient clipping (norm and scale computed on the GPU)
    checks += [check_numerics(w, "fp32", schedule="cosine", warmup_steps=5) for w in ("W2", "W1")]
    checks += [check_numerics(w, "fp32", schedule="cosine", warmup_steps=5, grad_clip=0.1) for w in ("W2", "W1")]
    # random numbers inside the graph: dropout masks, gate dropout, noisy top-k gates, the bias tower's dropout
    random = [
        {"experts": {"hidden": [256, 128], "dropout": 0.1}, "gate": GateConfig.from_dict({"dropout": 0.1})},
        {"gate": GateConfig.from_dict({"type": "topk", "k": 2}), "bias": {"features": [0], "dropout": 0.1}},
    ]
    checks += [check_numerics("W2", p, model_overrides=m) for m in random for p in ("fp32", "bf16")]
    checks.append(check_resume())  # checkpoint + resume of a graphed run: lr tensor, RNG state, optimizer state
    checks.append(check_streamed())  # whole batches copied into the graph's static buffers (file streaming)
    report: dict = {"checks": checks}
    if not args.skip_timing:
        import peers

        timing_json = Path(args.json).with_suffix(".timing.json") if args.json else Path("/tmp/gpu_check_timing.json")
        peer_args = [
            "--device",
            "cuda",
            "--workloads",
            "W2",
            "--rounds",
            str(args.rounds),
            "--json",
            str(timing_json),
        ]
        if args.train_batches:
            peer_args += ["--train-batches", str(args.train_batches)]
        peers.main(peer_args)
        timing = json.loads(timing_json.read_text())
        report["timing"] = timing
        impls = timing["workloads"]["W2"]["implementations"]
        faster_peer = max(("deepctr", "rechub"), key=lambda k: impls[k]["samples_per_s"])
        ratio = impls["mtrank"]["samples_per_s"] / impls[faster_peer]["samples_per_s"]
        report["w2_ratio_to_faster_peer"] = ratio
        print(
            f"\nW2 on {torch.cuda.get_device_name()}: "
            f"mtrank {impls['mtrank']['samples_per_s']:,.0f} samples/s ({impls['mtrank']['precision']}, "
            f"CUDA graph), eager {impls['mtrank-eager']['samples_per_s']:,.0f}, "
            f"faster peer {faster_peer} {impls[faster_peer]['samples_per_s']:,.0f}: {ratio:.1f}x "
            f"(target >= 30x: {'met' if ratio >= 30 else 'NOT met'})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
