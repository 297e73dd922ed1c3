"""benchmarks/encoder_parts.py at tiny size: the integer lookup equals the rule it replaced on real W2 columns
(the script asserts it), and the figures it reports are there."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_encoder_parts_runs_and_reports_both_parts(tmp_path):
    out = tmp_path / "parts.json"
    cmd = [sys.executable, "benchmarks/encoder_parts.py", "--data", str(tmp_path / "data"), "--rows", "140000"]
    cmd += ["--record-batches", "2", "--repeats", "1", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["record_batches"] == 2 and result["dense_int_features"] == 26
    assert result["unpickle"]["now_mb"] < result["unpickle"]["with_dicts_mb"]  # the dicts are left out
    assert result["int_lookup_ms_per_column"] > 0 and 0 < result["int_lookups_share_of_encoding"] < 1
