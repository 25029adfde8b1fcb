# The two commands of the README. Each creates/updates its own virtual environment.
PYTHON ?= python3.12
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-quick lint-imports bench clean

$(STAMP): setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 && $(PYTHON) --version >/dev/null 2>&1 || { \
	  echo "error: $(PYTHON) not found (Python 3.12 is required; with pyenv, .python-version selects it)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,hf]"
	touch $(STAMP)

# A fresh run each time (a second run in the same dir would just resume at the end).
demo: $(STAMP)
	rm -rf runs/demo
	$(PY) -m rnope_megatron.train recipes/tiny-cpu.yaml logging.run_dir=runs/demo

# Test files run on JOBS pytest-xdist workers, one per core by default: a whole file per
# worker (its module fixtures are built once), and each worker and the trainers it starts
# get their share of the cores (tests/conftest.py). JOBS=1 runs everything in one process.
JOBS   ?= $(shell nproc 2>/dev/null || echo 1)
XDIST  := $(if $(filter 0 1,$(JOBS)),,-n $(JOBS) --dist loadfile --no-loadscope-reorder)

# Everything (what CI runs): the layer contract, then every test tier.
test: lint-imports
	$(PY) -m pytest -q $(XDIST) --durations=15 tests

# The inner loop: the fast tiers (unit, numeric; see CONTRIBUTING.md "Test tiers").
test-quick: lint-imports
	$(PY) -m pytest -q $(XDIST) tests -m "unit or numeric"

# The package's layers import only downward (.importlinter).
lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/attention.py

clean:
	rm -rf $(VENV) build *.egg-info
