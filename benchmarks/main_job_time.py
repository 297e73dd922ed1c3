"""Wall time of the main job (`mtrank run`, what `make run` does after set-up): twice on the machine as it is,
then once beside one CPU-bound process; checks that the two plain runs write the same numbers.

    python benchmarks/main_job_time.py --json docs/results/main_job_time.json

The two plain runs must give byte-identical results.md and the same results.json (timings left out). The
busy run shows what one other CPU-bound process (a Python busy loop) costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MTRANK = [sys.executable, "-m", "mtrank.cli", "run", "--no-progress"]


def without_timings(data):
    if isinstance(data, dict):
        return {k: without_timings(v) for k, v in data.items() if "second" not in k}
    if isinstance(data, list):
        return [without_timings(v) for v in data]
    return data


def timed_run(out: Path, extra: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([*MTRANK, "--out", str(out), *extra], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the times here")
    parser.add_argument("--quick", action="store_true", help="time `mtrank run --quick` (what the tests run)")
    args = parser.parse_args()
    extra = ["--quick"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = [timed_run(tmp / f"run{i}", extra) for i in (1, 2)]
        same_md = (tmp / "run1" / "results.md").read_bytes() == (tmp / "run2" / "results.md").read_bytes()
        results = [without_timings(json.loads((tmp / f"run{i}" / "results.json").read_text())) for i in (1, 2)]
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            loaded = timed_run(tmp / "busy", extra)
        finally:
            busy.kill()
    report = {
        "command": " ".join(["mtrank", "run", *extra]),
        "cpus": os.cpu_count(),
        "loadavg_after": os.getloadavg(),
        "seconds": plain,
        "seconds_beside_one_busy_process": loaded,
        "slowdown_beside_one_busy_process": loaded / min(plain),
        "results_md_identical": same_md,
        "results_json_identical": results[0] == results[1],
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if same_md and report["results_json_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
