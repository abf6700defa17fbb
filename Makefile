# fewshot: `make train` runs the main job, `make test` runs the tests; both install first.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
ARGS   ?=
# One test process per core (pytest-xdist); TEST_JOBS=0 runs the tests in one process, as pytest alone does.
TEST_JOBS ?= auto
PYTEST  = $(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal
export FEWSHOT_DATA_ROOT ?= $(if $(wildcard ../shared/data/omniglot),$(abspath ../shared/data),$(CURDIR)/data)

.DEFAULT_GOAL := help
.PHONY: help install train eval test test-fast lint bench reproduce ledger clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  data root: $(FEWSHOT_DATA_ROOT)   (override with FEWSHOT_DATA_ROOT=...)"

install: $(STAMP)  ## create .venv and install fewshot with its dependencies (idempotent)

# Re-runs only when the dependency list or the learn2learn installer changes.
$(STAMP): pyproject.toml scripts/install_learn2learn.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "torch>=2.4,<3" "torchvision>=0.19"
	scripts/install_learn2learn.sh $(PY)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

train: install  ## meta-train MAML on Omniglot (fewshot-train algo=maml dataset=omniglot; ARGS="..." adds overrides)
	$(VENV)/bin/fewshot-train algo=maml dataset=omniglot $(ARGS)

eval: install  ## evaluate a checkpoint: make eval ARGS="checkpoint=outputs/.../checkpoints/best.pt"
	$(VENV)/bin/fewshot-eval $(ARGS)

test: install  ## run the test suite on CPU, one process per core (TEST_JOBS=0: one process)
	$(PYTEST) --durations=10 $(ARGS)

lint: install  ## ruff: lint and format check (line length 120; `ruff format` fixes the layout)
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

test-fast: install  ## tests without the slow real-training ones
	$(PYTEST) -m "not slow" $(ARGS)

bench: install  ## CPU benchmarks in one process each: sampler, MAML, Meta-SGD and ANIL against learn2learn, MAML++ against MAML, Reptile against torch.optim.Adam and its test against the task loop, MANN against its per-step form and compiled, NHWC against the default layout, freed memory kept against glibc's malloc
	$(PY) scripts/bench_sampler.py
	$(PY) scripts/bench_maml.py --device cpu
	$(PY) scripts/bench_descendants.py --device cpu
	$(PY) scripts/bench_reptile.py --device cpu
	$(PY) scripts/bench_reptile.py --device cpu --test
	$(PY) scripts/bench_mann.py
	$(PY) scripts/bench_channels_last.py
	$(PY) scripts/bench_malloc.py

TABLE ?= maml-omniglot
reproduce: install  ## run a paper table (TABLE=maml-omniglot|protonet-omniglot|...; ARGS="-- trainer.iterations=2000")
	$(PY) scripts/reproduce.py $(TABLE) $(ARGS)

ledger: install  ## regenerate RESULTS.md from the runs kept under results/ (fewshot-table --ledger)
	$(VENV)/bin/fewshot-table --ledger results -o RESULTS.md

clean:  ## remove .pytest_cache, egg-info and __pycache__ (keeps .venv, data, outputs/ and the image cache)
	rm -rf .pytest_cache src/*.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
