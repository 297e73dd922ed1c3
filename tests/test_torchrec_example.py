"""The TorchRec example (benchmarks/torchrec_sharding.py --quick) runs: sharded training over 2 Gloo processes ends
with the plain model's scores, table-wise and column-wise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtrank.train import sharded

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sharded.torchrec_available() is not None, reason=str(sharded.torchrec_available()))
def test_torchrec_example_quick_trains_sharded_to_the_plain_scores(tmp_path):
    out = tmp_path / "r.json"
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    script = ROOT / "benchmarks" / "torchrec_sharding.py"
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], env=env, check=True, timeout=300)
    result = json.loads(out.read_text())
    for sharding_type in sharded.SHARDING_TYPES:
        assert result[sharding_type]["max_score_diff"] < 1e-5, result
        assert result[sharding_type]["samples_per_s"] > 0
