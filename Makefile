# One entry point for people, the README and CI.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install fleet stop test test-docker lint typecheck pytest bench bench-quick services reliability

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Bring up a local fleet (Redis, the vLLM simulator unless VLLM_URL is set, a worker, beat) and run a sample of each task.
fleet: install
	bash scripts/services.sh redis
	$(BIN)/python scripts/fleet.py up --sample

## Stop what `make fleet` started (standard library only: works before `make install`, on a fresh clone).
stop:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/fleet.py down

## Every check: lint, types, and the whole test suite against real Redis, RabbitMQ and the simulator
## (installs what the tests need where missing: Redis, RabbitMQ, a Compose client to validate docker-compose.yml).
test: install
	bash scripts/services.sh redis rabbitmq compose
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest

## pytest-celery's Docker-based smoke tests (needs a Docker engine; not part of `make test`).
test-docker: install
	$(BIN)/python -m pytest -p celery -o addopts="" tests_docker

## The fault suite's full profile (by hand: several minutes; its short profile runs inside `make test`).
## Rows go to .run/reliability-report.jsonl; VFT_RELIABILITY_SCALE=4 sizes it for a bigger machine.
reliability: install
	bash scripts/services.sh redis rabbitmq
	mkdir -p .run && rm -f .run/reliability-report.jsonl
	VFT_RELIABILITY_PROFILE=full VFT_RELIABILITY_REPORT=$(CURDIR)/.run/reliability-report.jsonl \
		$(BIN)/python -m pytest -o addopts="-p no:celery -p no:cacheprovider -ra --timeout=1800" -s tests/reliability

bench: install
	bash scripts/services.sh redis rabbitmq
	$(BIN)/python -m bench --mode full

bench-quick: install
	bash scripts/services.sh redis rabbitmq
	$(BIN)/python -m bench --mode quick

services:
	bash scripts/services.sh redis rabbitmq
