# em_platform: `make demo` and `make test` do all set-up themselves (they create .venv).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The same defaults `em-platform settings` prints (this checkout's var/): one Dagster home and data root for
# make, the em-platform CLI and dagster commands.
export DAGSTER_HOME ?= $(CURDIR)/var/dagster_home
export EM_DATA_ROOT ?= $(CURDIR)/var/data
DEV_PORT ?= 3000
# make test runs the suite on this many processes (pytest-xdist; one module per work unit: tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: demo test test-fast dev bench lint validate clean services

$(VENV)/.installed: pyproject.toml scripts/bootstrap.sh scripts/install_chromium.sh scripts/install_s3rver.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $@

## em_stitch's real TEMCA test data (not committed: fetched from the package index, SHA-256 checked)
EM_STITCH := var/em_stitch/COMPLETE
$(EM_STITCH): scripts/fetch_em_stitch.py | $(VENV)/.installed
	$(VENV)/bin/python scripts/fetch_em_stitch.py || echo "warning: no em_stitch test data; the tests on the real TEMCA montage are skipped"

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

## demo: ingest sample volumes of every format through Dagster on the embedded defaults, print the catalog
demo: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/em-platform demo

## test: the whole test suite (PostgreSQL / RabbitMQ tests skip with a reason if those servers are absent)
test: $(VENV)/.installed services $(EM_STITCH)
	$(VENV)/bin/ruff check em_platform tests bench
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=30 tests

## test-fast: every test but the end-to-end ones (the `make demo` checkout with its browser and docs-command
## tests, the deployment's process topology): the quick loop while changing code; make test runs them all
test-fast: $(VENV)/.installed services $(EM_STITCH)
	$(VENV)/bin/ruff check em_platform tests bench
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 -m "not end_to_end" tests

## dev: Dagster UI + daemon on http://127.0.0.1:3000 (DEV_PORT=3001 make dev for another port); stops on SIGTERM
dev: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/em-platform dev --workspace workspace.yaml --host 127.0.0.1 --port $(DEV_PORT)

## bench: performance benchmarks; results in bench/results/*.json
bench: $(VENV)/.installed $(EM_STITCH)
	$(PY) -m bench.run

validate: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster definitions validate -w workspace.yaml

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check em_platform tests bench

## services: enable RabbitMQ's STOMP plugin when RabbitMQ is installed here (best effort, never fatal)
services:
	@(echo > /dev/tcp/127.0.0.1/61613) 2>/dev/null || { command -v rabbitmq-plugins >/dev/null 2>&1 && \
	  rabbitmq-plugins enable --quiet rabbitmq_stomp >/dev/null 2>&1; } || true

clean:
	rm -rf var .pytest_cache

.PHONY: deploy-local deploy-down deploy-status deploy-compose deploy-config

## deploy-local: the production topology (docker/compose.yaml's services) as processes on loopback; Ctrl-C stops it
deploy-local: $(VENV)/.installed services
	$(PY) -m em_platform.deploy up --state var/deploy

## deploy-down: stop a deploy-local started in another shell (by the PIDs it recorded), its runner included
deploy-down:
	$(PY) -m em_platform.deploy down --state var/deploy

## deploy-status: what the deploy-local of var/deploy runs where (exit 3 if a service is down)
deploy-status:
	$(PY) -m em_platform.deploy status --state var/deploy

## deploy-compose: regenerate docker/compose.yaml from the service table (em_platform/deploy/services.py)
deploy-compose: $(VENV)/.installed
	$(PY) -m em_platform.deploy compose

## deploy-config: `docker compose config` on docker/compose.yaml (needs docker/.env and Docker's compose tool)
deploy-config:
	docker compose -f docker/compose.yaml config
