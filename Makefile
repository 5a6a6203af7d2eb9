# mole: the two commands are `make demo` and `make test`; both create .venv and install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ASSETS ?= .cache/demo_assets

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch is installed first and pinned: 2.13.0 resolves to the CPU wheel on these machines,
# while a loose requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/mole demo --assets $(ASSETS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy mole shared worker coordinator modal_deploy benchmarks

test: lint
	MOLE_ASSETS_CACHE=$(CURDIR)/$(ASSETS) $(BIN)/pytest -q

bench: install
	$(BIN)/mole-bench --assets $(ASSETS)

clean:
	rm -rf $(VENV) .cache
