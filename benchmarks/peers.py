"""Train the same MMoE with mtrank, DeepCTR-Torch and torch-rechub, alternating, and compare speed and memory.

    make bench                                   # creates .venv-peers (torch pinned) and runs this
    .venv-peers/bin/python benchmarks/peers.py --json docs/results/peers.json
    .venv-peers/bin/python benchmarks/peers.py --device cuda --json docs/results/peers-h100.json

Per workload (W1, W2; see ``_peers/workloads.py``) and per round, every implementation (in rotated order)
trains one warm-up epoch, then one timed epoch over the same ``--train-batches`` batches; samples/s per
round, median over rounds, and mtrank's ratio to each peer (median of the per-round ratios, so slow phases
of a shared machine hit both sides of a ratio alike). Then p50 latency of scoring 1,000 candidates and 1
candidate (alternating calls), peak memory of one training epoch (a fresh child process per implementation:
RSS high-water mark above the process's RSS before training, polled every ms; on CUDA
``max_memory_allocated``), and the measured GEMM rate of this machine at the workload's expert shape in fp32
and bf16, with each run's fraction of it (training FLOPs per sample ~ 3x the forward matmul FLOPs).

``--auc-check`` trains mtrank on W2 in fp32 and bf16 (same seed, same data) and reports test AUC per task.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers draw progress bars that cannot be turned off otherwise

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers.adapters import ADAPTERS  # noqa: E402
from _peers.workloads import WORKLOADS, make_data  # noqa: E402

DEFAULT_TRAIN_BATCHES = {"cpu": {"W1": 200, "W2": 12}, "cuda": {"W1": 400, "W2": 120}}
LATENCY_CALLS = {"cpu": 30, "cuda": 100}


def quiet():
    """Swallow the peers' prints (DeepCTR prints the device and a summary per fit, rechub per epoch)."""
    return contextlib.redirect_stdout(io.StringIO())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def implementations(workload: str, device: str, precision: str) -> list[tuple[str, str, str]]:
    """(label, adapter, precision) rows. mtrank runs bf16 autocast on W2 unless told otherwise, plus fp32."""
    mt_precision = precision if precision != "auto" else ("bf16" if workload == "W2" else "fp32")
    rows = [("mtrank", "mtrank", mt_precision)]
    if mt_precision != "fp32":
        rows.append(("mtrank-fp32", "mtrank", "fp32"))
    if device == "cuda":  # what the CUDA graph buys: the same Trainer with the eager step
        rows.append(("mtrank-eager", "mtrank-eager", mt_precision))
    rows += [("deepctr", "deepctr", "fp32"), ("rechub", "rechub", "fp32")]
    return rows


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, device: str, reps: int = 10) -> tuple[float, float]:
    """GFLOP/s of ``[m, k] @ [k, n]``, median over calls: per wall second and per CPU second."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    wall, cpu = [], []
    for _ in range(reps):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        a @ b
        sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(max(time.process_time() - cpu_start, 1e-9))
    flop = 2 * m * k * n / 1e9
    return flop / statistics.median(wall), flop / statistics.median(cpu)


def bench_workload(name: str, args) -> dict:
    wl = WORKLOADS[name]
    batches = args.train_batches or DEFAULT_TRAIN_BATCHES[args.device][name]
    train = make_data(wl, wl.batch_size * batches, seed=0)
    # warm-up epoch: on CPU two batches of other rows; on CUDA the timed rows themselves, so that mtrank's
    # timed epoch replays the CUDA graph captured in the warm-up (a graph is bound to its input tensors)
    warm = make_data(wl, wl.batch_size * 2, seed=1) if args.device == "cpu" else train
    score_1k = make_data(wl, 1000, seed=2)
    score_1 = score_1k[:1]
    rows = implementations(name, args.device, args.precision)
    impls, native = {}, {}
    for label, adapter, precision in rows:
        with quiet():
            impl = ADAPTERS[adapter](wl, device=args.device, precision=precision, seed=0)
        impls[label] = impl
        native[label] = {k: impl.prepare(v) for k, v in (("train", train), ("1k", score_1k), ("1", score_1))}
        native[label]["warm"] = native[label]["train"] if warm is train else impl.prepare(warm)
    labels = [r[0] for r in rows]
    params = {label: impls[label].parameters() for label in labels}
    print(
        f"\n== {name}: {len(train):,} timed training samples, batch {wl.batch_size}, "
        f"{args.rounds} rounds, {torch.get_num_threads()} threads, device {args.device}"
    )
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()))

    speed: dict[str, list[float]] = {label: [] for label in labels}
    cpu_speed: dict[str, list[float]] = {label: [] for label in labels}  # samples per CPU-second
    for r in range(args.rounds):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]
        for label in order:
            impl = impls[label]
            with quiet():
                impl.train_epoch(native[label]["warm"])  # warm-up epoch
                sync(args.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                impl.train_epoch(native[label]["train"])
                sync(args.device)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            speed[label].append(len(train) / seconds)
            cpu_speed[label].append(len(train) / cpu_seconds)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in speed.items()), flush=True)

    latency: dict[str, dict[str, float]] = {label: {} for label in labels}
    calls = LATENCY_CALLS[args.device]
    for key in ("1k", "1"):
        times: dict[str, list[float]] = {label: [] for label in labels}
        for label in labels:
            with quiet():
                impls[label].predict(native[label][key])  # warm-up
        for _ in range(calls):
            for label in labels:
                with quiet():
                    start = time.perf_counter()
                    impls[label].predict(native[label][key])
                    sync(args.device)
                times[label].append(time.perf_counter() - start)
        for label in labels:
            latency[label][key] = statistics.median(times[label]) * 1e3

    memory = {label: peak_memory(name, adapter, precision, args) for label, adapter, precision in rows}

    in_dim, hidden = wl.input_dim, wl.expert_hidden[0] * wl.num_experts
    gemm: dict = {"shape": [wl.batch_size, in_dim, hidden]}
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates = [gemm_rate(wl.batch_size, in_dim, hidden, dtype, args.device) for _ in range(3)]
        gemm[f"{key}_gflops"] = statistics.median(r[0] for r in rates)
        gemm[f"{key}_gflops_per_cpu_s"] = statistics.median(r[1] for r in rates)
    flops = wl.train_flops()
    result = {
        "train_samples": len(train),
        "batch_size": wl.batch_size,
        "train_flops_per_sample": flops,
        "gemm": gemm,
        "implementations": {},
    }
    base, cpu_base = speed["mtrank"], cpu_speed["mtrank"]
    for label, _, precision in rows:
        s = speed[label]
        rate = gemm[f"{precision}_gflops"]
        cpu_rate = gemm[f"{precision}_gflops_per_cpu_s"]
        entry = {
            "precision": precision,
            "parameters": params[label],
            "samples_per_s": statistics.median(s),
            "samples_per_s_rounds": s,
            "samples_per_cpu_s": statistics.median(cpu_speed[label]),
            "samples_per_cpu_s_rounds": cpu_speed[label],
            "gflops": statistics.median(s) * flops / 1e9,
            "fraction_of_gemm_rate": statistics.median(s) * flops / 1e9 / rate,
            "fraction_of_gemm_rate_cpu_time": statistics.median(cpu_speed[label]) * flops / 1e9 / cpu_rate,
            "latency_ms_1000": latency[label]["1k"],
            "latency_ms_1": latency[label]["1"],
            "peak_memory_mb": memory[label],
        }
        if label != "mtrank":
            entry["mtrank_speedup"] = statistics.median(a / b for a, b in zip(base, s))
            entry["mtrank_speedup_cpu_time"] = statistics.median(a / b for a, b in zip(cpu_base, cpu_speed[label]))
        result["implementations"][label] = entry
    print_table(name, result)
    return result


def print_table(name: str, result: dict) -> None:
    g = result["gemm"]
    print(
        f"{name} GEMM {g['shape']}: fp32 {g['fp32_gflops']:.1f} GFLOP/s "
        f"({g['fp32_gflops_per_cpu_s']:.1f} per CPU-s), bf16 {g['bf16_gflops']:.1f} GFLOP/s "
        f"({g['bf16_gflops_per_cpu_s']:.1f} per CPU-s); "
        f"training {result['train_flops_per_sample'] / 1e6:.3f} MFLOP/sample"
    )
    print(
        f"{'impl':<12} {'prec':>5} {'params':>10} {'samples/s':>11} {'mtrank x':>9} {'samples/CPU-s':>14} "
        f"{'mtrank x':>9} {'% GEMM':>7} {'p50 1k ms':>10} {'p50 1 ms':>9} {'peak MB':>8}"
    )
    for label, e in result["implementations"].items():
        ratio = f"{e['mtrank_speedup']:.2f}" if "mtrank_speedup" in e else "-"
        cpu_ratio = f"{e['mtrank_speedup_cpu_time']:.2f}" if "mtrank_speedup" in e else "-"
        print(
            f"{label:<12} {e['precision']:>5} {e['parameters']:>10,} {e['samples_per_s']:>11,.0f} {ratio:>9} "
            f"{e['samples_per_cpu_s']:>14,.0f} {cpu_ratio:>9} "
            f"{100 * e['fraction_of_gemm_rate_cpu_time']:>6.1f}% "
            f"{e['latency_ms_1000']:>10.2f} {e['latency_ms_1']:>9.2f} {e['peak_memory_mb']:>8.1f}"
        )


def peak_memory(workload: str, adapter: str, precision: str, args) -> float:
    """Peak memory (MB) of one training epoch, measured in a fresh child process."""
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        adapter,
        "--workloads",
        workload,
        "--precision",
        precision,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    if args.train_batches:
        cmd += ["--train-batches", str(args.train_batches)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def memory_child(args) -> None:
    wl = WORKLOADS[args.workloads[0]]
    batches = args.train_batches or DEFAULT_TRAIN_BATCHES[args.device][wl.name]
    with quiet():
        impl = ADAPTERS[args.memory_child](wl, device=args.device, precision=args.precision, seed=0)
        data = impl.prepare(make_data(wl, wl.batch_size * batches, seed=0))
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with quiet():
            impl.train_epoch(data)
        torch.cuda.synchronize()
        print((torch.cuda.max_memory_allocated() - before) / 2**20)
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before = rss()
    peak = [before]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    with quiet():
        impl.train_epoch(data)
    done.set()
    thread.join()
    peak[0] = max(peak[0], rss())
    print((peak[0] - before) / 2**20)


def auc_check(args) -> dict:
    """mtrank on W2, fp32 vs bf16 autocast: same seed, same data, test AUC per task."""
    from mtrank.config import TrainConfig
    from mtrank.evaluate import evaluate
    from mtrank.model import MultiTaskModel
    from mtrank.train import Trainer

    wl = WORKLOADS["W2"]
    data = make_data(wl, args.auc_rows, seed=10)
    train, valid, test = data.split((0.8, 0.1, 0.1), seed=0)
    out = {"rows": args.auc_rows, "epochs": args.auc_epochs}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = MultiTaskModel(wl.model_config())
        config = TrainConfig(
            lr=1e-3,
            batch_size=wl.batch_size,
            epochs=args.auc_epochs,
            precision=precision,
            device=args.device,
            progress=False,
            monitor="auc/t0",
        )
        result = Trainer(model, config).fit(train, valid)
        metrics = evaluate(model, test.to(args.device))
        out[precision] = {k: v for k, v in metrics.items() if k.startswith("auc")}
        out[precision]["samples_per_s"] = result.samples_per_second
        print(
            f"W2 AUC check {precision}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in out[precision].items() if k.startswith("auc"))
        )
    out["max_abs_auc_diff"] = max(abs(out["fp32"][k] - out["bf16"][k]) for k in out["fp32"] if k.startswith("auc"))
    print(f"W2 AUC check: max |AUC(bf16) - AUC(fp32)| = {out['max_abs_auc_diff']:.4f}")
    return out


def machine_info() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Flags"):
                value = value.strip()
                if key.strip() == "Flags":
                    value = " ".join(f for f in value.split() if f.startswith(("avx512_bf16", "amx", "avx512f")))
                info[key.strip()] = value
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("deepctr-torch", "torch-rechub", "mtrank"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=sorted(WORKLOADS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, the same for everyone")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-batches", type=int, default=0, help="timed batches per epoch (0 = default)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="mtrank's precision (auto: bf16 autocast on W2, fp32 on W1)",
    )
    parser.add_argument("--auc-check", action="store_true", help="also compare W2 test AUC, fp32 vs bf16")
    parser.add_argument("--auc-rows", type=int, default=200_000)
    parser.add_argument("--auc-epochs", type=int, default=2)
    parser.add_argument("--json", default="", help="write all figures here")
    parser.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "workloads": {},
    }
    print(json.dumps(report["machine"]))
    for name in args.workloads:
        report["workloads"][name] = bench_workload(name, args)
    if args.auc_check:
        report["auc_check"] = auc_check(args)
    report["machine"]["loadavg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
