#!/usr/bin/env bash
# Run on the GPU machine (no network), from the repo root, after `make gpu-wheels` here put the peers' wheels
# in .whl/ (carry it along):  bash benchmarks/gpu_run.sh  [results folder, default $OUT or docs/results]
# Uses the machine's own python3 and torch; installs only the pure-Python peers (and pandas if missing).
set -euo pipefail
PY=${PYTHON:-python3}
DEST=${1:-${OUT:-docs/results}}
mkdir -p "$DEST"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$PY -c "import sklearn, tqdm, safetensors" || { echo "missing scikit-learn / tqdm / safetensors"; exit 1; }
$PY -c "import pandas" 2>/dev/null || $PY -m pip install -q --no-deps --no-index .whl/pandas-*.whl \
    .whl/python_dateutil-*.whl .whl/six-*.whl .whl/tzdata-*.whl
$PY -m pip install -q --no-deps --no-index .whl/deepctr_torch-*.whl .whl/torch_rechub-*.whl
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
set -o pipefail
$PY benchmarks/gpu_check.py --json "$DEST/peers-h100.json" 2>&1 | tee "$DEST/gpu_check.log"
