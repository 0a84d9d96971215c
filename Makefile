# The two commands of the README: `make demo` and `make test` (lint, then the tests). Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
# torch is installed before the project so that the build you choose stays (see README, "Install").
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

BIN := $(VENV)/bin

.PHONY: setup demo test dev dev-stop clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# An old pip's resolver fails on s3fs's exact fsspec pin; a current one resolves it. uv installs
	# the rest in seconds (pip takes minutes over ray's many dependencies); pip where uv cannot.
	# Bytecode is compiled at install, as pip does: with PYTHONDONTWRITEBYTECODE set (CI images),
	# every process would otherwise compile Ray from source on import.
	$(BIN)/pip install -q --upgrade pip uv
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e ".[test]" || $(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/python -m jobs.demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# Local S3 API (moto, 127.0.0.1:9000) and Ray head (dashboard 127.0.0.1:8265) for development.
dev: setup
	infra/local/dev.sh

dev-stop:
	infra/local/dev.sh stop

clean:
	rm -rf $(VENV) demo-data .dev
