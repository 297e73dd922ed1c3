"""benchmarks/gpu_scale.sh, the one driver of the GPU measurements, runs every one of its paths on CPU at tiny
size (--cpu-quick): files vs memory with reader processes (new and old path), the W2 batch study with its AUC
sweep, W3 with its profile, and the table with a verdict per target."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_scale_runs_every_path_on_cpu_and_prints_the_table(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_scale.sh", "--cpu-quick", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pipeline = json.loads((out / "data_pipeline.json").read_text())
    assert set(pipeline["samples_per_s"]) == {
        "memory",
        "parquet_workers_0",
        "parquet_workers_2",
        "parquet_workers_0_baseline",
        "parquet_workers_2_baseline",
    }
    assert all(v > 0 for v in pipeline["samples_per_s"].values())
    w2 = json.loads((out / "w2_batch.json").read_text())
    assert set(w2["batches"]) == {"64", "128"} and set(w2["auc"]) == {"64", "128"}
    w3 = json.loads((out / "w3.json").read_text())
    assert w3["workload"] == "W3" and "profile" in w3["batches"]["128"] and w3["pad_to"] == 1
    assert json.loads((out / "w3_pad64.json").read_text())["pad_to"] == 64
    assert json.loads((out / "w3_pad64_rowwise.json").read_text())["sparse"] == "rowwise_adagrad"
    table = (out / "summary.md").read_text()
    assert table.count("target:") == 6  # files/memory, W2 10M, W2 AUC, W3 2.1M: as it is, padded, + row-wise
    assert "| parquet_workers_2 |" in table and "| 128 |" in table and "| workers_2_group_16 |" in table
    read = json.loads((out / "read.json").read_text())["rows_per_s"]
    assert "check: 76 batches prefetched to cpu: identical to the CPU path" in table  # 79 - 3 skipped
    assert set(read) == {f"workers_{w}_group_{g}" for w in (0, 2) for g in (1, 16)}
