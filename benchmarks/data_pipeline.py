"""Data-path benchmark: encoding rows/s, training samples/s from Parquet vs in memory, streaming memory.

The data is generated in the W2 layout (Criteo-like: 26 categorical columns ``C1..C26``, 13 numeric
``I1..I13``, two labels ``click`` and ``conversion``) as a directory of Parquet shards (1M rows each,
128k-row row groups).
Nothing is committed: data goes under ``--data`` (default /tmp/mtrank-w2).

    python benchmarks/data_pipeline.py generate --rows 10000000        # writes /tmp/mtrank-w2/rows-10000000/
    python benchmarks/data_pipeline.py encode --rows 1000000 --passes 3  # encoding rows/s
    python benchmarks/data_pipeline.py train --rows 10000000 --steps 400 --repeats 3 --workers 1 --threads 1
    python3 benchmarks/data_pipeline.py train --rows 2000000 --steps 300 --batch-size 4096 --workers 1 4 8 \
        --precision bf16 --repeats 2 --baseline                      # on a GPU: files vs memory, graphed step
    python benchmarks/data_pipeline.py read --rows 1000000 --workers 1 2 --groups 1 16  # readers alone, rows/s
    python benchmarks/data_pipeline.py read --rows 1000000 --workers 0 1 --before-src /tmp/main-src --repeats 3
    python benchmarks/data_pipeline.py memory --rows 1000000 10000000     # peak RSS of a streaming epoch
    python benchmarks/data_pipeline.py memory --rows 1000000 10000000 --with-training --threads 1

``--json PATH`` (before the subcommand) also writes the results as JSON. The figures and the commands that
gave them are in docs/data.md.

Each measurement that compares memory runs in a fresh subprocess (peak RSS = ``ru_maxrss`` of the process and
of its reader workers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

CATEGORICAL = [f"C{i}" for i in range(1, 27)]
NUMERIC = [f"I{i}" for i in range(1, 14)]
SHARD_ROWS = 1_000_000
ROW_GROUP = 131_072
# vocabulary sizes of the 26 categorical columns: a few large (ids), most small, as in Criteo
VOCABS = [
    1000,
    500,
    200_000,
    100_000,
    300,
    20,
    10_000,
    500,
    3,
    50_000,
    5000,
    150_000,
    3000,
    25,
    10_000,
    100_000,
    10,
    4000,
    2000,
    4,
    120_000,
    15,
    15,
    50_000,
    80,
    40_000,
]


def data_dir(root: str, rows: int) -> Path:
    return Path(root) / f"rows-{rows}"


def generate_shard(rows: int, seed: int) -> pa.Table:
    """``rows`` rows of the W2 layout: Zipf-like categorical ids, log-normal numerics with 5% nulls, and two
    labels from a logistic model of a few columns (conversion only where clicked)."""
    rng = np.random.default_rng(seed)
    columns = {}
    signal = np.zeros(rows)
    for name, vocab in zip(CATEGORICAL, VOCABS):
        ids = np.minimum((rng.pareto(1.2, rows) * vocab / 20).astype(np.int64), vocab - 1)
        columns[name] = ids
        if name in ("C1", "C5", "C9"):
            signal += np.where(ids % 3 == 0, 0.6, -0.3)
    for name in NUMERIC:
        x = rng.lognormal(1.0, 1.2, rows)
        if name in ("I1", "I3"):
            signal += 0.3 * (np.log1p(x) - 1.3)
        mask = rng.random(rows) < 0.05
        columns[name] = pa.array(x, mask=mask)
    click = rng.random(rows) < 1 / (1 + np.exp(-(signal - 1.5)))
    conversion = click & (rng.random(rows) < 1 / (1 + np.exp(-(0.5 * signal - 2.0))))
    columns["click"] = click.astype(np.int8)
    columns["conversion"] = conversion.astype(np.int8)
    return pa.table(columns)


def generated(root: str, rows: int) -> Path:
    """The data directory of ``rows`` rows under ``root``, generated first if it is not there."""
    path = data_dir(root, rows)
    if not path.is_dir():
        cmd_generate(argparse.Namespace(data=root, rows=rows))
    return path


def cmd_generate(args) -> dict:
    out = data_dir(args.data, args.rows)
    if out.is_dir() and sum(pq.read_metadata(p).num_rows for p in out.glob("*.parquet")) == args.rows:
        print(f"{out}: already there")
        return {"path": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from tqdm.auto import tqdm

    for shard, first in enumerate(tqdm(range(0, args.rows, SHARD_ROWS), desc="generate", unit="shard")):
        n = min(SHARD_ROWS, args.rows - first)
        pq.write_table(generate_shard(n, seed=shard), out / f"part-{shard:05d}.parquet", row_group_size=ROW_GROUP)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.glob("*.parquet"))
    print(f"wrote {args.rows:,} rows to {out} ({size / 1e6:.0f} MB) in {seconds:.0f} s")
    return {"path": str(out), "bytes": size, "seconds": seconds}


def experiment(path: Path, batch_size: int = 2048, workers: int = 1):
    from mtrank.config.experiment import experiment_from_dict

    return experiment_from_dict(
        {
            "data": {
                "train": str(path),
                "valid": str(path),
                "split": {"method": "files"},
                "streaming": True,
                "shuffle_buffer": 200_000,
                "read_batch_rows": 131_072,
                "workers": workers,
            },
            "features": {
                "categorical": CATEGORICAL,
                "numeric": [{"name": n, "log1p": True} for n in NUMERIC],
            },
            "tasks": [{"name": "click"}, {"name": "conversion"}],
            "model": {
                "inputs": {"embedding_dim": 8},
                "block": {"type": "mmoe", "num_experts": 4},
                "experts": {"hidden": [64]},
                "towers": {"hidden": [16]},
            },
            "train": {"batch_size": batch_size, "lr": 0.001, "progress": False},
        }
    )


def fitted_encoder(path: Path, rows: int = 1_000_000):
    from mtrank.data.encoders import FeatureEncoder
    from mtrank.data.readers import head_rows

    cfg = experiment(path)
    table = head_rows(ds.dataset(str(path)), cfg.input_columns(), rows)
    return cfg, FeatureEncoder(cfg.features).fit(table), table


def cmd_encode(args) -> dict:
    """Rows/s of FeatureEncoder.transform on an in-memory table, and of reading + encoding the directory."""
    path = data_dir(args.data, args.rows)
    cfg, encoder, table = fitted_encoder(path, min(args.rows, 1_000_000))
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        encoder.transform(table)
        best = max(best, table.num_rows / (time.perf_counter() - start))
    read_encode = 0.0
    for _ in range(args.passes):  # the first pass also warms the file cache and Arrow's allocator
        start = time.perf_counter()
        rows = 0
        for batch in ds.dataset(str(path)).to_batches(columns=cfg.input_columns(), batch_size=131_072):
            encoder.transform(batch)
            rows += batch.num_rows
        read_encode = max(read_encode, rows / (time.perf_counter() - start))
    out = {
        "encode_rows_per_s": best,
        "read_encode_rows_per_s": read_encode,
        "rows": rows,
        "vocab_sizes": encoder.vocab_sizes,
    }
    print(
        f"encode (in memory, {table.num_rows:,} rows, best of 3): {best:,.0f} rows/s; "
        f"read + encode ({rows:,} rows from Parquet, best of {args.passes} passes): {read_encode:,.0f} rows/s"
    )
    return out


class _SteadyClock:  # a mtrank.train.callbacks.Callback (not imported here: mtrank is imported late)
    """A callback: the time of step ``after`` (the device synchronised first), so that a run's rate can be taken
    from that step on, without reader start-up, CUDA-graph warm-up and capture. ``timeline``: also the time each
    step was handed back to the loop (host time, no synchronisation), from the start of ``fit``."""

    def __init__(self, after: int, device, timeline: bool = False) -> None:
        self.after, self.device, self.timeline = after, device, timeline
        self.at: float | None = None
        self.begin = 0.0
        self.steps: list[float] = []

    def on_train_begin(self, info) -> None:
        self.at, self.begin, self.steps = None, time.perf_counter(), []

    def on_step(self, step: int, loss) -> None:
        if self.timeline:
            self.steps.append(time.perf_counter())
        if step == self.after:
            _synchronize(self.device)
            self.at = time.perf_counter()

    def on_train_end(self, results) -> None:
        _synchronize(self.device)
        self.end = time.perf_counter()

    def on_evaluate(self, step: int, records) -> None:
        pass


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


TIMELINE_STEPS = (1, 4, 5, 50, 100, 200, 400, 800)  # steps whose times the timeline reports (4: the warm-up's
# last eager step, 5: the captured graph's first replay, under the default 3 warm-up steps)


def _arrivals_recorded(make_readers, arrivals: list):
    """``StreamSource.readers`` whose readers' start and items' arrivals are appended to ``arrivals``."""

    def readers(epoch: int):
        made = make_readers(epoch)
        arrivals.append((made.started, epoch, -1))

        def recorded(items):
            for item in items:
                arrivals.append((time.perf_counter(), epoch, int(item.sizes.sum())))
                yield item

        timed = _TimedReaders(made, recorded)
        close = timed.close

        def recorded_close() -> None:  # the first close of an epoch's readers: when it began and ended
            began = time.perf_counter()
            close()
            if not any(e == epoch and rows == -2 for _, e, rows in arrivals):
                arrivals.extend([(began, epoch, -2), (time.perf_counter(), epoch, -3)])

        timed.close = recorded_close
        return timed

    return readers


def _timeline(clock: _SteadyClock, arrivals: list, trace: str | None = None) -> dict:
    """Seconds from the start of ``fit`` to: the steps of :data:`TIMELINE_STEPS` and the last (host time, each
    step handed back to the loop), the first epoch's readers started and its first item, and the seconds spent
    closing readers; with ``trace`` (a reader trace file: ``EncodedStream.trace``) each step of the first epoch's
    readers to their first item, median over readers (and the earliest and latest reader's)."""
    steps = {str(k): clock.steps[k - 1] - clock.begin for k in TIMELINE_STEPS if k <= len(clock.steps)}
    steps["last"] = clock.steps[-1] - clock.begin
    out: dict = {"steps_s": steps, "end_s": clock.end - clock.begin}
    if arrivals:
        started = [t for t, e, rows in arrivals if rows == -1 and e == 0]
        items = [(t, rows) for t, e, rows in arrivals if rows >= 0]
        out["readers_started_s"] = (started[0] if started else arrivals[0][0]) - clock.begin
        out["first_item_s"] = items[0][0] - clock.begin
        closes = [(t, rows) for t, e, rows in arrivals if rows in (-2, -3)]
        out["readers_closing_s"] = sum(t if rows == -3 else -t for t, rows in closes)  # every epoch's close()
    if trace and Path(trace).exists():
        lines = [json.loads(line) for line in Path(trace).read_text().splitlines()]
        first = [r for r in lines if r["epoch"] == min(r["epoch"] for r in lines)]
        events = [k for k in first[0] if k not in ("pid", "worker", "epoch")]
        out["reader_s"] = {k: float(np.median([r[k] - clock.begin for r in first if k in r])) for k in events}
        out["reader_first_last_s"] = {  # the first reader's, the last one's
            k: [float(f(r[k] for r in first if k in r)) - clock.begin for f in (min, max)] for k in events
        }
        Path(trace).unlink()
    return out


def _median_timeline(runs: list[dict]) -> dict:
    def median(values):  # of numbers, or element by element of lists
        middle = np.median(np.array(values, dtype=float), axis=0)
        return middle.tolist() if middle.ndim else float(middle)

    out: dict = {}
    for name in runs[0]:
        if isinstance(runs[0][name], dict):
            out[name] = {k: median([r[name][k] for r in runs if k in r[name]]) for k in runs[0][name]}
        elif not isinstance(runs[0][name], list):
            out[name] = median([r[name] for r in runs])
    return out


def _print_timeline(timeline: dict) -> None:
    marks = [str(k) for k in TIMELINE_STEPS] + ["last"]
    print("timeline (medians, seconds from the start of fit; host time when each step was handed back):")
    head = f"{'':>29} {'readers':>8} {'1st item':>8} " + " ".join(f"{'step ' + m:>9}" for m in marks)
    print(head + f" {'end':>7} {'closing':>7}")
    for key, t in timeline.items():
        line = (
            f"{key:>29} {t.get('readers_started_s', float('nan')):>8.3f} {t.get('first_item_s', float('nan')):>8.3f} "
        )
        line += " ".join(f"{t['steps_s'].get(m, float('nan')):>9.3f}" for m in marks)
        print(line + f" {t['end_s']:>7.3f} {t.get('readers_closing_s', float('nan')):>7.3f}")
        if "reader_s" in t:
            print(f"{'readers (median)':>29} " + ", ".join(f"{k} {v:.3f}" for k, v in t["reader_s"].items()))
            spans = t["reader_first_last_s"].items()
            print(f"{'(earliest, latest)':>29} " + ", ".join(f"{k} {a:.3f}-{b:.3f}" for k, (a, b) in spans))


def cmd_train(args) -> dict:
    """Samples/s of one model and step count: the Trainer on in-memory TensorData (moved to the device once) vs
    streamed from Parquet by 0..N reader processes (pinned groups of batches, prefetched to the device; with
    ``--baseline`` also one batch per item, unpinned: the path before the prefetcher).

    Robust to a noisy machine: ``--warmup-runs`` runs of every path first, not counted (the first run of a
    process pays for CUDA's and the allocator's start); then ``--repeats`` rounds, the order of the paths
    reversed every other round (memory first, then last), the median kept. Two rates per run: over the whole
    ``fit`` (``samples_per_s``: reader start-up and graph capture included) and from step ``--steady-after``
    on (``steady_samples_per_s``: the device synchronised at that step and at the end). ``--epochs E`` runs E
    whole epochs of the files (E x ceil(rows / batch size) steps, the in-memory path the same steps over its
    rows); ``--no-overlap-workers`` adds runs whose epochs do not overlap (each epoch's readers start when it
    does: ``StreamSource(ahead=0)``, the path before)."""
    import torch

    from mtrank.data import streaming
    from mtrank.data.splits import encode_table
    from mtrank.data.streaming import EncodedStream
    from mtrank.data.tensors import TensorData
    from mtrank.model import MultiTaskModel
    from mtrank.train import Trainer
    from mtrank.train.sources import StreamSource

    path = generated(args.data, args.rows)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, encoder, table = fitted_encoder(path, min(args.rows, 1_000_000))
    if args.epochs:
        args.steps = args.epochs * -(-args.rows // args.batch_size)
    rows_needed = args.steps * args.batch_size
    memory_data: TensorData = encode_table(encoder, table.slice(0, rows_needed), cfg, "w2")
    del table
    train_cfg = cfg.train
    train_cfg.batch_size, train_cfg.steps, train_cfg.eval_every = args.batch_size, args.steps, 10**9
    train_cfg.precision, train_cfg.device = args.precision, args.device
    model_cfg = cfg.model_config(encoder.num_dense, encoder.vocab_sizes)
    steady_after = min(args.steady_after, args.steps - 1)
    variants = [("memory", None, None, None, None)]
    variants += [(f"parquet_workers_{w}", w, args.group, None, None) for w in args.workers]
    if args.baseline:
        variants += [(f"parquet_workers_{w}_baseline", w, 1, False, None) for w in args.workers]
    variants += [(f"parquet_workers_{w}_pin_copy", w, args.group, None, None) for w in args.pin_copy_workers]
    variants += [(f"parquet_workers_{w}_no_overlap", w, args.group, None, 0) for w in args.no_overlap_workers]
    results: dict[str, list[float]] = {}
    steady: dict[str, list[float]] = {}
    paths: dict[str, str] = {}
    timelines: dict[str, list[dict]] = {}
    device = None
    for round_ in range(-args.warmup_runs, args.repeats):
        for key, workers, group, pin, ahead in variants if round_ % 2 == 0 else variants[::-1]:
            clock = _SteadyClock(steady_after, torch.device("cpu"), timeline=args.timeline)
            arrivals: list[tuple[float, int, int]] = []  # (time, epoch, rows): -1 rows = the epoch's readers started
            trainer = Trainer(MultiTaskModel(model_cfg, seed=0), train_cfg, callbacks=[clock])
            device = clock.device = trainer.device
            if workers is None:
                train = memory_data
            else:
                cfg.data.workers = workers
                stream = EncodedStream(str(path), cfg, encoder, args.batch_size, seed=max(round_, 0))
                rows = stream.count_rows()
                train = StreamSource(
                    stream, workers, device, rows, args.prefetch, group=group, pin_memory=pin, ahead=ahead
                )
                if args.timeline:
                    train.readers = _arrivals_recorded(train.readers, arrivals)
                    stream.trace = str(Path(args.data) / f"reader-trace-{os.getpid()}.jsonl")
                    Path(stream.trace).unlink(missing_ok=True)
            streaming.PAGE_LOCK = not key.endswith("_pin_copy")  # pin_copy: items copied into pinned memory
            result = trainer.fit(train)
            if round_ < 0:  # a warm-up run
                continue
            results.setdefault(key, []).append(result.samples_per_second)
            if clock.at is not None:
                steady_rate = (result.steps - steady_after) * args.batch_size / (clock.end - clock.at)
                steady.setdefault(key, []).append(steady_rate)
            paths[key] = trainer.step_path
            if args.timeline:
                trace = stream.trace if workers is not None else None
                timelines.setdefault(key, []).append(_timeline(clock, arrivals, trace))
    summary = {k: float(np.median(v)) for k, v in results.items()}
    steady_summary = {k: float(np.median(v)) for k, v in steady.items()}
    print(
        f"median of {args.repeats} rounds after {args.warmup_runs} warm-up round(s); steady: from step {steady_after}"
    )
    for key, value in summary.items():
        ratio = value / summary["memory"]
        line = f"{key:>29}: {value:>10,.0f} samples/s ({ratio:.2f} x in-memory, {paths[key]})"
        if key in steady_summary:
            steady_ratio = steady_summary[key] / steady_summary["memory"]
            line += f"; steady {steady_summary[key]:>10,.0f} ({steady_ratio:.2f} x)"
        print(f"{line}  runs {np.round(results[key])}")
    timeline = {key: _median_timeline(runs) for key, runs in timelines.items()}
    if timeline:
        _print_timeline(timeline)
    return {
        "timeline": timeline,
        "timeline_runs": timelines,
        "samples_per_s": summary,
        "ratio_to_memory": {k: v / summary["memory"] for k, v in summary.items()},
        "steady_samples_per_s": steady_summary,
        "steady_ratio_to_memory": {k: v / steady_summary["memory"] for k, v in steady_summary.items()},
        "steady_after_step": steady_after,
        "step_path": paths,
        "runs": results,
        "steady_runs": steady,
        "warmup_runs": args.warmup_runs,
        "repeats": args.repeats,
        "rows": args.rows,
        "steps": args.steps,
        "epochs": args.epochs or args.steps * args.batch_size / args.rows,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "device": str(device),
        "group": args.group,
        "prefetch": args.prefetch,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def interleaved_runs(
    command: str, settings: dict[str, list[str]], repeats: int, before_src: str | None
) -> tuple[dict[str, str], dict[str, dict[str, list[dict]]]]:
    """Each setting (name: the arguments of ``command``, a hidden subcommand that prints one JSON line) run
    ``repeats`` times, each in a fresh process, with this checkout's ``mtrank`` ("after") and, with
    ``before_src``, the package under that folder ("before"), interleaved run by run (a shared machine's load
    falls on both). Returns the sources and ``{source: {setting: [run, ...]}}``."""
    import mtrank

    sources = {"after": str(Path(mtrank.__file__).resolve().parents[1])}
    if before_src:
        sources = {"before": str(Path(before_src).resolve()), **sources}
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in sources}
    for _ in range(repeats):
        for setting, arguments in settings.items():
            for name, src in sources.items():
                env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
                cmd = [sys.executable, __file__, command, *arguments]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                runs[name].setdefault(setting, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    return sources, runs


def cmd_read(args) -> dict:
    """Rows/s of the readers alone (no training): one epoch of the directory through ``stream_loader`` (what the
    trainer's process receives: batches, ids int64) for each number of reader processes and each group (batches
    per item sent between processes), pinned or not. Each epoch runs in a fresh process (``_read``), which also
    reports the CPU seconds of the trainer's process and of its readers (steadier than rows/s on a shared
    machine). With ``--before-src DIR`` the same epochs run with the ``mtrank`` package under DIR (e.g. the
    ``src`` of ``git archive main``), interleaved with this checkout's, repeat by repeat.

    The epoch's rows/s includes the readers' start-up: processes started, and each reader's shuffle buffer
    (``data.shuffle_buffer`` rows, decoded by one thread) filled before its first item; a reader that holds fewer
    rows than that emits everything at the end of its share. With few rows per reader (2M rows over 16 readers:
    one 131,072-row row group each) the epoch is mostly start-up, not a rate: ``first_batch_s`` and
    ``after_first_rows_per_s`` tell the two apart."""

    path = generated(args.data, args.rows)
    flags = ["--pin"] * args.pin + ["--copy"] * args.copy
    settings = {
        f"workers_{workers}_group_{group}": [str(path), str(workers), str(group), str(args.batch_size), *flags]
        for workers in args.workers
        for group in args.groups
    }
    sources, runs = interleaved_runs("_read", settings, args.repeats, args.before_src)
    out: dict = {"batch_size": args.batch_size, "pin_memory": args.pin, "copy": args.copy, "rows": args.rows}
    out["repeats"] = args.repeats
    out["sources"] = sources
    for name, by_key in runs.items():
        median = {k: {m: float(np.median([r[m] for r in v])) for m in v[0]} for k, v in by_key.items()}
        best = {  # the least disturbed epoch: on a shared machine the others only ever slow one down
            k: {m: float(max(r[m] for r in v) if m.endswith("rows_per_s") else min(r[m] for r in v)) for m in v[0]}
            for k, v in by_key.items()
        }
        out[name] = {"rows_per_s": {k: m["rows_per_s"] for k, m in median.items()}, "median": median, "best": best}
        out[name]["runs"] = by_key
    out["rows_per_s"] = out["after"]["rows_per_s"]
    head = f"{'median (best) of ' + str(args.repeats):>30} {'rows/s':>22} {'reader CPU s/1M rows':>22} {'trainer':>14}"
    print(f"{head} {'first batch s':>13} {'rows/s after it':>15}")
    for key in runs["after"]:
        for name in sources:
            m, b = out[name]["median"][key], out[name]["best"][key]
            print(
                f"{name:>6} {key:>23} {m['rows_per_s']:>10,.0f} ({b['rows_per_s']:>9,.0f}) "
                f"{m['reader_cpu_s_per_m']:>13.3f} ({b['reader_cpu_s_per_m']:.3f}) "
                f"{m['trainer_cpu_s_per_m']:>6.3f} ({b['trainer_cpu_s_per_m']:.3f}) "
                f"{m.get('first_batch_s', float('nan')):>13.2f} {m.get('after_first_rows_per_s', float('nan')):>15,.0f}"
            )
        if "before" in out:
            speedup = {}
            for stat in ("median", "best"):
                after, before = out["after"][stat][key], out["before"][stat][key]
                speedup[stat] = {
                    "rows_per_s": after["rows_per_s"] / before["rows_per_s"],
                    "reader_cpu": before["reader_cpu_s_per_m"] / after["reader_cpu_s_per_m"],
                }
            out.setdefault("speedup", {})[key] = speedup
            m, b = speedup["median"], speedup["best"]
            print(
                f"{'':>6} {key:>23} after / before: {m['rows_per_s']:.2f}x rows/s ({b['rows_per_s']:.2f}x best), "
                f"{m['reader_cpu']:.2f}x less reader CPU per row ({b['reader_cpu']:.2f}x best)"
            )
    return out


def _read_epoch(path: str, workers: int, group: int, batch_size: int, pin: bool, copy: bool) -> None:
    """One epoch through ``stream_loader`` (child process of ``read``); prints JSON: rows/s and CPU seconds per
    million rows of this process (the trainer's) and of its reader processes (0 readers: all in this one).
    ``copy``: this process copies what it receives, as the pin thread does on CUDA (into pageable memory here);
    with ``stream_items`` (the new code) item by item, releasing each to its reader, else batch by batch."""
    import torch

    torch.set_num_threads(1)
    from mtrank.data import streaming

    cfg, encoder, _ = fitted_encoder(Path(path), 200_000)
    stream = streaming.EncodedStream(path, cfg, encoder, batch_size, seed=0)
    if copy and hasattr(streaming, "stream_items"):
        batches = (b for item in _copied_items(stream, workers, group) for b in item.batches())
    else:
        batches = streaming.stream_loader(stream, workers, pin_memory=pin, group=group)
        if copy:
            from mtrank.train.prefetch import map_tensors

            batches = (map_tensors(b, torch.clone) for b in batches)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start, rows, first = time.perf_counter(), 0, None
    for batch in batches:
        if first is None:  # readers started, their first shuffle buffer filled
            first, first_rows = time.perf_counter() - start, len(batch)
        rows += len(batch)
    seconds = time.perf_counter() - start
    own, readers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    trainer_cpu = own.ru_utime + own.ru_stime - before.ru_utime - before.ru_stime
    reader_cpu = readers.ru_utime + readers.ru_stime if workers else trainer_cpu
    result = {
        "rows": rows,
        "rows_per_s": rows / seconds,
        "first_batch_s": first,
        "after_first_rows_per_s": (rows - first_rows) / max(seconds - first, 1e-9),
        "trainer_cpu_s_per_m": trainer_cpu / rows * 1e6,
        "reader_cpu_s_per_m": reader_cpu / rows * 1e6,
    }
    print(json.dumps(result))


def _copied_items(stream, workers: int, group: int):
    """The items of ``stream``, each copied on arrival and released to its reader (what ``Group.pin_memory``
    does, without a GPU)."""
    from mtrank.data.streaming import Group, stream_items

    for item in stream_items(stream, workers, group=group, recycle=True):
        weights = None if item.weights is None else item.weights.clone()
        copied = Group(item.dense.clone(), item.sparse.clone(), item.labels.clone(), weights, item.sizes)
        item.release()
        yield copied


class _StageClock:
    """CPU time of this thread (``time.thread_time_ns``) spent inside ``next()`` of wrapped iterators, per stage.

    Stages nest (receive inside prefetch inside keys): the totals are inclusive; :func:`_host_epoch` subtracts.
    """

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.calls = 0

    def wrap(self, iterable, stage: str):
        iterator = iter(iterable)
        clock = time.thread_time_ns
        self.ns.setdefault(stage, 0)
        while True:
            start = clock()
            try:
                value = next(iterator)
            except StopIteration:
                self.ns[stage] += clock() - start
                return
            self.ns[stage] += clock() - start
            self.calls += 1
            yield value

    def overhead_ns(self) -> float:
        """CPU ns one timed ``next()`` adds (two clock reads and a generator hop), measured here."""
        empty = iter(range(20_000))
        start = time.thread_time_ns()
        for _ in self.__class__().wrap(empty, "x"):
            pass
        return (time.thread_time_ns() - start) / 20_000


class _NullStep:
    """A training step that costs nothing: the loop's outputs, no model (``--null-step``)."""

    graph = None

    def __init__(self, tasks: int) -> None:
        import torch

        self.outputs = (torch.zeros(1), torch.zeros(1, tasks))
        self.steps = 0

    def __call__(self, key):
        self.steps += 1
        return self.outputs


def cmd_host(args) -> dict:
    """The trainer's host-side ceiling (CPU proxy, ``--null-step``): Trainer.fit over the real streaming path
    (reader processes -> items -> Prefetcher -> batches -> the training loop) with the model step replaced by
    nothing. Each run (``--epochs`` epochs) runs in a fresh process (``_host``); it reports batches/s and rows/s
    of the consumer over the whole run and the CPU time per batch of the trainer's process, by stage. On a
    machine with fewer cores than readers + 1 the rates are the readers'; the trainer's CPU per batch is what
    carries over to a larger machine. With several epochs, also the gap between the last batch of an epoch and
    the first batch of the next (``epoch_gaps_s``: what the readers' start-up costs between epochs; the loop's
    mean interval between two batches of an epoch beside it). With ``--before-src DIR`` the same runs use the ``mtrank``
    package under DIR, interleaved run by run."""

    path = generated(args.data, args.rows)
    common = [str(args.group), str(args.batch_size), "--epochs", str(args.epochs), *["--copy"] * args.copy]
    settings = {f"workers_{workers}": [str(path), str(workers), *common] for workers in args.workers}
    sources, runs = interleaved_runs("_host", settings, args.repeats, args.before_src)
    out: dict = {"rows": args.rows, "batch_size": args.batch_size, "group": args.group, "copy": args.copy}
    out.update(repeats=args.repeats, epochs=args.epochs, sources=sources)
    lists = ("stages_us", "epoch_gaps_s")
    for name, by_key in runs.items():
        out[name] = {
            key: {"median": {m: float(np.median([r[m] for r in v])) for m in v[0] if m not in lists}, "runs": v}
            for key, v in by_key.items()
        }
        for key, v in by_key.items():
            stages = v[0]["stages_us"]
            out[name][key]["median"]["stages_us"] = {
                s: float(np.median([r["stages_us"][s] for r in v])) for s in stages
            }
            gaps = [r.get("epoch_gaps_s", []) for r in v]
            out[name][key]["median"]["epoch_gaps_s"] = [float(np.median(g)) for g in zip(*gaps)]  # per boundary
    print(f"median of {args.repeats}; CPU microseconds per batch of the trainer's process (main thread by stage)")
    head = f"{'':>6} {'readers':>8} {'batches/s':>10} {'rows/s':>11} {'first item s':>12} {'process':>8} {'main':>6}"
    print(f"{head}  stages")
    for key in runs["after"]:
        for name in sources:
            m = out[name][key]["median"]
            stages = " ".join(f"{s} {us:.1f}" for s, us in m["stages_us"].items())
            print(
                f"{name:>6} {key.split('_')[1]:>8} {m['batches_per_s']:>10,.0f} {m['rows_per_s']:>11,.0f} "
                f"{m['first_item_s']:>12.2f} {m['process_cpu_us_per_batch']:>8.1f} {m['main_cpu_us_per_batch']:>6.1f}"
                f"  {stages}"
            )
    if args.epochs > 1:
        print(f"{'':>6} {'readers':>8} {'batches/s':>10} {'gap between epochs s (median per boundary)':>44}")
        print(f"{'':>6} {'':>8} {'':>10} {'':>44}  (mean interval between two batches of an epoch)")
        for key in runs["after"]:
            for name in sources:
                m = out[name][key]["median"]
                gaps = " ".join(f"{g:.3f}" for g in m["epoch_gaps_s"])
                print(
                    f"{name:>6} {key.split('_')[1]:>8} {m['batches_per_s']:>10,.0f} {gaps:>44}  "
                    f"({m['batch_interval_s']:.4f})"
                )
    return out


def _host_epoch(path: str, workers: int, group: int, batch_size: int, copy: bool, epochs: int = 1) -> None:
    """``epochs`` epochs of Trainer.fit with a null step on CPU (child process of ``host``); prints JSON. Works
    with a StreamSource of before the overlapped epochs (``items``) and of after (``readers``)."""
    import torch

    torch.set_num_threads(1)
    from mtrank.data import streaming
    from mtrank.model import MultiTaskModel
    from mtrank.train import Trainer, sources

    cfg, encoder, _ = fitted_encoder(Path(path), 200_000)
    cfg.train.device, cfg.train.batch_size, cfg.train.eval_every = "cpu", batch_size, 10**9
    cfg.train.epochs, cfg.train.steps = epochs, 0
    stream = streaming.EncodedStream(path, cfg, encoder, batch_size, seed=0)
    trainer = Trainer(MultiTaskModel(cfg.model_config(encoder.num_dense, encoder.vocab_sizes), seed=0), cfg.train)
    source = sources.StreamSource(stream, workers, torch.device("cpu"), stream.count_rows(), group=group)
    clock, null = _StageClock(), _NullStep(len(cfg.tasks))
    first: list[float] = []
    start = time.perf_counter()

    def timed(items):
        for item in clock.wrap(items, "receive"):
            if not first:
                first.append(time.perf_counter() - start)
            if copy:  # what the pin thread does on CUDA (there in its own thread, here in this one)
                begin = time.thread_time_ns()
                item = _copied(item)
                clock.ns["copy"] = clock.ns.get("copy", 0) + time.thread_time_ns() - begin
            yield item

    if hasattr(source, "readers"):  # each epoch's readers (EpochReaders), started ahead of the epoch's end
        make_readers = source.readers
        if copy:  # readers recycle their buffers, as when the items are pinned
            make_readers = partial(streaming.EpochReaders, stream, workers, group=group, recycle=True)
        source.readers = lambda epoch: _TimedReaders(make_readers(epoch=epoch), timed)
    else:  # before: each epoch's items, readers started at the first
        make = source.items
        if copy:
            make = partial(streaming.stream_items, stream, workers, group=group, recycle=True)
        source.items = lambda: timed(make())
    prefetcher = sources.Prefetcher

    class TimedPrefetcher(prefetcher):
        def __iter__(self):
            return clock.wrap(super().__iter__(), "prefetch")

    sources.Prefetcher = TimedPrefetcher
    batches = streaming.Group.batches

    def widened_batches(item):  # ids widened first, timed apart (on CUDA one kernel launch, here a copy)
        begin = time.thread_time_ns()
        item = item._replace(sparse=item.sparse.long())
        clock.ns["widen"] = clock.ns.get("widen", 0) + time.thread_time_ns() - begin
        return batches(item)

    streaming.Group.batches = widened_batches
    keys = source.keys
    arrivals: dict[int, list] = {}  # per epoch: when the loop got its first and its last batch, batches, rows

    def stamped(epoch: int, *skip_limit: int):  # (before: no limit)
        for batch in clock.wrap(keys(epoch, *skip_limit), "keys"):
            now = time.perf_counter()
            seen = arrivals.setdefault(epoch, [now, now, 0, 0])
            seen[1:] = now, seen[2] + 1, seen[3] + len(batch)
            yield batch

    source.keys = stamped
    trainer.loop.train_step = lambda source: null
    before = resource.getrusage(resource.RUSAGE_SELF)
    main_before = time.thread_time_ns()
    start = time.perf_counter()
    trainer.fit(source)
    seconds = time.perf_counter() - start
    main_ns = time.thread_time_ns() - main_before
    own = resource.getrusage(resource.RUSAGE_SELF)
    process_s = own.ru_utime + own.ru_stime - before.ru_utime - before.ru_stime
    batches, ns = null.steps, clock.ns
    overhead = clock.overhead_ns()
    stages = {
        "receive": ns["receive"],
        "copy": ns.get("copy", 0),
        "prefetch": ns["prefetch"] - ns["receive"] - ns.get("copy", 0),
        "widen": ns["widen"],
        "slice": ns["keys"] - ns["prefetch"] - ns["widen"],
        "loop": main_ns - ns["keys"] - clock.calls * overhead,
    }
    times = [arrivals[e] for e in sorted(arrivals)]
    rows = sum(t[3] for t in times)
    gaps = [following[0] - this[1] for this, following in zip(times, times[1:])]
    inside = sum(t[1] - t[0] for t in times) / max(sum(t[2] - 1 for t in times), 1)  # within an epoch, mean
    result = {
        "batches": batches,
        "rows": rows,
        "epochs": len(times),
        "batches_per_s": batches / seconds,
        "rows_per_s": rows / seconds,
        "first_item_s": first[0],
        "steady_rows_per_s": rows / (seconds - first[0]),
        "epoch_gaps_s": gaps,
        "batch_interval_s": inside,
        "process_cpu_us_per_batch": process_s / batches * 1e6,
        "main_cpu_us_per_batch": (main_ns - clock.calls * overhead) / batches / 1e3,
        "timer_overhead_ns": overhead,
        "stages_us": {k: v / batches / 1e3 for k, v in stages.items()},
    }
    print(json.dumps(result))


class _TimedReaders:
    """One epoch's readers (an EpochReaders) whose items go through ``timed``."""

    def __init__(self, readers, timed) -> None:
        self.readers, self.timed, self.epoch = readers, timed, readers.epoch

    def __iter__(self):
        return self.timed(self.readers)

    def close(self) -> None:
        self.readers.close()

    def __getattr__(self, name: str):
        return getattr(self.readers, name)


def _copied(item):
    from mtrank.data.streaming import Group

    weights = None if item.weights is None else item.weights.clone()
    copied = Group(item.dense.clone(), item.sparse.clone(), item.labels.clone(), weights, item.sizes)
    item.release()
    return copied


def cmd_start(args) -> dict:
    """What starting the readers costs, by start method: ``--epochs`` epochs in this process for each method
    (fork, then forkserver, alternating epoch by epoch): seconds to the first item, CPU seconds of this process
    until then, and the epoch's seconds. The first forkserver epoch includes starting the server."""
    import torch

    from mtrank.data.streaming import EncodedStream, stream_items

    torch.set_num_threads(1)
    path = generated(args.data, args.rows)
    cfg, encoder, _ = fitted_encoder(path, 200_000)
    stream = EncodedStream(str(path), cfg, encoder, args.batch_size, seed=0)
    phases = _reader_phases(stream, args.group)
    print(
        "one reader's way to its first item, in this process: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items())
    )
    methods = ("fork", "forkserver")
    if args.cuda:  # as in training: CUDA initialised (readers from the forkserver), items page-locked
        torch.zeros(1, device="cuda")
        methods = ("forkserver",)
    runs: dict[str, list[dict]] = {}
    for epoch in range(args.epochs):
        for method in methods:
            stream.set_epoch(epoch)
            start, cpu = time.perf_counter(), time.process_time()
            items = stream_items(stream, args.workers, args.cuda, group=args.group, start_method=method)
            next(items)
            first, first_cpu = time.perf_counter() - start, time.process_time() - cpu
            sum(1 for _ in items)
            run = {"first_item_s": first, "cpu_to_first_item_s": first_cpu, "epoch_s": time.perf_counter() - start}
            runs.setdefault(method, []).append(run)
            print(f"epoch {epoch} {method:>10}: " + ", ".join(f"{k} {v:.3f}" for k, v in run.items()))
    return {
        "rows": args.rows,
        "workers": args.workers,
        "group": args.group,
        "cuda": args.cuda,
        "phases_s": phases,
        "runs": runs,
    }


def _reader_phases(stream, group: int) -> dict[str, float]:
    """Seconds, cumulated, of what one reader does before its first item (run here, one thread, no process):
    the encoder pickled and unpickled (what a forkserver reader receives), the pieces listed, each record batch
    read and encoded, the first item written."""
    import pickle

    from mtrank.data.streaming import GroupWriter, ShuffleBuffer

    out: dict[str, float] = {}
    start = time.perf_counter()
    blob = pickle.dumps(stream.encoder, protocol=pickle.HIGHEST_PROTOCOL)
    out["encoder_pickled"] = time.perf_counter() - start
    pickle.loads(blob)
    out["encoder_unpickled"] = time.perf_counter() - start
    pieces = stream.pieces()
    out["pieces_listed"] = time.perf_counter() - start
    cfg = stream.config
    buffer = ShuffleBuffer(cfg.data.shuffle_buffer, 0, start=round(cfg.data.shuffle_start * cfg.data.shuffle_buffer))
    writer = GroupWriter(stream.batch_size, group, shared=False, recycle=False, key=None)
    read = {"columns": cfg.input_columns(), "batch_size": cfg.data.read_batch_rows, "use_threads": False}
    chunk = 0
    for piece in pieces:
        for record_batch in piece.to_batches(**read):
            chunk += 1
            out[f"chunk_{chunk}_read"] = time.perf_counter() - start
            rows = buffer.reserve(record_batch.num_rows, stream.columns)
            stream._encode_into(record_batch, stream.path, rows)
            emitted = buffer.commit(record_batch.num_rows, stream.batch_size)
            out[f"chunk_{chunk}_encoded"] = time.perf_counter() - start
            for _ in writer.write(buffer.storage, emitted):
                out["first_item_written"] = time.perf_counter() - start
                return out
    return out


def cmd_prefetch_check(args) -> dict:
    """The batches a StreamSource delivers on ``--device`` (pinned, prefetched on a side stream while the
    training stream is kept busy) equal the ones it delivers on CPU, batch by batch: per-batch checksums
    computed on the training stream after a busy matmul, so a missing stream wait would read half-copied data."""
    import torch

    from mtrank.data.streaming import EncodedStream
    from mtrank.train.sources import StreamSource

    path = generated(args.data, args.rows)
    cfg, encoder, _ = fitted_encoder(path, min(args.rows, 200_000))
    device = torch.device(args.device)
    busy = torch.randn(2048, 2048, device=device)

    def checksums(on: torch.device) -> list[float]:
        source = StreamSource(EncodedStream(str(path), cfg, encoder, args.batch_size, seed=1), args.workers, on)
        sums = []
        for batch in source.keys(epoch=0, skip=args.skip):
            if on.type == "cuda":
                busy @ busy  # keep the training stream busy while the next batches are copied
            total = batch.dense.double().sum() + batch.sparse.double().sum() + batch.labels.double().sum()
            sums.append(total)
        return [float(t) for t in sums]

    expected, got = checksums(torch.device("cpu")), checksums(device)
    same = len(expected) == len(got) and all(a == b for a, b in zip(expected, got))
    print(f"prefetch check on {device}: {len(got)} batches, {'identical to CPU' if same else 'DIFFERENT from CPU'}")
    if not same:
        raise SystemExit(1)
    return {"device": str(device), "batches": len(got), "identical": same, "workers": args.workers}


def _stream_epoch(path: str, workers: int, train: bool, threads: int = 0) -> None:
    """One streaming epoch over the directory (child process of ``memory``); prints JSON with peak RSS."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from mtrank.data.streaming import EncodedStream, stream_loader
    from mtrank.model import MultiTaskModel
    from mtrank.train import Trainer
    from mtrank.train.sources import StreamSource

    cfg, encoder, _ = fitted_encoder(Path(path), 200_000)
    stream = EncodedStream(path, cfg, encoder, cfg.train.batch_size, seed=0)
    trainer = Trainer(MultiTaskModel(cfg.model_config(encoder.num_dense, encoder.vocab_sizes)), cfg.train)
    source = StreamSource(stream, workers, trainer.device, rows=1)
    step = trainer.loop.train_step(source)
    start, rows = time.perf_counter(), 0
    for batch in stream_loader(stream, workers):
        rows += len(batch)
        if train:
            step(batch)
    seconds = time.perf_counter() - start
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(
        json.dumps(
            {
                "rows": rows,
                "seconds": seconds,
                "peak_rss_mb": self_kb / 1024,
                "peak_worker_rss_mb": child_kb / 1024,
                "torch": torch.__version__,
            }
        )
    )


def cmd_memory(args) -> dict:
    out = {}
    for rows in args.rows_list:
        path = generated(args.data, rows)
        cmd = [sys.executable, __file__, "_stream", str(path), "--stream-workers", str(args.stream_workers)]
        if args.with_training:
            cmd.append("--with-training")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        out[str(rows)] = result
        print(
            f"{rows:>11,} rows: {result['rows']:,} streamed in {result['seconds']:.0f} s "
            f"({result['rows'] / result['seconds']:,.0f} rows/s); "
            f"peak RSS trainer {result['peak_rss_mb']:.0f} MB, "
            f"reader {result['peak_worker_rss_mb']:.0f} MB"
        )
    if len(args.rows_list) == 2:
        small, large = (out[str(r)] for r in args.rows_list)
        ratio = (large["peak_rss_mb"] + large["peak_worker_rss_mb"]) / (
            small["peak_rss_mb"] + small["peak_worker_rss_mb"]
        )
        out["ratio_large_to_small"] = ratio
        print(f"peak memory {args.rows_list[1]:,} rows / {args.rows_list[0]:,} rows: {ratio:.2f}x")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/mtrank-w2", help="where generated data goes (never committed)")
    parser.add_argument("--json", help="also write the results here")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="write a W2-layout Parquet directory")
    p.add_argument("--rows", type=int, default=1_000_000)
    p = sub.add_parser("encode", help="encoding rows/s")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--passes", type=int, default=2, help="read + encode passes over the directory (best kept)")
    p = sub.add_parser("train", help="training samples/s: in-memory tensors vs Parquet stream")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="reader processes to try (0 = in-process)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads of the trainer (0 = torch's default)")
    p.add_argument("--device", default="auto", help="the trainer's device (auto: CUDA when there)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--prefetch", type=int, default=2, help="batches in flight to the GPU")
    p.add_argument("--group", type=int, default=None, help="batches per reader item (default 65,536 rows' worth)")
    p.add_argument("--baseline", action="store_true", help="also: one batch per item, unpinned (the old path)")
    p.add_argument("--warmup-runs", type=int, default=1, help="rounds of every path run first and not counted")
    p.add_argument(
        "--pin-copy-workers",
        type=int,
        nargs="*",
        default=[],
        help="also these reader counts with items copied into pinned memory (not page-locked in place)",
    )
    p.add_argument("--steady-after", type=int, default=200, help="the steady rate is taken from this step on")
    p.add_argument("--epochs", type=int, default=0, help="whole epochs of the files (instead of --steps)")
    p.add_argument(
        "--timeline",
        action="store_true",
        help="also when each run's readers started, its first item arrived and steps 1..800 were done",
    )
    p.add_argument(
        "--no-overlap-workers",
        type=int,
        nargs="*",
        default=[],
        help="also these reader counts with epochs not overlapped (each epoch's readers start when it does)",
    )
    p = sub.add_parser("read", help="rows/s of the reader processes alone, by workers and group")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--groups", type=int, nargs="+", default=[1, 16], help="batches per item between processes")
    p.add_argument("--pin", action="store_true", help="pin the items (as for a GPU)")
    p.add_argument("--repeats", type=int, default=1, help="epochs per setting (median kept)")
    p.add_argument("--copy", action="store_true", help="the trainer's process copies what it receives (as pinning)")
    p.add_argument("--before-src", help="also run the mtrank package under this folder (the old code), interleaved")
    p = sub.add_parser("host", help="the trainer's host cost per batch: streaming path, null step, CPU")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--group", type=int, default=16, help="batches per reader item")
    p.add_argument("--repeats", type=int, default=3, help="epochs per setting (median kept)")
    p.add_argument("--copy", action="store_true", help="copy each item on arrival, as the pin thread does")
    p.add_argument("--epochs", type=int, default=1, help="epochs per run (several: the gaps between epochs too)")
    p.add_argument("--before-src", help="also run the mtrank package under this folder (the old code), interleaved")
    p = sub.add_parser("start", help="what starting the readers costs: fork vs forkserver")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cuda", action="store_true", help="CUDA initialised first and items pinned, as in training")
    p = sub.add_parser("prefetch-check", help="batches prefetched to --device == the CPU path's, in order")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip", type=int, default=3, help="start mid-epoch, as a resumed run does")
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("memory", help="peak RSS of a streaming epoch at two sizes")
    p.add_argument("--rows", dest="rows_list", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--stream-workers", type=int, default=1)
    p.add_argument("--with-training", action="store_true", help="also take an optimiser step on every batch")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the trainer (0 = torch's default)")
    p = sub.add_parser("_read", help=argparse.SUPPRESS)
    p.add_argument("path")
    p.add_argument("read_workers", type=int)
    p.add_argument("group", type=int)
    p.add_argument("batch_size", type=int)
    p.add_argument("--pin", action="store_true")
    p.add_argument("--copy", action="store_true")
    p = sub.add_parser("_host", help=argparse.SUPPRESS)
    p.add_argument("path")
    p.add_argument("read_workers", type=int)
    p.add_argument("group", type=int)
    p.add_argument("batch_size", type=int)
    p.add_argument("--copy", action="store_true")
    p.add_argument("--epochs", type=int, default=1)
    p = sub.add_parser("_stream", help=argparse.SUPPRESS)
    p.add_argument("path")
    p.add_argument("--stream-workers", type=int, default=1)
    p.add_argument("--with-training", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "_read":
        _read_epoch(args.path, args.read_workers, args.group, args.batch_size, args.pin, args.copy)
        return 0
    if args.command == "_host":
        _host_epoch(args.path, args.read_workers, args.group, args.batch_size, args.copy, args.epochs)
        return 0
    if args.command == "_stream":
        _stream_epoch(args.path, args.stream_workers, args.with_training, args.threads)
        return 0
    commands = {"generate": cmd_generate, "encode": cmd_encode, "train": cmd_train, "read": cmd_read}
    commands["prefetch-check"] = cmd_prefetch_check
    commands["host"] = cmd_host
    commands["start"] = cmd_start
    result = {**commands, "memory": cmd_memory}[args.command](args)
    result["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
