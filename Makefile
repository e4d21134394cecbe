# Set-up and entry points. Every target installs what it needs first (idempotent).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# a clean venv; VENV_FLAGS=--system-site-packages reuses the system's packages (e.g. a CUDA torch)
VENV_FLAGS ?=
TORCH_VERSION ?= 2.13.0
# every part and the tests; the dependency lists are pyproject.toml's extras
EXTRAS := fairseq,lightning,experiments,test
# pytest-xdist workers; a test file runs whole in one worker, so its module fixtures are built once
TEST_WORKERS ?= 2

.PHONY: install test test-fast demo bench format clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	# Reuse a torch that is already importable (e.g. a CUDA build a GPU user brought);
	# otherwise pin the CPU build so pip never resolves an unpinned multi-GB CUDA torch.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install --no-build-isolation -e ".[$(EXTRAS)]"
	# fairseq-fixed with --no-deps --no-build-isolation (its metadata would pull a CUDA torch)
	$(VENV)/bin/atbptt-install-fairseq
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests -m "not e2e"

demo: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) scripts/demo.py

bench: install
	$(PY) scripts/bench_throughput.py
	$(PY) scripts/bench_estimator.py

format: install
	$(PY) -c "import ruff" 2>/dev/null || $(PIP) install ruff
	$(PY) -m ruff format atbptt atbptt_fairseq atbptt_lightning examples scripts tests

clean:
	rm -rf $(VENV) build *.egg-info
