# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
OUT    ?= runs/main

.PHONY: install run test lint bench gpu-wheels clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@$(PY) -m pip install -q -c constraints.txt -e '.[torchrec]' && $(PY) -m pip install -q -c constraints.txt torchrec==1.8.0 --no-deps \
	  || echo "mtrank[torchrec] did not install (fbgemm-gpu-cpu/torchrec 1.8.0): the TorchRec tests will skip with the reason"
	@touch $(STAMP)
	@echo "mtrank is installed in $(VENV): call $(VENV)/bin/mtrank, or 'source $(VENV)/bin/activate' then mtrank"

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mtrank run --out $(OUT)
	@echo "next: $(VENV)/bin/mtrank --help (or 'source $(VENV)/bin/activate'); README.md has a walk-through"

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# The peer benchmark runs in its own venv: the same pinned torch, plus DeepCTR-Torch, torch-rechub and mtrank.
PEERS_VENV ?= .venv-peers
PEERS_PY    = $(PEERS_VENV)/bin/python
PEERS_STAMP = $(PEERS_VENV)/.installed
BENCH_ARGS ?= --threads 1 --rounds 3 --auc-check

$(PEERS_STAMP): pyproject.toml constraints.txt
	@test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q --upgrade pip
	$(PEERS_PY) -m pip install -q -c constraints.txt torch==2.13.0 deepctr-torch==0.3.0 torch-rechub==0.9.0 -e .
	@touch $(PEERS_STAMP)

bench: $(PEERS_STAMP)
	$(PEERS_PY) benchmarks/peers.py $(BENCH_ARGS) --json docs/results/peers.json

# Wheels of the pure-Python peers (and pandas) for the GPU machine, which has no network: carry .whl/ there and
# run `bash benchmarks/gpu_run.sh` (see docs/benchmarks.md).
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  deepctr-torch==0.3.0 torch-rechub==0.9.0 pandas python-dateutil six tzdata

clean:
	rm -rf $(VENV) $(PEERS_VENV) runs .pytest_cache
