# PecSched developer entry points. `make run` and `make test` each set up everything they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/pecsched/v1/*.proto)
PROTOC := $(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
	--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --mypy_out=. \
	--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=.

.PHONY: help setup run sim test lint fmt protos check-protos bench paper-eval clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(STAMP)  ## Create .venv with torch (CPU build) and the project in editable mode

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first and exact: a CPU build from local disk, so pip never pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dataplane,dev]'
	@touch $@

run: setup  ## The main job: a local cluster (control plane + one tiny CPU worker per core + a short-decode one) serves one Azure trace slice, at a calibrated load, under fifo, then pecsched, prints both side by side, then serves until Ctrl-C
	$(VENV)/bin/pecsched up --demo

sim: setup  ## One simulation: both Azure traces, 32 x A100, Mistral-7B, the four policies
	$(VENV)/bin/pecsched sim \
		--gpus 32 --gpu a100 --model mistral-7b --policy all

paper-eval: setup  ## The evaluation in the simulator, 3 seeds; rewrites docs/evaluation.md and docs/img (QUICK=1: a subset for 2 cores)
	$(PY) bench/paper_eval.py --jobs $$(nproc) $(if $(QUICK),--quick)

test: setup  ## Unit, integration and e2e tests on CPU (PostgreSQL tests run when it is reachable)
	$(PY) -m pytest -q

lint: setup  ## ruff check + format check, mypy strict on every package, import-linter contracts
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy controlplane dataplane sim sdk pecsched gateway
	$(VENV)/bin/lint-imports

fmt: setup  ## Format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

protos: setup  ## Regenerate the committed protobuf/gRPC code
	$(PROTOC) $(PROTO_SRC)

check-protos: setup  ## Fail if the committed generated code differs from a fresh generation
	@tmp=$$(mktemp -d) && mkdir -p $$tmp/protos/pecsched/v1 && \
	cp $(PROTO_SRC) $$tmp/protos/pecsched/v1/ && \
	(cd $$tmp && $(abspath $(PY)) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy=$(abspath $(VENV))/bin/protoc-gen-mypy --mypy_out=. \
		--plugin=protoc-gen-mypy_grpc=$(abspath $(VENV))/bin/protoc-gen-mypy_grpc --mypy_grpc_out=. \
		protos/pecsched/v1/*.proto) && \
	for f in $$tmp/protos/pecsched/v1/*_pb2*; do \
		diff -u protos/pecsched/v1/$$(basename $$f) $$f || { echo "generated code is stale: run make protos"; exit 1; }; \
	done && \
	extra=$$(comm -13 <(cd $$tmp/protos/pecsched/v1 && ls *_pb2* | sort) <(cd protos/pecsched/v1 && ls *_pb2* | sort)) && \
	{ [ -z "$$extra" ] || { echo "generated files without a .proto: $$extra"; exit 1; }; } && \
	rm -rf $$tmp && echo "protos up to date"

bench: setup  ## CPU benchmarks (tables on stdout; see BENCHMARKS.md)
	@for f in bench/*.py; do case $$f in *_gpu.py) ;; *) echo "== $$f"; $(PY) $$f || exit 1;; esac; done

clean:  ## Remove the virtual environment and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache
