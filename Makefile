# Everything a fresh machine needs: `make test` and `make demo` create the virtual
# environment themselves. torch and torchvision are installed first, as a matching pair
# (open_clip needs torchvision, and a torchvision of another build fails to import).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: test demo lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev,train,clip,ray]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/negmerge demo

lint: $(STAMP)
	$(BIN)/ruff check negmerge_cli tests benchmarks scripts
	$(BIN)/ruff format --check negmerge_cli tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff format negmerge_cli tests benchmarks scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_merge.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
