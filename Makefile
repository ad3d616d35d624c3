# Two commands on a fresh clone: `make demo` (set up, then the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stepcache-installed

.PHONY: demo test setup clean

setup: $(STAMP)

# Create or update the virtual environment. Where no torch is installed, take the local CPU build
# (torch==2.13.0); a plain `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stepcache demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) demo_out .pytest_cache
