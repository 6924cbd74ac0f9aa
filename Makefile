# Two entry points for a fresh machine (each creates .venv and installs what it needs):
#   make demo   build the demo corpus from the real data bundled in tests/data
#   make test   lint, type-check and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build the project is tested with, and the torchvision built for it (timm needs it; a
# torchvision of another torch build fails to import). CPU or CUDA, whichever pip finds for 2.14.1.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo-corpus

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[torch,dev,dask,spatialdata]"
	touch $@ $(VENV)/.core

.PHONY: install demo test lint typecheck unit clean
install: $(VENV)/.dev

# --holdout none: the demo pins its splits (HER2ST B4, a benchmark section, to validation) so that
# train, validation and test are each non-empty (see manifests/demo.yaml); not a benchmark corpus.
demo: $(VENV)/.core
	$(BIN)/curate build manifests/demo.yaml --out $(DEMO_OUT) --holdout none

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy

unit: $(VENV)/.dev
	$(BIN)/python -m pytest

test: lint typecheck unit

clean:
	rm -rf $(VENV) $(DEMO_OUT) .mypy_cache .ruff_cache .pytest_cache
