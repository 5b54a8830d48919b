# Two commands on a fresh machine: `make train` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv train ui server docs test test-fast lint format clean

venv: $(STAMP)

# Some machines (this project's among them) set PYTHONDONTWRITEBYTECODE: then nothing caches
# compiled bytecode, and each of the suite's many Python processes recompiles torch, lightning
# and mlflow (measured: 30 s per import instead of 9 s). The install below skips compiling all
# of them (≈1 min); the first imports cache what is used.
unexport PYTHONDONTWRITEBYTECODE

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch and torchvision through pip, whose configuration serves them from local disk on
	# the dev and CI machines; --no-compile: byte-compiling all of torch costs about a minute,
	# and imports cache what they use. The other ≈250 packages through uv, which resolves and
	# downloads in parallel (measured on a clean clone, 2026-12-01: 53 s in all against 95 s
	# with pip alone) and keeps the torch installed here.
	$(BIN)/python -m pip install --quiet --no-compile 'torch>=2.6' 'torchvision>=0.21' 'uv>=0.5'
	$(BIN)/uv pip install --python $(BIN)/python --quiet -e '.[dev]'
	touch $(STAMP)

train: venv
	$(BIN)/python scripts/train.py $(ARGS)

# The MLflow UI on the default store, http://127.0.0.1:5000 (ARGS="--port 5001" for another).
ui: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db $(ARGS)

# A shared tracking server on 127.0.0.1:5000; BACKEND_STORE_URI=postgresql://… for PostgreSQL.
server: venv
	$(BIN)/python scripts/server.py $(ARGS)

# The tutorial's screenshots, docs/img/*.png, from runs made into a temporary store.
docs: venv
	tools/install-chromium
	$(BIN)/python scripts/screenshots.py $(ARGS)

# Two test processes (pytest-xdist), a test file each at a time: most tests wait on a
# subprocess, a server or a single-threaded step, so one process leaves a core idle
# (measured: ≈1 core busy on average over the suite on 2 cores; three processes were slower,
# 450 s against 426 s, 2026-12-01). Files go out costliest first
# (tests/conftest.py), not by test count.
TEST_WORKERS ?= 2

test: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The unit layer only (tests/unit: no fit, no subprocess, no network): seconds, after every change.
test-fast: venv
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) mlflow.db mlruns mlserver .pytest_cache
