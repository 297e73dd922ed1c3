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
    assert set(pipeline["samples_per_s"]) == {"memory", "parquet_workers_0", "parquet_workers_2"}
    assert all(v > 0 for v in pipeline["samples_per_s"].values())
    assert set(pipeline["steady_samples_per_s"]) == set(pipeline["samples_per_s"])  # rates after the warm-up steps
    assert pipeline["warmup_runs"] == 1 and all(len(runs) == 1 for runs in pipeline["runs"].values())  # not counted
    epochs = json.loads((out / "data_pipeline_epochs.json").read_text())  # 3 whole epochs, overlapped or not
    assert set(epochs["samples_per_s"]) == {"memory", "parquet_workers_2", "parquet_workers_2_no_overlap"}
    assert epochs["epochs"] == 3 and epochs["steps"] == 3 * 79  # 20,000 rows in batches of 256
    epoch = json.loads((out / "data_pipeline_epoch.json").read_text())  # one whole epoch, with its timeline
    assert epoch["epochs"] == 1 and epoch["steps"] == 118  # 30,000 rows in batches of 256
    files = epoch["timeline"]["parquet_workers_2"]
    assert 0 < files["readers_started_s"] < files["first_item_s"] < files["steps_s"]["1"] < files["end_s"]
    # each reader's way to its first item (EncodedStream.trace), in order, readers started by fork on CPU
    assert list(files["reader_s"]) == ["began", "chunk 1 read", "chunk 1 encoded", "first item written"]
    w2 = json.loads((out / "w2_batch.json").read_text())
    assert set(w2["batches"]) == {"64", "128"} and w2["compile"] == "aot_eager" and w2["pad_to"] == 64
    assert {b["step_path"] for b in w2["batches"].values()} == {"compiled"}
    auc = json.loads((out / "w2_auc.json").read_text())["auc"]
    assert set(auc["batches"]) == {"64", "128"} and auc["comparison"]["pairs"] == 2
    assert all(len(b["tuning"]) == 4 and len(b["paired"]) == 2 for b in auc["batches"].values())  # 2 lrs x 2 tables
    assert set(auc["comparison"]["tasks"]) == {"auc/t0", "auc/t1"}
    plain = json.loads((out / "w3_plain.json").read_text())
    assert plain["workload"] == "W3" and "profile" in plain["batches"]["128"] and plain["pad_to"] == 1
    w3 = json.loads((out / "w3.json").read_text())
    assert (w3["pad_to"], w3["sparse"], w3["compile"]) == (64, "rowwise_adagrad", "aot_eager")
    table = (out / "summary.md").read_text()
    assert table.count("target:") == 5  # files/memory, W2 10M, W2 AUC, W3 2.1M: as it was, and padded+row-wise+compiled
    assert "target: files >= 0.8x memory over whole runs of whole epochs: 20,000 rows, 3 whole epochs" in table
    assert "| auc/t0 | " in table and "paired seeds: shortfall auc/t0" in table
    assert "| parquet_workers_2 |" in table and "| 128 |" in table and "| workers_2_group_16 |" in table
    read = json.loads((out / "read.json").read_text())["rows_per_s"]
    assert "check: 76 batches prefetched to cpu: identical to the CPU path" in table  # 79 - 3 skipped
    assert set(read) == {f"workers_{w}_group_16" for w in (0, 2)}
