"""Production-scale throughput on one GPU: W3 (a DLRM-DCNv2-sized workload) and W2 at large batches.

One measurement for every workload and batch size (``measure``): samples/s of the whole graphed training step
(data in device memory), model FLOPs per sample (counted by ``torch.utils.flop_counter`` on one eager
forward + backward), MFU against this device's *measured* bf16 matmul rate, peak memory, a profile of the step
by kernel family (``torch.profiler``), and, with ``--lrs``, the test AUC at the learning rate that was best on
validation (a small sweep per batch size: the accuracy price of a large batch).

W3: Criteo-like geometry: 13 numeric inputs, 26 categorical features with the MLPerf DLRM-DCNv2 (Criteo 1TB)
cardinalities divided by ``--table-scale`` (default 20: 10.2M rows in all, the largest 2M; the full ones,
204M rows x 128, do not fit one GPU with dense Adam, whose state triples the table), embedding dim 128; MMoE of
``--experts`` DCNv2 + MLP experts (Pinterest's ads ranking): 3 low-rank cross layers then the MLPerf top-MLP
widths; 3 binary tasks. Labels from a fixed random teacher (hashed per-id effects, a dense term and a nonlinear
interaction), as W2, so AUC measures something learnable. ``--optimizer`` goes to ``TrainConfig.optimizer``
(the switch for a row-wise sparse optimizer once the embedding offers one).

W2 (``benchmarks/_peers/workloads.py``): 26 x 10,000-row tables (dim 16), 8 MLP experts [256, 128], 2 tasks.

    python3 benchmarks/w3.py --workload W3 --batch-sizes 16384 65536 --json docs/results/scale-h200/w3.json
    python3 benchmarks/w3.py --workload W2 --batch-sizes 4096 65536 --lrs 4096=0.001,0.002 \\
        65536=0.004,0.008,0.016 --epochs 4 --json docs/results/scale-h200/w2_batch.json
    python3 benchmarks/w3.py --device cpu --quick --workload W3      # every code path, tiny, on CPU
    python3 benchmarks/w3.py --workload W2 --batch-sizes 65536 --compile     # train.compile: true (inductor)
    python3 benchmarks/w3.py --summary docs/results/scale-h200            # the table of a gpu_scale.sh run

``--quick`` shrinks tables, widths, rows and steps so that every path runs in seconds on CPU (what the tests run).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers.workloads import W2, make_data  # noqa: E402
from mtrank.config import ModelConfig, TaskConfig, TrainConfig  # noqa: E402
from mtrank.data import TensorData  # noqa: E402
from mtrank.evaluate.metrics import evaluate  # noqa: E402
from mtrank.model import MultiTaskModel  # noqa: E402
from mtrank.train import Trainer  # noqa: E402
from mtrank.train.loop import TrainingDiverged  # noqa: E402

# MLPerf DLRM-DCNv2 (Criteo 1TB, max_ind_range 40M) table sizes of the 26 categorical features
MLPERF_CARDINALITIES = [
    40_000_000, 39_060, 17_295, 7_424, 20_265, 3, 7_122, 1_543, 63, 40_000_000, 3_067_956, 405_282, 10,
    2_209, 11_938, 155, 4, 976, 14, 40_000_000, 40_000_000, 40_000_000, 590_152, 12_973, 108, 36,
]  # fmt: skip
TEACHER_BUCKETS = 1 << 16  # hashed per-id teacher effects per feature (the teacher, not the model, is hashed)
# kernel families of the step profile: the first family whose any pattern is in a kernel's (lower-case) name
FAMILIES = [
    ("compiled", ("triton_poi", "triton_red", "triton_per")),  # torch.compile's fused elementwise/reduction kernels
    ("embedding_bwd", ("embedding_backward", "embedding_dense_backward", "compute_grad_weight", "sum_and_scatter",
                       "krn_partial", "segment_offsets", "radixsort", "radix_sort", "index_put", "scatter")),
    ("embedding_fwd", ("embedding", "indexselect", "index_select", "gather")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "baddbmm",
              "splitk", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "fused_")),
    ("copies", ("memcpy", "memset", "copy", "catarray", "aten::cat", "fill", "aten::zero")),
]  # fmt: skip


@dataclass
class Spec:
    """A workload: model config, data, and its default batch sizes."""

    name: str
    model: ModelConfig
    data: object  # (rows, seed) -> TensorData


def w3_cardinalities(table_scale: int) -> list[int]:
    """The MLPerf cardinalities divided by ``table_scale`` (rounded up; a table keeps at least min(its size, 4))."""
    return [max(min(c, 4), math.ceil(c / table_scale)) for c in MLPERF_CARDINALITIES]


def w3_spec(args) -> Spec:
    quick = args.quick
    vocab = [min(v, 500) for v in w3_cardinalities(args.table_scale)] if quick else w3_cardinalities(args.table_scale)
    dim = 8 if quick else args.embedding_dim
    hidden = [32, 16] if quick else [1024, 512, 256]
    model = ModelConfig(
        inputs={"num_dense": 13, "vocab_sizes": vocab, "embedding_dim": dim, "pad_to": args.pad_to},
        tasks=[TaskConfig(f"t{k}", "binary") for k in range(3)],
        block={"type": "mmoe", "num_experts": args.experts},
        experts={"type": "dcn", "cross_layers": 3, "cross_rank": 8 if quick else args.cross_rank, "hidden": hidden},
        towers={"hidden": [16] if quick else [256, 64]},
    )
    return Spec("W3", model, lambda rows, seed: w3_data(vocab, rows, seed))


def w2_spec(args) -> Spec:
    model = W2.model_config()
    model = dataclasses.replace(model, inputs=dataclasses.replace(model.inputs, pad_to=args.pad_to))
    return Spec("W2", model, lambda rows, seed: make_data(W2, rows, seed))


def w3_data(vocab: list[int], rows: int, seed: int, tasks: int = 3) -> TensorData:
    """``rows`` rows of W3: log-uniform (Zipf-like) ids per table, normal numerics, labels from a fixed teacher."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.Generator().manual_seed(12345)  # the same label function for every seed
    sizes = torch.tensor(vocab, dtype=torch.float64)
    sparse = torch.clamp((sizes ** torch.rand(rows, len(vocab), generator=gen, dtype=torch.float64) - 1).long(), min=0)
    sparse = torch.minimum(sparse, torch.tensor(vocab) - 1)
    dense = torch.randn(rows, 13, generator=gen)
    effects = torch.randn(len(vocab), TEACHER_BUCKETS, tasks + 2, generator=teacher) * 0.5  # per task + 2 hidden
    bucket = (sparse * 2_654_435_761 + torch.arange(len(vocab)) * 97) % TEACHER_BUCKETS
    per_id = effects[torch.arange(len(vocab)), bucket].sum(1) / len(vocab) ** 0.5  # (rows, tasks + 2)
    dense_w = torch.randn(13, tasks, generator=teacher) * 0.3
    inter = torch.tanh(per_id[:, -2:-1] * per_id[:, -1:]) + torch.relu(per_id[:, -1:] + dense[:, :1]) - 0.4
    mix = torch.linspace(1.0, -0.5, tasks)
    score = per_id[:, :tasks] + dense @ dense_w + inter * mix - torch.linspace(1.0, 2.0, tasks)
    return TensorData(dense, sparse, torch.bernoulli(torch.sigmoid(score), generator=gen))


def matmul_tflops(device: torch.device, n: int, repeats: int) -> float:
    """The best measured rate of an ``n x n x n`` bf16 matmul on ``device``, TFLOP/s (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = math.inf
    for _ in range(repeats + 2):  # two warm-ups
        sync(device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * n**3 / best / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_flops_per_sample(trainer: Trainer, data: TensorData, rows: int = 256) -> float:
    """FLOPs of one training sample's forward + backward matmuls (``torch.utils.flop_counter``), at the step's
    precision; the optimizer's elementwise work is not counted (as in MFU)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = data[0:rows].to(trainer.device)
    model = trainer.model
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(trainer.device.type, torch.bfloat16, enabled=trainer.config.precision == "bf16"):
        out = model(batch.dense, batch.sparse)
        out.task_logits.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / rows


def family(name: str) -> str:
    lowered = name.lower()
    for label, patterns in FAMILIES:
        if any(p in lowered for p in patterns):
            return label
    return "other"


def profile_families(trainer: Trainer, data: TensorData, steps: int) -> dict:
    """Where ``steps`` training steps spend their time, by kernel family: device kernel time on CUDA (from the
    graph's replays; from an eager run when the profiler sees no kernels inside the graph), self CPU time of the
    ops on CPU. Returns ``{"unit", "source", "families": {family: share}, "top": [(kernel, family, ms)]}``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    trainer.config.steps = steps
    with profile(activities=activities) as prof:
        trainer.fit(data)
        sync(trainer.device)
    if cuda:
        times: dict[str, float] = {}
        kernels = 0
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                times[event.name] = times.get(event.name, 0.0) + event.time_range.elapsed_us()
                kernels += 1
        unit = "device time of CUDA kernels and copies"
        if kernels == 0 and trainer.step_path.startswith("cuda_graph"):  # the profiler saw no kernels inside the graph
            eager = Trainer(trainer.model, trainer.config, cuda_graphs=False)
            return {**profile_families(eager, data, steps), "source": "eager steps (graph kernels not traced)"}
    else:
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        times = {e.key: e.self_cpu_time_total for e in ops}
        kernels = sum(e.count for e in ops)
        unit = "self CPU time of aten ops"
    total = sum(times.values()) or 1.0
    shares: dict[str, float] = {}
    for name, value in times.items():
        shares[family(name)] = shares.get(family(name), 0.0) + value / total
    top = sorted(times.items(), key=lambda kv: -kv[1])[:30]
    return {
        "unit": unit,
        "source": f"{trainer.step_path} steps",
        "steps": steps,
        "total_ms_per_step": total / 1000 / steps,
        "kernels_per_step": kernels / steps,  # CUDA kernels and copies (CPU: aten ops); per-step overhead
        "families": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
        "top": [(name[:90], family(name), value / 1000 / steps) for name, value in top],
    }


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KB on Linux)


def train_config(args, batch_size: int, lr: float, **extra) -> TrainConfig:
    return TrainConfig(
        batch_size=batch_size,
        lr=lr,
        optimizer=args.optimizer,
        sparse={"optimizer": args.sparse, "lr": args.sparse_lr} if args.sparse != "dense" else "dense",
        precision=args.precision,
        device=args.device,
        progress=False,
        eval_every=10**9,
        compile=args.compile,
        **extra,
    )


def measure(spec: Spec, args, batch_size: int, data: TensorData, peak_tflops: float) -> dict:
    """Samples/s of ``args.steps`` graphed steps after a warm-up (capture included there), FLOPs, MFU, peak
    memory and the profile, for one batch size."""
    torch.manual_seed(0)
    config = train_config(args, batch_size, args.lr, steps=args.warmup_steps)
    trainer = Trainer(MultiTaskModel(spec.model, seed=0), config)
    flops = train_flops_per_sample(trainer, data)
    data = data.to(trainer.device)  # once: every fit below reads the same device tensors (and the same graph)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    trainer.fit(data)  # warm-up: eager steps, the capture
    trainer.config.steps = args.steps
    result = trainer.fit(data)
    rate = result.samples_per_second
    out = {
        "batch_size": batch_size,
        "samples_per_s": rate,
        "steps": args.steps,
        "step_path": trainer.step_path,
        "graph_replays": getattr(trainer.graphed_step, "replays", 0),
        "train_flops_per_sample": flops,
        "achieved_tflops": rate * flops / 1e12,
        "mfu_vs_measured_bf16_matmul": rate * flops / 1e12 / peak_tflops,
        "peak_memory_gb": peak_memory_gb(trainer.device),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
    }
    if args.profile_steps:
        try:
            out["profile"] = profile_families(trainer, data, args.profile_steps)
        except Exception as err:  # noqa: BLE001 - the throughput stands without the profile; say why it is missing
            out["profile_error"] = f"{type(err).__name__}: {err}"
            print(f"    profile failed, reported without it: {out['profile_error']}")
    print(
        f"{spec.name} batch {batch_size:>6}: {rate:>13,.0f} samples/s  {out['achieved_tflops']:7.2f} TFLOP/s  "
        f"MFU {out['mfu_vs_measured_bf16_matmul']:6.1%}  peak {out['peak_memory_gb']:.1f} GB  ({trainer.step_path})"
    )
    if "profile" in out:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in out["profile"]["families"].items())
        prof = out["profile"]
        print(
            f"    profile ({prof['unit']}, {prof['total_ms_per_step']:.2f} ms/step, "
            f"{prof['kernels_per_step']:.0f} per step): {shares}"
        )
    return out


def auc_study(spec: Spec, args, batch_size: int, lrs: list[float], splits: tuple) -> dict:
    """Train ``args.epochs`` epochs at each lr (cosine, 5% warm-up; the best epoch on the first task's validation
    AUC is kept); the test AUCs of the lr whose validation AUC was best."""
    train, valid, test = splits
    runs = []
    for lr in lrs:
        steps = args.epochs * math.ceil(len(train) / batch_size)
        config = train_config(args, batch_size, lr, epochs=args.epochs, schedule="cosine")
        config.warmup_steps, config.eval_every = max(1, steps // 20), math.ceil(len(train) / batch_size)
        config.monitor = "auc/" + spec.model.tasks[0].name
        trainer = Trainer(MultiTaskModel(spec.model, seed=0), config)
        try:
            result = trainer.fit(train, valid)
        except TrainingDiverged as err:  # a too-large lr is a result of the sweep, not the end of the run
            runs.append({"lr": lr, "valid": -math.inf, "diverged": str(err)})
            print(f"    {spec.name} batch {batch_size} lr {lr:g}: diverged ({err})")
            continue
        aucs = {k: v for k, v in evaluate(trainer.model, test).items() if k.startswith("auc/")}
        runs.append({"lr": lr, "valid": result.best_value, "best_step": result.best_step, "test_auc": aucs})
        print(f"    {spec.name} batch {batch_size} lr {lr:g}: valid {result.best_value:.4f}, test {aucs}")
    best = max(runs, key=lambda r: r["valid"])
    if "diverged" in best:
        raise SystemExit(f"{spec.name} batch {batch_size}: every lr of --lrs diverged ({lrs}); give smaller ones")
    return {"runs": runs, "best_lr": best["lr"], "test_auc": best["test_auc"]}


def parse_lrs(items: list[str]) -> dict[int, list[float]]:
    out = {}
    for item in items:
        batch, _, values = item.partition("=")
        if not values:
            raise SystemExit(f"--lrs: {item!r} is not BATCH=LR[,LR...] (e.g. 65536=0.004,0.008)")
        out[int(batch)] = [float(v) for v in values.split(",")]
    return out


def summary(folder: Path) -> str:
    """A markdown table of the results in ``folder`` (``data_pipeline.json``, ``w2_batch.json``, ``w3.json``,
    those present), each against its target."""
    lines = []

    def load(name: str) -> dict | None:
        path = folder / name
        return json.loads(path.read_text()) if path.exists() else None

    if check := load("prefetch_check.json"):
        verdict = "identical to the CPU path" if check["identical"] else "DIFFERENT from the CPU path"
        lines += [f"check: {check['batches']} batches prefetched to {check['device']}: {verdict}", ""]
    if read := load("read.json"):
        lines += [
            f"Readers alone (batch {read['batch_size']}, pinned: {read['pin_memory']})",
            "",
            "| readers, group | rows/s |",
        ]
        lines += ["|---|---:|", *(f"| {k} | {v:,.0f} |" for k, v in read["rows_per_s"].items()), ""]
    if pipeline := load("data_pipeline.json"):
        lines += [
            f"Files to GPU (W2 layout, batch {pipeline['batch_size']}, {pipeline['precision']}, {pipeline['device']})",
            "",
            f"median of {pipeline.get('repeats', '?')} runs; steady: from step {pipeline.get('steady_after_step')}",
            "",
            "| source | samples/s | x in-memory | steady samples/s | steady x in-memory | step |",
            "|---|---:|---:|---:|---:|---|",
        ]
        steady = pipeline.get("steady_samples_per_s", {})
        steady_ratio = pipeline.get("steady_ratio_to_memory", {})
        for key, rate in pipeline["samples_per_s"].items():
            ratio = pipeline["ratio_to_memory"][key]
            after = f"{steady[key]:,.0f} | {steady_ratio[key]:.2f}" if key in steady else "- | -"
            lines.append(f"| {key} | {rate:,.0f} | {ratio:.2f} | {after} | {pipeline['step_path'][key]} |")
        variants = ("memory", "baseline", "pin_copy")  # the best of the current path is the verdict
        files = [k for k in pipeline["ratio_to_memory"] if not any(v in k for v in variants)]
        best = max(pipeline["ratio_to_memory"][k] for k in files)
        best_steady = max((steady_ratio[k] for k in files if k in steady_ratio), default=float("nan"))
        verdict = "met" if best >= 0.8 else "NOT met"
        lines += [
            "",
            f"target: files >= 0.8x memory: best {best:.2f}x over whole runs -> {verdict} "
            f"(steady, reader start-up and warm-up excluded: best {best_steady:.2f}x)",
            "",
        ]
    runs = (("w2_batch.json", 10e6), ("w2_auc.json", None), ("w3_plain.json", 2.1e6), ("w3.json", 2.1e6))
    for name, target in runs:
        result = load(name)
        if result is None:
            continue
        lines += [
            f"{result['workload']} in device memory ({result['device']}, {result['precision']}, "
            f"{result['optimizer']}, table {result.get('sparse', 'dense')}, inputs.pad_to {result.get('pad_to', 1)}, "
            f"compile {result.get('compile') or 'off'}; "
            f"measured bf16 matmul {result['measured_bf16_matmul_tflops']:.1f} TFLOP/s)",
            "",
            "| batch | samples/s | TFLOP/s | MFU | peak GB | step | profile (share of step time) |",
            "|---:|---:|---:|---:|---:|---|---|",
        ]
        for batch, run in result["batches"].items():
            prof = run.get("profile", {}).get("families", {})
            shares = ", ".join(f"{k} {v:.0%}" for k, v in prof.items())
            lines.append(
                f"| {batch} | {run['samples_per_s']:,.0f} | {run['achieved_tflops']:.1f} | "
                f"{run['mfu_vs_measured_bf16_matmul']:.1%} | {run['peak_memory_gb']:.1f} | {run['step_path']} | "
                f"{shares} |"
            )
        fastest = max(run["samples_per_s"] for run in result["batches"].values())
        if target is not None:  # (the AUC study's own throughput runs are not compiled: no verdict)
            verdict = "met" if fastest >= target else "NOT met"
            lines += ["", f"target: >= {target / 1e6:g}M samples/s: best {fastest / 1e6:.2f}M -> {verdict}"]
        lines.append("")
        if "auc" in result:
            lines += ["| batch | best lr | test AUC |", "|---:|---:|---|"]
            for batch, study in result["auc"].items():
                aucs = ", ".join(f"{k} {v:.4f}" for k, v in study["test_auc"].items())
                lines.append(f"| {batch} | {study['best_lr']:g} | {aucs} |")
            studies = list(result["auc"].values())
            # positive: the largest batch is behind the first; a large batch that is better is no loss
            gaps = [studies[0]["test_auc"][k] - studies[-1]["test_auc"][k] for k in studies[0]["test_auc"]]
            verdict = "met" if max(gaps) <= 0.002 else "NOT met"
            lines += [
                "",
                f"target: test AUC of the largest batch at most 0.002 below the first's: largest shortfall "
                f"{max(gaps):+.4f} -> {verdict}",
            ]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["W2", "W3"], default="W3")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16_384, 65_536])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--optimizer", default="adam", help="TrainConfig.optimizer (a row-wise one, when there)")
    parser.add_argument("--lr", type=float, default=1e-3, help="the lr of the throughput runs")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per batch size")
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed steps first (eager, capture)")
    parser.add_argument("--profile-steps", type=int, default=10, help="profiled steps (0: no profile)")
    parser.add_argument("--rows", type=int, default=0, help="rows in device memory (default: 8 batches)")
    parser.add_argument("--table-scale", type=int, default=20, help="W3: MLPerf cardinalities divided by this")
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--cross-rank", type=int, default=256)
    parser.add_argument(
        "--sparse",
        choices=["dense", "rowwise_adagrad", "lazy_adam"],
        default="dense",
        help="train.sparse: the embedding table's optimizer (a sparse one runs the step eager)",
    )
    parser.add_argument(
        "--sparse-lr", type=float, default=0.0, help="train.sparse.lr: the table's lr (0 = the lr of the run)"
    )
    parser.add_argument(
        "--pad-to",
        type=int,
        default=1,
        help="model.inputs.pad_to: the block input's width rounded up to a multiple of this (W3's is 13 + 26 x 128 "
        "= 3,341, odd: 64 makes it 3,392 for aligned tensor-core GEMMs)",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        type=yaml.safe_load,
        help="train.compile (YAML): bare = inductor; e.g. aot_eager or '{mode: max-autotune-no-cudagraphs}'",
    )
    parser.add_argument("--lrs", nargs="*", default=[], help="AUC study: BATCH=LR[,LR...] per batch size")
    parser.add_argument("--epochs", type=int, default=4, help="AUC study: epochs per run")
    parser.add_argument("--auc-rows", type=int, default=4_000_000, help="AUC study: training rows")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every path in seconds on CPU")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--summary", metavar="DIR", help="only print the table of the results in DIR")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(Path(args.summary)))
        return 0
    torch.set_num_threads(args.threads)
    if args.quick:
        args.batch_sizes = [min(b, 256) for b in args.batch_sizes]
        args.steps, args.warmup_steps, args.profile_steps = 3, 2, min(args.profile_steps, 2)
        args.matmul_size, args.auc_rows, args.epochs = 128, 2048, 1
    device = torch.device(args.device)
    spec = (w3_spec if args.workload == "W3" else w2_spec)(args)
    peak = matmul_tflops(device, args.matmul_size, repeats=3)
    print(f"measured bf16 matmul ({args.matmul_size}^3) on {device}: {peak:.1f} TFLOP/s")
    results = {
        "workload": spec.name,
        "model": spec.model.to_dict() if hasattr(spec.model, "to_dict") else repr(spec.model),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": args.precision,
        "optimizer": args.optimizer,
        "pad_to": args.pad_to,
        "sparse": args.sparse,
        "sparse_lr": args.sparse_lr,
        "compile": args.compile,
        "measured_bf16_matmul_tflops": peak,
        "quick": args.quick,
        "batches": {},
    }
    for batch_size in args.batch_sizes:
        data = spec.data(args.rows or 8 * batch_size, 1)
        results["batches"][str(batch_size)] = measure(spec, args, batch_size, data, peak)
        del data
        gc.collect()  # the last trainer's graph, its memory pool and the optimizer state go before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lrs = parse_lrs(args.lrs)
    if lrs:
        rows = args.auc_rows
        splits = (spec.data(rows, 11), spec.data(rows // 4, 12), spec.data(rows // 4, 13))
        auc = {str(b): auc_study(spec, args, b if not args.quick else min(b, 256), lr, splits) for b, lr in lrs.items()}
        results["auc"] = auc
        for batch, study in auc.items():
            print(f"{spec.name} batch {batch}: best lr {study['best_lr']:g}, test AUC {study['test_auc']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
