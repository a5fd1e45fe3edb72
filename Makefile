# The README's two commands: `make demo` and `make test`.
# CPU installs pin torch through constraints.txt so pip never pulls a multi-GB CUDA build.
# GPU users: install a CUDA torch first (see README), then `make install CONSTRAINTS=`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install dev demo test test-slow lint clean gpu-prep gpu-check-dry

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml $(CONSTRAINTS)
	$(PY) -m pip install -q $(PIP_C) -e '.[demo,plots,faiss]'
	touch $@

$(VENV)/.installed-dev: $(PY) pyproject.toml $(CONSTRAINTS)
	$(PY) -m pip install -q $(PIP_C) -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "not slow and not gpu"

# pytest exits 5 when the selection is empty (e.g. a checkout without slow tests): not a failure.
test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "slow and not gpu" || [ $$? -eq 5 ]

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check evalkit tests scripts
	$(VENV)/bin/ruff format --check evalkit tests scripts

# GPU readiness: fill .whl/ (wheels, float16 MiniLM, texts; <= 60 MB, git-ignored) with network,
# check it and every step tiny on CPU here; on the GPU machine: bash scripts/gpu_check.sh
gpu-prep: $(VENV)/.installed-dev
	PYTHON=$(PY) bash scripts/gpu_prep.sh

gpu-check-dry: $(VENV)/.installed-dev
	PYTHON=$(PY) bash scripts/gpu_check.sh --dry-run --out gpu_check_dry.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
