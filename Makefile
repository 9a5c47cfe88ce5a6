# deepserve: `make serve` and `make test` are all a fresh clone needs (both idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000
HOST ?= 127.0.0.1
# The real datasets: ../shared/datasets when it is there, else DEEPSERVE_DATA_DIR / the user cache.
ifneq ($(wildcard ../shared/datasets),)
export DEEPSERVE_DATA_DIR ?= $(abspath ../shared/datasets)
endif
export PYTHONPATH := $(CURDIR)

.PHONY: help serve test test-fast tools loadtest stress bench train train-smoke evaluate build fixtures settings-table clean

help:
	@echo "make serve        serve exported/ models on $(HOST):$(PORT) (PORT=... to change)"
	@echo "make test         the whole test suite (starts the real server)"
	@echo "make train        retrain every model on CPU, then make evaluate (the recorded times add up to ~72 min on 2 cores)"
	@echo "make train-smoke  every family's --dry-run (one batch, scratch output)"
	@echo "make evaluate     recompute all metrics from the exported ONNX files"
	@echo "make build        bentoml build (a Bento with service/ and exported/)"
	@echo "make loadtest     locust against URL (default: starts deepserve); results/loadtest-*/"
	@echo "make stress       8x saturation for a minute: sheds fast, bounded memory, recovers"
	@echo "make bench        deepserve vs FastAPI, LitServe, no-op and in-process ORT -> docs/benchmarks.md"

$(VENV)/.serve-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.serve-installed
	$(PY) -m pip install -q -e ".[train,test,bench]"
	touch $@

serve: $(VENV)/.serve-installed
	$(VENV)/bin/bentoml serve service.service:DeepServe --host $(HOST) --port $(PORT)

test: $(VENV)/.dev-installed tools
	$(PY) -m pytest

# Prometheus (the monitoring test) and wrk (the benchmark), from Debian's packages, as root
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v wrk >/dev/null || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing prometheus and wrk (apt-get)"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus wrk >/dev/null; \
	  else echo "warning: prometheus/promtool/wrk missing and apt-get unusable: the monitoring test skips, make bench fails"; fi

loadtest: $(VENV)/.dev-installed
	loadtests/run.sh

stress: $(VENV)/.dev-installed
	DEEPSERVE_STRESS_SECONDS=60 DEEPSERVE_STRESS_CONCURRENCY=256 $(PY) -m pytest tests/service/test_overload.py -s

bench: $(VENV)/.dev-installed tools
	$(PY) -m bench

test-fast: $(VENV)/.dev-installed
	$(PY) -m pytest -m "unit or export"

FAMILIES := digits fashion sentiment generator codec denoiser
train: $(VENV)/.dev-installed
	@set -e; start=$$(date +%s); for f in $(FAMILIES); do $(PY) -m training $$f; done; \
	  echo "trained all families in $$(( ($$(date +%s) - start) / 60 )) min"
	$(MAKE) evaluate

train-smoke: $(VENV)/.dev-installed
	@set -e; start=$$(date +%s); for f in $(FAMILIES); do $(PY) -m training $$f --dry-run --out runs/dry-run; done; \
	  echo "train-smoke: every family ran in $$(( $$(date +%s) - start )) s"

evaluate: $(VENV)/.dev-installed
	$(PY) -m training.evaluate

build: $(VENV)/.serve-installed
	$(VENV)/bin/bentoml build

fixtures: $(VENV)/.dev-installed
	$(PY) tests/fixtures/make_fixtures.py

settings-table: $(VENV)/.serve-installed
	@$(PY) -m service.settings

clean:
	rm -rf runs results .pytest_cache
