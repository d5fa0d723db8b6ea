# Everything a fresh machine needs: `make test` and `make demo` create the virtual
# environment themselves. torch is installed first from its CPU build (about 200 MB)
# so that pip does not pick a multi-GB CUDA build for the dependency.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test demo lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,train,ray]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/negmerge demo

lint: $(STAMP)
	$(BIN)/ruff check negmerge_cli tests benchmarks
	$(BIN)/ruff format --check negmerge_cli tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format negmerge_cli tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_merge.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
