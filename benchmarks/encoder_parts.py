"""Two parts of a streaming reader's encoder, timed on W2-layout data (the figures of docs/benchmarks.md,
"Files to the graphed step", 9., and "A first step there"):

1. unpickling the fitted encoder (what each forkserver reader does as it starts), as it is pickled now (the
   string lookups' value -> id dicts left out) and with those dicts pickled too (as before);
2. ``IntLookup`` (an integer feature's dense id table) on a record batch's column, now and by the rule it
   replaced (two comparisons, an ``and``, a ``clip`` and a ``where``), checked equal; and the share of the
   integer lookups in encoding those record batches.

    python benchmarks/encoder_parts.py --json docs/results/scale-cpu/int-lookup/encoder_parts.json

Medians of ``--repeats`` timings; one thread. The data goes under ``--data`` (generated there if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data_pipeline  # noqa: E402
from mtrank.data.encoders import IntLookup  # noqa: E402
from mtrank.data.streaming import EncodedStream  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lookup_before(lookup: IntLookup, col: pa.Array) -> np.ndarray:
    """The dense-table rule before (the table then had no trailing 0: its last entry is dropped here)."""
    dense = lookup.dense[:-1]
    x = pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False)
    offset = x - lookup.low
    inside = (offset >= 0) & (offset < dense.size)
    return np.where(inside, dense[np.clip(offset, 0, max(dense.size - 1, 0))], 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/mtrank-w2", help="where generated data goes (never committed)")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--record-batches", type=int, default=6, help="131,072-row record batches encoded")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    path = data_pipeline.generated(args.data, args.rows)
    cfg, encoder, _ = data_pipeline.fitted_encoder(path, 200_000)
    stream = EncodedStream(str(path), cfg, encoder, 4096, seed=0)  # builds every lookup, as for readers

    now = pickle.dumps(encoder, protocol=pickle.HIGHEST_PROTOCOL)
    dicts = [s["_str_lookup"]._ids for s in encoder.state.values() if isinstance(s, dict) and "_str_lookup" in s]
    before = pickle.dumps((encoder, dicts), protocol=pickle.HIGHEST_PROTOCOL)
    unpickle = {
        "now_ms": 1e3 * median_seconds(lambda: pickle.loads(now), args.repeats),
        "with_dicts_ms": 1e3 * median_seconds(lambda: pickle.loads(before), args.repeats),
        "now_mb": len(now) / 1e6,
        "with_dicts_mb": len(before) / 1e6,
    }

    read = {"columns": cfg.input_columns(), "batch_size": 131_072, "use_threads": False}
    batches = [rb for piece in stream.pieces() for rb in piece.to_batches(**read)][: args.record_batches]
    rows = sum(rb.num_rows for rb in batches)
    lookups = [(f.column, encoder.state[f.name]["_int_lookup"]) for f in encoder.features.categorical]
    lookups = [(column, lookup) for column, lookup in lookups if lookup.dense is not None]
    columns = [(rb.column(column), lookup) for rb in batches for column, lookup in lookups]
    for col, lookup in columns:
        np.testing.assert_array_equal(lookup(col), lookup_before(lookup, col))
    out = [np.empty((131_072, *shape), dtype) for shape, dtype in stream.columns]

    def encode() -> None:
        for rb in batches:
            stream._encode_into(rb, str(path), [a[: rb.num_rows] for a in out])

    encode()  # warm
    seconds = {
        "encode_s": median_seconds(encode, args.repeats),
        "int_lookups_s": median_seconds(lambda: [lookup(col) for col, lookup in columns], args.repeats),
        "int_lookups_before_s": median_seconds(
            lambda: [lookup_before(lookup, col) for col, lookup in columns], args.repeats
        ),
    }
    per_column = len(columns)
    result = {
        "rows": rows,
        "record_batches": len(batches),
        "dense_int_features": len(lookups),
        "unpickle": unpickle,
        **seconds,
        "int_lookup_ms_per_column": 1e3 * seconds["int_lookups_s"] / per_column,
        "int_lookup_before_ms_per_column": 1e3 * seconds["int_lookups_before_s"] / per_column,
        "int_lookup_speedup": seconds["int_lookups_before_s"] / seconds["int_lookups_s"],
        "int_lookups_share_of_encoding": seconds["int_lookups_s"] / seconds["encode_s"],
        "int_lookups_before_share_of_encoding_before": seconds["int_lookups_before_s"]
        / (seconds["encode_s"] - seconds["int_lookups_s"] + seconds["int_lookups_before_s"]),
    }
    print(
        f"unpickle the encoder: {unpickle['now_ms']:.1f} ms now ({unpickle['now_mb']:.1f} MB), "
        f"{unpickle['with_dicts_ms']:.1f} ms with the lookup dicts ({unpickle['with_dicts_mb']:.1f} MB)"
    )
    print(
        f"IntLookup on a {batches[0].num_rows:,}-row column: {result['int_lookup_ms_per_column']:.2f} ms now, "
        f"{result['int_lookup_before_ms_per_column']:.2f} ms by the rule before ({result['int_lookup_speedup']:.2f}x); "
        f"share of encoding {rows:,} rows ({len(lookups)} features): "
        f"{result['int_lookups_share_of_encoding']:.0%} now, "
        f"{result['int_lookups_before_share_of_encoding_before']:.0%} before"
    )
    result["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
