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

.PHONY: help serve test test-fast test-noisy lint tools loadtest stress bench bench-framing bench-priority bench-shadow bench-ab mutants train train-smoke evaluate publish build fixtures settings-table clean gpu-check gpu-verify gpu-stage screenshots image image-gpu test-image-gpu

help:
	@echo "make serve        serve exported/ models on $(HOST):$(PORT) (PORT=... to change)"
	@echo "make test         the whole test suite on two workers (starts the real server)"
	@echo "make test-noisy   the timing-sensitive tests RUNS=5 times in a row beside a busy-loop process"
	@echo "make train        retrain every model on CPU, then make evaluate (the recorded times add up to ~72 min on 2 cores)"
	@echo "make train-smoke  every family's --dry-run (one batch, scratch output)"
	@echo "make evaluate     recompute all metrics from the exported ONNX files"
	@echo "make publish FAMILY=f [EPOCHS=n]   train a new inactive version of one family, evaluate it, print how to load it"
	@echo "make lint         ruff check + ruff format --check (part of make test)"
	@echo "make build        bentoml build (a Bento with service/ and exported/)"
	@echo "make image       the Bento's image (bentoml containerize) on a base made by debootstrap; make image-gpu, make test-image-gpu"
	@echo "make loadtest     locust against URL (default: starts deepserve); results/loadtest-*/"
	@echo "make stress       goodput at 8x saturation per endpoint (wrk, resending clients); 256 clients for a minute"
	@echo "make bench        deepserve vs FastAPI, LitServe, no-op and in-process ORT -> docs/benchmarks.md"
	@echo "make mutants      deliberate faults in the service: each must be caught by a test (docs/testing.md)"
	@echo "make bench-framing  /classify before and after server-side framing (28×28, canvas, photo), ABBA"
	@echo "make bench-priority the noisy neighbour: bystanders' latency with a heavy client at each priority class"
	@echo "make bench-shadow   what a 100% shadow costs the primary at moderate load and at saturation (2 workers)"
	@echo "make bench-ab BASE=c [NEW=c] [INPROCESS=1]  two commits side by side, interleaved (the priority machinery's cost)"
	@echo "make gpu-check    the GPU image's packages in .venv-gpu-check (~1.6 GB download): CUDA libraries all resolve (docs/gpu.md)"
	@echo "make gpu-verify   on a GPU: parity, batch sweep, server with batching on/off -> $$OUT (DEVICE=cpu: the 2-minute check here)"
	@echo "make gpu-stage    onnxruntime-gpu + the serving wheels a device lacks, in parts for the device tool (.stage/RUNBOOK.md)"

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

# Two pytest-xdist workers (TEST_WORKERS): a module's tests stay on one worker, the container
# tests share one (tests/conftest.py: pytest_xdist_make_scheduler); shuffled by
# pytest-randomly, the seed printed
TEST_WORKERS ?= 2
test: $(VENV)/.dev-installed tools lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --durations=15

# System tools from Debian's packages, as root: prometheus + promtool (the monitoring test),
# wrk (make bench, make stress), haproxy (the replica-crash test), chromium + chromedriver
# (the playground's browser test), docker.io + debootstrap (make image, the container and
# swarm tests; the tests start dockerd when it is not running). Tests that need a missing
# tool skip with a clear message.
TOOLS := prometheus promtool wrk haproxy chromium chromedriver docker dockerd debootstrap
APT_TOOLS := prometheus wrk haproxy chromium chromium-driver docker.io debootstrap
tools:
	@missing=""; for t in $(TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing (apt-get)"; \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_TOOLS) >/dev/null; \
	else echo "warning:$$missing missing and apt-get unusable: the tests that need them skip, make bench fails"; fi

loadtest: $(VENV)/.dev-installed
	loadtests/run.sh

# overload goodput per model endpoint with wrk (clients that resend at once) -> docs/benchmarks.md,
# then a minute of 256 Python clients: only 200/503, bounded memory, ready at once afterwards
stress: $(VENV)/.dev-installed tools
	$(PY) -m bench.stress
	DEEPSERVE_STRESS_SECONDS=60 DEEPSERVE_STRESS_CONCURRENCY=256 $(PY) -m pytest tests/service/test_overload.py -s

bench: $(VENV)/.dev-installed tools
	$(PY) -m bench

# deliberate faults in the service, each of which the suite must catch (docs/testing.md)
mutants: $(VENV)/.dev-installed tools
	$(PY) tests/mutants.py

# what server-side framing costs on /classify: the commit before it against this checkout, ABBA
bench-framing: $(VENV)/.dev-installed tools
	$(PY) -m bench.framing

# a heavy /generate client at the interactive and at the batch class, bystanders on /classify
bench-priority: $(VENV)/.dev-installed tools
	$(PY) -m bench.priority

# two commits side by side: interleaved wrk bursts on every endpoint, or with INPROCESS=1 the
# /classify text path without HTTP in lockstep chunks (the priority machinery's cost:
# make bench-ab BASE=99142e7 INPROCESS=1; docs/benchmarks.md)
BASE ?= HEAD~1
NEW ?= HEAD
bench-ab: $(VENV)/.dev-installed tools
	$(PY) -m bench.ab --base $(BASE) --new $(NEW) $(if $(INPROCESS),--inprocess --rounds 400 --out docs/priority_ab_inprocess_bench.json,)

# a candidate on a 100% shadow against none, interleaved, at 4 and 64 connections
bench-shadow: $(VENV)/.dev-installed tools
	$(PY) -m bench.shadow

test-fast: $(VENV)/.dev-installed
	$(PY) -m pytest -m "unit or contract or export"

# The timing-sensitive tests (marker `timing`) RUNS times in a row, shuffled, with one
# busy-loop process beside them taking a core: they must hold on a loaded CI machine too.
RUNS ?= 5
test-noisy: $(VENV)/.dev-installed tools
	@$(PY) -c 'while True: pass' & hog=$$!; trap "kill $$hog" EXIT; \
	for i in $$(seq $(RUNS)); do echo "== run $$i of $(RUNS), beside a busy core"; \
	  $(PY) -m pytest -m timing -q || exit 1; done

# every family of the registry (training/families.py), never a hand-kept list
FAMILIES = $(shell $(PY) -m training --list)
train: $(VENV)/.dev-installed
	@set -e; start=$$(date +%s); for f in $(FAMILIES); do $(PY) -m training $$f; done; \
	  echo "trained all families in $$(( ($$(date +%s) - start) / 60 )) min"
	$(MAKE) evaluate

train-smoke: $(VENV)/.dev-installed
	@set -e; start=$$(date +%s); for f in $(FAMILIES); do $(PY) -m training $$f --dry-run --out runs/dry-run; done; \
	  echo "train-smoke: every family ran in $$(( $$(date +%s) - start )) s"

# a new, inactive version of one family in the model directory the server reads
# (DEEPSERVE_EXPORTED_DIR when set, else exported/), evaluated against its bars,
# with its smoke set; prints the admin call that loads it into a running server
FAMILY ?=
EPOCHS ?=
publish: $(VENV)/.dev-installed
	@test -n "$(FAMILY)" || { echo "usage: make publish FAMILY=<$$($(PY) -m training --list | tr ' ' '|')> [EPOCHS=n]"; exit 2; }
	$(PY) -m training.publish $(FAMILY) --exported "$${DEEPSERVE_EXPORTED_DIR:-exported}" $(if $(EPOCHS),--epochs $(EPOCHS))

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

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

# The GPU image's python packages (deploy/bentofile-gpu.yaml) in a scratch venv: ONNX Runtime's
# CUDA provider must resolve every library but the driver's libcuda.so.1. Not in `make test`.
gpu-check:
	$(PYTHON) deploy/gpu_check.py --venv .venv-gpu-check

# Batched inference on a GPU in one prepared run (docs/gpu.md, "Device runbook"): every active
# model's parity with the CPU and a batch-size sweep, written to $(OUT) before the real server
# starts with batching on, then off, under an asyncio load. On the device: DEVICE=cuda (the
# default; no fallback), packages from /tmp/site (make gpu-stage's parts); here: DEVICE=cpu.
DEVICE ?= cuda
OUT ?= results/gpu-verify
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-verify:
	$(GPU_PY) -m deploy.gpu.verify --device $(DEVICE) --out $(OUT) $(if $(filter cpu,$(DEVICE)),--quick)

# onnxruntime-gpu (CUDA provider pruned to sm_90; ALL_ARCHS=1 keeps every GPU) and the serving
# wheels the device image lacks, packed and split to fit the device tool's 64 MiB per call
# -> .stage/ (ignored) and the exact calls in .stage/RUNBOOK.md
gpu-stage: $(VENV)/.serve-installed
	$(PY) -m deploy.gpu.stage build $(if $(ALL_ARCHS),--all-archs)

# The Bento and its image, the way a BentoML user builds them (bentoml build + bentoml
# containerize, BuildKit), on deepserve-base:bookworm: made from Debian's packages by
# debootstrap once per machine (no image registry needed; deploy/image/). Prints the tag;
# also tagged deepserve:latest (deepserve-gpu:latest). Not in make test: its tests build it.
image: $(VENV)/.serve-installed tools
	deploy/image/build.sh bentofile.yaml

# the GPU image (~1.9 GB of CUDA wheels: outside make test) and its own check: make gpu-check's
# logic (deploy/gpu_check.py) run inside the image, against the image's /app/.venv
image-gpu: $(VENV)/.serve-installed tools
	deploy/image/build.sh deploy/bentofile-gpu.yaml

test-image-gpu: image-gpu
	deploy/image/gpu_check.sh deepserve-gpu:latest

# the playground's screenshots in docs/img/ (shown by the README), from a run of its browser test
screenshots: $(VENV)/.dev-installed tools
	$(PY) tests/browser/make_screenshots.py
