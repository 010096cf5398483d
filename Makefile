# The two commands of the README: `make demo` (main job on built-in data) and `make test`.
# Both create or reuse .venv in this checkout and install the project into it.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that lies on this machine's disk; a plain `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.neurofed-installed
# Each demo writes a fresh run directory (a finished run is never overwritten or resumed by accident).
DEMO_STAMP := $(shell date +%Y%m%d-%H%M%S)
DEMO_OUT ?= runs/demo-$(DEMO_STAMP)

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: a federation of 4 simulated hospitals (3 train, 1 unseen) on built-in data, with subject-level
# DP (ε = 8 per site, the default) from the built-in public starting model, compared with the same
# configuration without DP (--compare-without-dp), the starting model alone, and local-only and pooled models
# of the same budget; ends with RUN_DIR/report.html. The sites evaluate the global model once, after the
# last round (the run's defaults: 5 rounds x 10 local steps).
demo: $(STAMP)
	$(VENV)/bin/neurofed simulate --compare-without-dp --eval-every 5 --out $(DEMO_OUT)
	@echo "demo report: file://$(abspath $(DEMO_OUT))/report.html"

# pytest-xdist workers (one a core, at most 4), each taking whole modules, the federation tests and the
# rehearsal first (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -q -n auto --no-loadscope-reorder

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
