#!/usr/bin/env bash
# The census audit (docs/reproduction.md §3) on the GPU machine, in calls of at most ~9 minutes each.
#
# Here, once (the data and optuna travel with the tree, in ignored folders under runs/):
#   mkdir -p runs/data runs/whl && cp -r ../shared/data/census-income runs/data/
#   pip download --no-deps --only-binary=:all: optuna==5.1.0 colorlog==6.12.0 -d runs/whl
# There (device run, carry ["runs/data", "runs/whl", "runs/census-audit-h200"]):
#   bash benchmarks/census_audit_gpu.sh estimate   # the command's own time estimate on this GPU, then stops
#   bash benchmarks/census_audit_gpu.sh run        # starts jobs for STOP seconds, finishes them, packs the parts
# Each `run` call returns $OUT/audit.tgz.* (15 MB pieces); here, before the next call:
#   rm -rf runs/census-audit-h200 && cat <files_at>/audit.tgz.* | tar xz -C runs
# Finished jobs are skipped by the next call; when every job is done the call writes the report
# (runs/census-audit-h200/results.md), to be copied to docs/reproduction/census-audit-h200/.
set -uo pipefail
MODE=${1:-run}
STOP=${STOP:-420}           # no job or search trial starts later than this (s); running ones finish
LIMIT=${LIMIT:-560}         # a hard stop inside the tool's 600 s, should a job run long
WORKERS=${WORKERS:-8}       # jobs side by side on the one GPU
EXTRA=${EXTRA:-}            # more census-audit options, the same in every call (the parts are keyed on them)
AUDIT=runs/census-audit-h200
PY=${PYTHON:-python3}
$PY -c "import optuna" 2>/dev/null || $PY -m pip install -q --no-index --no-deps --target /tmp/site runs/whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ARGS=(reproduce census-audit --device cuda --workers "$WORKERS" --data runs/data/census-income --out "$AUDIT" --no-progress $EXTRA)
if [ "$MODE" = estimate ]; then
    $PY -m mtrank.cli "${ARGS[@]}" --estimate
    exit $?
fi
start=$(date +%s)
timeout "$LIMIT" $PY -m mtrank.cli "${ARGS[@]}" --stop-after "$STOP" > "${OUT:-/tmp}/audit.log" 2>&1
rc=$?
echo "census audit: rc=$rc after $(( $(date +%s) - start )) s; parts done: $(ls "$AUDIT/parts" 2>/dev/null | grep -c json)"
tail -3 "${OUT:-/tmp}/audit.log"
tar czf - -C runs "$(basename "$AUDIT")" | split -b 15M - "${OUT:-/tmp}/audit.tgz."
exit 0
