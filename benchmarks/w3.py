"""Production-scale throughput on one GPU: W3 (a DLRM-DCNv2-sized workload) and W2 at large batches.

One measurement for every workload and batch size (``measure``): samples/s of the whole graphed training step
(data in device memory), model FLOPs per sample (counted by ``torch.utils.flop_counter`` on one eager
forward + backward), MFU against this device's *measured* bf16 matmul rate, peak memory, a profile of the step
by kernel family (``torch.profiler``), and, with ``--grid`` (``auc_study``), the accuracy price of a large batch:
the same search space per batch size, the configuration chosen on validation at seed 0, then rerun at
``--seeds`` K paired seeds; test AUC mean / median per batch size, the paired shortfall of the largest batch with
its 95% bootstrap interval (:mod:`mtrank.stats`), diverged runs and a verdict against the 0.002 target.

W3: Criteo-like geometry: 13 numeric inputs, 26 categorical features with the MLPerf DLRM-DCNv2 (Criteo 1TB)
cardinalities divided by ``--table-scale`` (default 20: 10.2M rows in all, the largest 2M; the full ones,
204M rows x 128, do not fit one GPU with dense Adam, whose state triples the table), embedding dim 128; MMoE of
``--experts`` DCNv2 + MLP experts (Pinterest's ads ranking): 3 low-rank cross layers then the MLPerf top-MLP
widths; 3 binary tasks. Labels from a fixed random teacher (hashed per-id effects, a dense term and a nonlinear
interaction), as W2, so AUC measures something learnable. ``--optimizer`` goes to ``TrainConfig.optimizer``
(the switch for a row-wise sparse optimizer once the embedding offers one).

W2 (``benchmarks/_peers/workloads.py``): 26 x 10,000-row tables (dim 16), 8 MLP experts [256, 128], 2 tasks.

    python3 benchmarks/w3.py --workload W3 --batch-sizes 16384 65536 --json docs/results/scale-h200/w3.json
    python3 benchmarks/w3.py --workload W2 --batch-sizes 4096 65536 --epochs 8 --patience 1 --seeds 10 --grid \\
        "4096:lr=0.001,0.002,0.004;sparse=dense,rowwise_adagrad;sparse_lr=0.02,0.06" \\
        "65536:lr=0.004,0.008,0.016;sparse=dense,rowwise_adagrad;sparse_lr=0.06,0.18" --json w2_auc.json
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
from mtrank.stats import MIN_PAIRS, paired_bootstrap, summarize, verdict, wilson_interval  # noqa: E402
from mtrank.train import Trainer  # noqa: E402
from mtrank.train.loop import TrainingDiverged  # noqa: E402

# MLPerf DLRM-DCNv2 (Criteo 1TB, max_ind_range 40M) table sizes of the 26 categorical features
MLPERF_CARDINALITIES = [
    40_000_000, 39_060, 17_295, 7_424, 20_265, 3, 7_122, 1_543, 63, 40_000_000, 3_067_956, 405_282, 10,
    2_209, 11_938, 155, 4, 976, 14, 40_000_000, 40_000_000, 40_000_000, 590_152, 12_973, 108, 36,
]  # fmt: skip
SPARSE_CHOICES = ("dense", "rowwise_adagrad", "lazy_adam")  # train.sparse.optimizer
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


def free_memory(device: torch.device) -> None:
    """Let the last trainer's graph, its memory pool and the optimizer state go before the next run."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KB on Linux)


def train_config(
    args, batch_size: int, lr: float, sparse: str | None = None, sparse_lr: float | None = None, **extra
) -> TrainConfig:
    """The run's TrainConfig; the table's optimizer and lr from ``--sparse`` / ``--sparse-lr`` unless given."""
    sparse = args.sparse if sparse is None else sparse
    sparse_lr = args.sparse_lr if sparse_lr is None else sparse_lr
    return TrainConfig(
        batch_size=batch_size,
        lr=lr,
        optimizer=args.optimizer,
        sparse={"optimizer": sparse, "lr": sparse_lr} if sparse != "dense" or sparse_lr else "dense",
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


# ---------------------------------------------------------------------------------------------- the AUC study

GRID_KEYS = ("lr", "sparse", "sparse_lr", "dense_table_lr", "warmup")
TUNING_SEED = 0  # the configuration is chosen at this seed; the paired reruns use seeds 1..K
AUC_TARGET = 0.002  # issue 11: the large batch's test AUC at most this much below the small one's


@dataclass(frozen=True)
class RunConfig:
    """One point of a batch size's search space: the dense parameters' lr (Adam), the table's optimizer and its
    lr (``train.sparse``; 0 = the dense lr; with ``dense``, Adam on the table at that lr), and the linear warm-up
    as a fraction of the run's steps."""

    lr: float
    sparse: str = "dense"
    sparse_lr: float = 0.0
    warmup: float = 0.05

    def label(self) -> str:
        table = "table Adam" if self.sparse == "dense" else f"table {self.sparse}"
        table += f" lr {self.sparse_lr:g}" if self.sparse_lr else ""
        return f"lr {self.lr:g}, {table}, warm-up {self.warmup:.0%}"


def parse_grid(item: str, args) -> tuple[int, dict[str, list]]:
    """``BATCH:lr=A,B;sparse=dense,rowwise_adagrad;sparse_lr=C,D;warmup=E`` -> ``(BATCH, {key: values})``;
    a key left out takes the run's flag (``--sparse``, ``--sparse-lr``; warm-up 0.05)."""
    batch, _, spec = item.partition(":")
    example = "4096:lr=0.001,0.002;sparse=dense,rowwise_adagrad;sparse_lr=0.02,0.05"
    if not batch.strip().isdigit() or not spec:
        raise SystemExit(f"--grid: {item!r} is not BATCH:KEY=V,V;KEY=V (e.g. {example!r})")
    grid: dict[str, list] = {
        "sparse": [args.sparse],
        "sparse_lr": [args.sparse_lr],
        "dense_table_lr": [0.0],
        "warmup": [0.05],
    }
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, _, values = part.partition("=")
        key = key.strip()
        if key not in GRID_KEYS or not values:
            raise SystemExit(f"--grid {batch}: {part!r} is not KEY=V[,V...] with KEY one of {list(GRID_KEYS)}")
        items = [v.strip() for v in values.split(",")]
        if key == "sparse":
            bad = [v for v in items if v not in SPARSE_CHOICES]
            if bad:
                raise SystemExit(f"--grid {batch}: sparse={','.join(bad)} is not one of {list(SPARSE_CHOICES)}")
            grid[key] = items
        else:
            try:
                grid[key] = [float(v) for v in items]
            except ValueError:
                raise SystemExit(f"--grid {batch}: {key}={values} must be numbers") from None
    if "lr" not in grid:
        raise SystemExit(f"--grid {batch}: give the dense lr grid, lr=V[,V...]")
    return int(batch), grid


def grid_configs(grid: dict[str, list]) -> list[RunConfig]:
    """Every configuration of a grid: lr x warm-up x table, where a sparse table optimizer takes each table lr
    of ``sparse_lr`` and ``dense`` (Adam on the table) each of ``dense_table_lr`` (0: the dense lr)."""
    return [
        RunConfig(lr, sparse, table_lr, warmup)
        for lr in grid["lr"]
        for warmup in grid["warmup"]
        for sparse in grid["sparse"]
        for table_lr in (grid["sparse_lr"] if sparse != "dense" else grid["dense_table_lr"])
    ]


def check_same_search_space(grids: dict[int, dict[str, list]]) -> None:
    """A fair comparison: every batch size searches the same table optimizers and as many values of each
    numeric knob (the values themselves may be centred per batch size)."""
    (first, reference), *others = grids.items()
    for batch, grid in others:
        for key in GRID_KEYS:
            same = grid[key] == reference[key] if key == "sparse" else len(grid[key]) == len(reference[key])
            if not same:
                raise SystemExit(
                    f"--grid: batch {batch} searches {key}={grid[key]} but batch {first} {key}={reference[key]}: "
                    "give every batch size the same table optimizers and as many values of each knob"
                )


def grid_edges(grid: dict[str, list], best: RunConfig) -> list[str]:
    """The searched knobs (more than one value) whose chosen value is the smallest or largest of its grid: the
    optimum may lie outside it."""
    edges = []
    for key in ("lr", "sparse_lr", "dense_table_lr", "warmup"):
        values = sorted(set(grid[key]))
        if len(values) < 2 or (key == "sparse_lr" and best.sparse == "dense"):
            continue
        if key == "dense_table_lr" and best.sparse != "dense":
            continue
        value = getattr(best, "sparse_lr" if key == "dense_table_lr" else key)
        if value in (values[0], values[-1]):
            edges.append(f"{key} {value:g} is the {'smallest' if value == values[0] else 'largest'} of {values}")
    return edges


def train_run(spec: Spec, args, batch_size: int, run: RunConfig, seed: int, splits: tuple, test: bool) -> dict:
    """One training run: ``args.epochs`` epochs, cosine schedule after the warm-up, validation AUC of the first
    task each epoch (early stopping after ``args.patience`` epochs without a better one, 0 = never), the best
    epoch's weights kept; their test AUCs when ``test``. ``seed``: the model's initialisation and the batch order
    (the same seed gives the same order of rows at every batch size). A diverged run is a result, not an error."""
    train, valid, test_rows = splits
    steps_per_epoch = math.ceil(len(train) / batch_size)
    steps = args.epochs * steps_per_epoch
    config = train_config(args, batch_size, run.lr, run.sparse, run.sparse_lr, epochs=args.epochs, seed=seed)
    config.schedule, config.eval_every, config.early_stopping_patience = "cosine", steps_per_epoch, args.patience
    config.warmup_steps = max(1, int(run.warmup * steps)) if run.warmup > 0 else 0
    config.monitor = "auc/" + spec.model.tasks[0].name
    record: dict = {**dataclasses.asdict(run), "seed": seed}
    start = time.perf_counter()
    trainer = Trainer(MultiTaskModel(spec.model, seed=seed), config)
    try:
        result = trainer.fit(train, valid)
    except TrainingDiverged as err:  # a too-large lr is a result of the search, not the end of the study
        del trainer
        free_memory(train.dense.device)
        record.update(valid=None, diverged=str(err), seconds=time.perf_counter() - start)
        print(f"    {spec.name} batch {batch_size} seed {seed} {run.label()}: diverged ({err})", flush=True)
        return record
    record.update(
        valid=result.best_value,
        best_epoch=result.best_step / steps_per_epoch,
        epochs_run=result.steps / steps_per_epoch,
    )
    if test:
        record["test_auc"] = {k: v for k, v in evaluate(trainer.model, test_rows).items() if k.startswith("auc/")}
    del trainer
    free_memory(train.dense.device)
    record["seconds"] = time.perf_counter() - start
    shown = ", ".join(f"{k} {v:.4f}" for k, v in record.get("test_auc", {}).items())
    print(
        f"    {spec.name} batch {batch_size} seed {seed} {run.label()}: valid {result.best_value:.4f} "
        f"(epoch {record['best_epoch']:g} of {record['epochs_run']:g}){', test ' + shown if shown else ''} "
        f"[{record['seconds']:.1f} s]",
        flush=True,
    )
    return record


def compare_batches(small: list[dict], large: list[dict], n_boot: int = 10_000, target: float = AUC_TARGET) -> dict:
    """Test AUC of the small and the large batch over paired seeds (``small[i]`` and ``large[i]``: one seed):
    per task the mean and median of each (finished runs), the paired shortfall ``small - large`` (pairs where
    both finished) with its 95% bootstrap interval (:func:`mtrank.stats.paired_bootstrap`) and what it supports
    (:func:`mtrank.stats.verdict`), the diverged runs of each, and the target's verdict: ``met`` when the mean
    shortfall is at most ``target`` and no large-batch run diverged (``upper_within_target`` says whether the
    interval's upper end is within it too; with fewer than :data:`mtrank.stats.MIN_PAIRS` pairs the interval
    undercovers and ``interval_reliable`` is false)."""
    if len(small) != len(large):
        raise ValueError(f"paired runs need one seed each: {len(small)} small-batch runs, {len(large)} large")
    pairs = [(a, b) for a, b in zip(small, large) if "test_auc" in a and "test_auc" in b]
    sides = (("small", small), ("large", large))
    failures = {}
    for name, runs in sides:
        diverged = sum("diverged" in r for r in runs)
        failures[name] = {"runs": len(runs), "diverged": diverged, "rate": diverged / len(runs) if runs else math.nan}
        failures[name]["interval"] = wilson_interval(diverged, len(runs))
    out: dict = {"pairs": len(pairs), "failures": failures, "target": target, "tasks": {}}
    tasks = list(pairs[0][0]["test_auc"]) if pairs else []
    for task in tasks:
        finished = {name: [r["test_auc"][task] for r in runs if "test_auc" in r] for name, runs in sides}
        a, b = [p[0]["test_auc"][task] for p in pairs], [p[1]["test_auc"][task] for p in pairs]
        shortfall = paired_bootstrap(a, b, n_boot=n_boot, seed=0)
        out["tasks"][task] = {
            **{name: summarize(values) for name, values in finished.items()},
            "shortfall": shortfall,
            "interval_says": verdict(shortfall, "small batch", "large batch"),
            "interval_reliable": len(pairs) >= MIN_PAIRS,
            "upper_within_target": shortfall["high"] <= target,
            "met": shortfall["estimate"] <= target and failures["large"]["diverged"] == 0,
        }
    out["met"] = bool(tasks) and all(t["met"] for t in out["tasks"].values())
    return out


def auc_study(spec: Spec, args, grids: dict[int, dict[str, list]], splits: tuple, save=lambda study: None) -> dict:
    """The accuracy price of a large batch, as a reviewer would want it:

    1. tuning: every configuration of each batch size's grid (:func:`grid_configs`) trained once at
       :data:`TUNING_SEED`; the one with the best validation AUC (first task) is chosen, on validation only
       (no test AUC is computed), and a chosen knob at the edge of its grid is flagged;
    2. paired reruns: each batch size's chosen configuration at seeds 1..``args.seeds`` (seed = initialisation
       and batch order, the splits fixed), seed by seed;
    3. :func:`compare_batches` of the smallest and the largest batch size, after every seed (a study cut short
       by a time limit keeps its verdict on the pairs it finished).

    ``save(study)`` is called after every run with the study so far."""
    study: dict = {"tuning_seed": TUNING_SEED, "epochs": args.epochs, "patience": args.patience, "batches": {}}
    start = time.perf_counter()
    for batch, grid in grids.items():
        entry = study["batches"][str(batch)] = {"grid": grid, "tuning": [], "paired": []}
        for run in grid_configs(grid):
            entry["tuning"].append(train_run(spec, args, batch, run, TUNING_SEED, splits, test=False))
            save(study)
        finished = [r for r in entry["tuning"] if r["valid"] is not None]
        if not finished:
            raise SystemExit(f"{spec.name} batch {batch}: every configuration of its grid diverged; give smaller lrs")
        best = max(finished, key=lambda r: r["valid"])
        chosen = RunConfig(**{k: best[k] for k in ("lr", "sparse", "sparse_lr", "warmup")})
        entry.update(chosen=dataclasses.asdict(chosen), chosen_valid=best["valid"], edges=grid_edges(grid, chosen))
        edge = f" (at the edge: {'; '.join(entry['edges'])})" if entry["edges"] else ""
        print(f"{spec.name} batch {batch}: chosen on validation {chosen.label()}{edge}", flush=True)
    small, large = str(min(grids)), str(max(grids))
    for seed in range(1, args.seeds + 1):
        for batch in grids:
            entry = study["batches"][str(batch)]
            chosen = RunConfig(**entry["chosen"])
            entry["paired"].append(train_run(spec, args, batch, chosen, seed, splits, test=True))
            study["seconds"] = time.perf_counter() - start
            save(study)
        paired = (study["batches"][small]["paired"], study["batches"][large]["paired"])
        study["comparison"] = {"small": small, "large": large, **compare_batches(*paired)}  # the pairs so far
    study["seconds"] = time.perf_counter() - start
    save(study)
    return study


def auc_lines(study: dict) -> list[str]:
    """The AUC study as markdown: each batch size's chosen configuration and test AUC over the paired seeds,
    the paired shortfall per task with its interval, and the target's verdict."""
    comparison = study.get("comparison")
    tasks = list(comparison["tasks"]) if comparison else []
    lines = [
        f"AUC study: {study['epochs']} epochs, early stopping patience {study['patience'] or 'off'}, configuration "
        f"chosen on validation at seed {study['tuning_seed']}, then paired seeds",
        "",
        "| batch | chosen on validation | valid AUC | at the grid's edge | seeds | diverged |"
        + "".join(f" {t} mean / median |" for t in tasks),
        "|---:|---|---:|---|---:|---:|" + "---:|" * len(tasks),
    ]
    for batch, entry in study["batches"].items():
        if "chosen" not in entry:
            lines.append(f"| {batch} | (tuning not finished: {len(entry['tuning'])} runs) | | | | |")
            continue
        role = {comparison["small"]: "small", comparison["large"]: "large"}.get(batch) if comparison else None
        cells = [
            f"{comparison['tasks'][t][role]['mean']:.4f} / {comparison['tasks'][t][role]['median']:.4f}" if role else ""
            for t in tasks
        ]
        diverged = sum("diverged" in r for r in entry["paired"])
        lines.append(
            f"| {batch} | {RunConfig(**entry['chosen']).label()} | {entry['chosen_valid']:.4f} | "
            f"{'; '.join(entry['edges']) or '-'} | {len(entry['paired'])} | {diverged} |"
            + "".join(f" {c} |" for c in cells)
        )
    lines.append("")
    if not comparison:
        return lines + ["no paired seeds (--seeds 0): no verdict on the target", ""]
    small, large, pairs = comparison["small"], comparison["large"], comparison["pairs"]
    lines += [
        f"| task | shortfall ({small} - {large}), mean of {pairs} pairs | 95% interval | interval says | "
        f"upper end <= {comparison['target']:g} | target |",
        "|---|---:|---|---|---|---|",
    ]
    for task, result in comparison["tasks"].items():
        ci = result["shortfall"]
        lines.append(
            f"| {task} | {ci['estimate']:+.4f} | [{ci['low']:+.4f}, {ci['high']:+.4f}] | {result['interval_says']} | "
            f"{'yes' if result['upper_within_target'] else 'no'} | {'met' if result['met'] else 'NOT met'} |"
        )
    shortfalls = ", ".join(f"{t} {r['shortfall']['estimate']:+.4f}" for t, r in comparison["tasks"].items())
    failed = comparison["failures"]["large"]["diverged"]
    decision = "met" if comparison["met"] else "NOT met"
    lines += [
        "",
        f"target: mean test AUC of batch {large} at most {comparison['target']:g} below batch {small}'s over "
        f"{pairs} paired seeds: shortfall {shortfalls}; {failed} diverged -> {decision}",
    ]
    if pairs < MIN_PAIRS:
        lines.append(f"(fewer than {MIN_PAIRS} pairs: the bootstrap interval undercovers; read it as indicative)")
    return lines + [""]


def parse_lrs(items: list[str], args) -> dict[int, dict[str, list]]:
    """``--lrs BATCH=LR,...``: the grid of the lrs alone, the table's optimizer and lr from the flags."""
    out = {}
    for item in items:
        batch, _, values = item.partition("=")
        if not values:
            raise SystemExit(f"--lrs: {item!r} is not BATCH=LR[,LR...] (e.g. 65536=0.004,0.008)")
        out[int(batch)] = parse_grid(f"{batch}:lr={values}", args)[1]
    return out


def _current_path_ratio(pipeline: dict) -> float:
    """The best whole-run ratio to memory of the current files path (not the before/variant runs)."""
    variants = ("memory", "baseline", "pin_copy", "no_overlap")
    return max(v for k, v in pipeline["ratio_to_memory"].items() if not any(x in k for x in variants))


def _files_table(pipeline: dict, title: str) -> list[str]:
    """One files-to-GPU run of ``benchmarks/data_pipeline.py train``: rates, ratios, its timeline."""
    lines = [
        f"Files to GPU, {title} (W2 layout, {pipeline.get('rows', '?'):,} rows, batch {pipeline['batch_size']}, "
        f"{pipeline['precision']}, {pipeline['device']}); median of {pipeline.get('repeats', '?')} runs; "
        f"steady: from step {pipeline.get('steady_after_step')}",
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
    if timeline := pipeline.get("timeline"):
        lines += [
            "",
            "Timeline (medians; seconds from the start of fit): readers started, first item, steps handed back, end",
            "",
            "| source | readers | 1st item | step 1 | step 200 | last step | end | readers closing |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, t in timeline.items():
            cells = [t.get("readers_started_s"), t.get("first_item_s"), t["steps_s"].get("1")]
            cells += [t["steps_s"].get("200"), t["steps_s"].get("last"), t.get("end_s"), t.get("readers_closing_s")]
            lines.append(f"| {key} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return [*lines, ""]


def summary(folder: Path) -> str:
    """A markdown table of the results in ``folder`` (``data_pipeline.json``, ``w2_batch.json``, ``w3.json``,
    those present), each against its target."""
    lines = []

    def load(name: str) -> dict | None:
        path = folder / name
        return json.loads(path.read_text()) if path.exists() else None

    if check := load("prefetch_check.json"):
        decision = "identical to the CPU path" if check["identical"] else "DIFFERENT from the CPU path"
        lines += [f"check: {check['batches']} batches prefetched to {check['device']}: {decision}", ""]
    if read := load("read.json"):
        lines += [
            f"Readers alone (batch {read['batch_size']}, pinned: {read['pin_memory']})",
            "",
            "| readers, group | rows/s |",
        ]
        lines += ["|---|---:|", *(f"| {k} | {v:,.0f} |" for k, v in read["rows_per_s"].items()), ""]
    runs_of_epochs = {}  # whole epochs: the target's verdict
    for name, title, whole_epochs in (
        ("data_pipeline.json", "runs of {steps:,} steps", False),
        ("data_pipeline_epochs.json", "{epochs:g} whole epochs ({steps:,} steps)", True),
        ("data_pipeline_epoch.json", "{epochs:g} whole epoch ({steps:,} steps)", True),
    ):
        if (pipeline := load(name)) is None:
            continue
        lines += _files_table(pipeline, title.format(**pipeline))
        if whole_epochs:
            runs_of_epochs[f"{pipeline.get('rows', 0):,} rows, " + title.format(**pipeline)] = pipeline
    if runs_of_epochs:
        ratios = {title: _current_path_ratio(p) for title, p in runs_of_epochs.items()}
        verdict = "met" if min(ratios.values()) >= 0.8 else "NOT met"
        shown = ", ".join(f"{title}: {ratio:.2f}x" for title, ratio in ratios.items())
        lines += [f"target: files >= 0.8x memory over whole runs of whole epochs: {shown} -> {verdict}", ""]
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
            decision = "met" if fastest >= target else "NOT met"
            lines += ["", f"target: >= {target / 1e6:g}M samples/s: best {fastest / 1e6:.2f}M -> {decision}"]
        lines.append("")
        if "auc" in result and "batches" in result["auc"]:
            lines += auc_lines(result["auc"])
        elif "auc" in result:  # a study of one seed per lr (before the paired seeds)
            lines += ["| batch | best lr | test AUC |", "|---:|---:|---|"]
            for batch, study in result["auc"].items():
                aucs = ", ".join(f"{k} {v:.4f}" for k, v in study["test_auc"].items())
                lines.append(f"| {batch} | {study['best_lr']:g} | {aucs} |")
            studies = list(result["auc"].values())
            # positive: the largest batch is behind the first; a large batch that is better is no loss
            gaps = [studies[0]["test_auc"][k] - studies[-1]["test_auc"][k] for k in studies[0]["test_auc"]]
            decision = "met" if max(gaps) <= AUC_TARGET else "NOT met"
            lines += [
                "",
                f"target (one seed): test AUC of the largest batch at most 0.002 below the first's: largest "
                f"shortfall {max(gaps):+.4f} -> {decision}",
                "",
            ]
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
        choices=SPARSE_CHOICES,
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
    parser.add_argument(
        "--grid",
        nargs="*",
        default=[],
        metavar="BATCH:KEY=V,V;...",
        help="AUC study: one search space per batch size, e.g. '4096:lr=0.001,0.002,0.004;sparse=dense,"
        "rowwise_adagrad;sparse_lr=0.02,0.05'. Keys: lr (Adam's, the dense parameters), sparse (the table's "
        "optimizer: dense = Adam, rowwise_adagrad, lazy_adam), sparse_lr (the table's lr, for each sparse "
        "optimizer; 0 = lr), dense_table_lr (the table's lr under Adam, its own parameter group; "
        "0 = lr), warmup (fraction of the steps, default 0.05). Every configuration (lr x warmup x "
        "table) is trained at seed 0 and the best on validation (first task's AUC) chosen; every batch size "
        "must search the same table optimizers and as many values of each knob",
    )
    parser.add_argument(
        "--lrs", nargs="*", default=[], help="AUC study, short for --grid BATCH:lr=LR,... (the table of --sparse)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=0,
        help="AUC study: rerun each batch size's chosen configuration at seeds 1..K (paired: one init and one "
        "batch order per seed) and compare the smallest and largest batch (mean, median, paired 95%% interval)",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=0,
        help="AUC study: stop a run after this many epochs without a better validation AUC (0 = never)",
    )
    parser.add_argument("--epochs", type=int, default=4, help="AUC study: epochs per run")
    parser.add_argument("--auc-rows", type=int, default=4_000_000, help="AUC study: training rows")
    parser.add_argument(
        "--eval-rows", type=int, default=0, help="AUC study: validation rows and test rows (0: a quarter of --auc-rows)"
    )
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
        args.matmul_size, args.auc_rows, args.epochs, args.eval_rows = 128, 2048, 1, 0
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
        free_memory(device)
    grids = {**dict(parse_grid(item, args) for item in args.grid), **parse_lrs(args.lrs, args)}
    if grids:
        if args.quick:
            grids = {min(b, 256): grid for b, grid in grids.items()}
        check_same_search_space(grids)
        rows, held_out = args.auc_rows, args.eval_rows or args.auc_rows // 4
        splits = (spec.data(rows, 11), spec.data(held_out, 12), spec.data(held_out, 13))  # fixed splits
        splits = tuple(split.to(device) for split in splits)  # once, not at every run and evaluation

        def save(study: dict) -> None:  # after every run: a study cut short by a time limit keeps what it did
            results["auc"] = study
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(results, indent=2, default=str))

        study = auc_study(spec, args, grids, splits, save)
        print("\n".join(auc_lines(study)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
