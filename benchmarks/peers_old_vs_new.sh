#!/usr/bin/env bash
# The peer benchmark for two versions of mtrank, alternated in one run on one machine, so that a ratio can be
# compared across versions without comparing two machines (or one machine on two days).
#   bash benchmarks/peers_old_vs_new.sh OLD_COMMIT [ROUNDS_EACH]  ->  docs/results/peers-old-vs-new.{log,json}
# Each version runs its own benchmarks/peers.py against its own src/ (PYTHONPATH) in .venv-peers (make bench).
set -euo pipefail
old=${1:?usage: peers_old_vs_new.sh OLD_COMMIT [ROUNDS_EACH]}
each=${2:-2}
py=${PEERS_PY:-.venv-peers/bin/python}
tree=$(mktemp -d)/old
git worktree add --detach "$tree" "$old" >/dev/null
trap 'git worktree remove --force "$tree"' EXIT
out=docs/results/peers-old-vs-new
tmp=$(mktemp -d)
for i in $(seq "$each"); do
  for version in new old; do
    root=.; [ "$version" = old ] && root=$tree
    echo "== $version ($(git -C "$root" rev-parse --short HEAD)) pass $i, load $(cut -d' ' -f1-3 /proc/loadavg)"
    PYTHONPATH="$root/src" "$py" "$root/benchmarks/peers.py" --threads 1 --rounds 3 --json "$tmp/$version-$i.json" \

  done
done 2>&1 | tee "$out.log"
"$py" - "$tmp" "$out.json" <<'PY'
import json, pathlib, statistics, sys
tmp, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))}
def ratios(report):  # median over rounds of mtrank's samples/s over each peer's (as peers.py prints "mtrank x")
    res = {}
    for name, w in report["workloads"].items():
        rounds = {k: v["samples_per_s_rounds"] for k, v in w["implementations"].items()}
        res[name] = {"mtrank_samples_per_s": round(w["implementations"]["mtrank"]["samples_per_s"]),
                     **{f"x_{k}": round(statistics.median(a / b for a, b in zip(rounds["mtrank"], v)), 2)
                        for k, v in rounds.items() if k != "mtrank"}}
    return res
summary = {name: ratios(r) for name, r in runs.items()}
out.write_text(json.dumps({"runs": runs, "ratios": summary}, indent=2))
print(json.dumps(summary, indent=1))
PY
