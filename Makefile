# The two commands of the README: `make demo` (main job on built-in data) and `make test`.
# Both create or reuse .venv in this checkout and install the project into it.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that lies on this machine's disk; a plain `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.neurofed-installed
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neurofed synth $(DEMO_OUT)/data --sites 4 --subjects-per-site 6 --seed 0

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
