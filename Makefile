# Entry points for a fresh machine with only Python 3.11+ and pip:
#   make demo   the whole method on the embedded default model (safesteer run --preset demo)
#   make test   runs the test suite (unit + integration)
#   make test-oldest  the suite on the oldest dependency releases pyproject.toml allows
#   make compare  SafeSteer against its baselines (safesteer compare; the README's Results)
#   make report-check  renders the demo's report in headless Chromium (installed if missing)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUTPUT_DIR ?= runs/demo
# The CPU build of torch, installed first so that nothing pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo compare report-check test test-oldest lint clean

$(BIN)/safesteer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/safesteer

demo: install
	$(BIN)/safesteer run --preset demo --output-dir $(OUTPUT_DIR) --overwrite
	$(BIN)/safesteer report $(OUTPUT_DIR)

compare: install
	$(BIN)/safesteer compare --output-dir runs/compare --generation-dtype auto --score-dtype auto --jobs 2

report-check: install
	$(BIN)/python benchmarks/report_check.py $(OUTPUT_DIR) --install

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

# Its own environment on the oldest Python requires-python allows (the pins have no wheels for
# later ones); the cache is shared, each transformers major converting the embedded model apart.
OLDEST_VENV ?= .venv-oldest
OLDEST_PYTHON ?= python3.11
test-oldest:
	$(OLDEST_PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(OLDEST_VENV)/bin/python -m pip install -q -c .ci/oldest.txt -e ".[test]"
	$(OLDEST_VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(OLDEST_VENV) runs
