# em_platform: `make demo` and `make test` do all set-up themselves (they create .venv).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The same defaults `em-platform settings` prints (this checkout's var/): one Dagster home and data root for
# make, the em-platform CLI and dagster commands.
export DAGSTER_HOME ?= $(CURDIR)/var/dagster_home
export EM_DATA_ROOT ?= $(CURDIR)/var/data
DEV_PORT ?= 3000
# make test runs the suite on this many processes (pytest-xdist; one module per work unit: tests/conftest.py).
# Three on two cores: many tests wait on subprocesses (Dagster runs, SLURM jobs, servers), and a third process
# fills those waits; four overload the machine (bench/bench_suite.py times a choice: TEST_WORKERS=N)
TEST_WORKERS ?= 3

.PHONY: demo test test-e2e test-fast dev bench bench-scale bench-cryo-live lint validate clean services compiled ops-engine test-ops

$(VENV)/.installed: pyproject.toml scripts/bootstrap.sh scripts/install_chromium.sh scripts/install_s3rver.sh
	bash scripts/bootstrap.sh $(VENV)
	# the live chain's compiled CLAHE into numba's cache once, not in every test worker and run process at once
	$(VENV)/bin/python -c "from em_platform.tem.tile_tasks import warm_up; warm_up()"
	touch $@

## em_stitch's real TEMCA test data (not committed: fetched from the package index, SHA-256 checked)
EM_STITCH := var/em_stitch/COMPLETE
$(EM_STITCH): scripts/fetch_em_stitch.py | $(VENV)/.installed
	$(VENV)/bin/python scripts/fetch_em_stitch.py || echo "warning: no em_stitch test data; the tests on the real TEMCA montage are skipped"

# em_platform's modules compiled (only those changed since): where PYTHONDONTWRITEBYTECODE is set (this machine,
# CI, the images) Python never writes them, and every process of a run, a test or a Dask worker would compile
# them again (0.35 s of CPU each; make test starts hundreds)
compiled: $(VENV)/.installed
	@$(PY) -m compileall -q em_platform

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

## demo: ingest sample volumes of every format through Dagster on the embedded defaults, print the catalog
demo: compiled $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/em-platform demo

# suites of their own targets, not make test's: the faults that kill services for minutes (make test-faults,
# test-slurm), the SLURM run's page in a browser and the single-node SLURM harness's own tests
# and how a run ends its jobs (make test-slurm)
OWN_TARGET_SUITES = tests/deploy/test_faults.py tests/slurm/test_faults_on_slurm.py \
  tests/slurm/test_run_page_on_slurm.py tests/slurm/test_harness.py \
  tests/slurm/test_release_on_slurm.py

## test: the test suite (PostgreSQL / RabbitMQ tests skip with a reason if those servers are absent); the two
## end-to-end units are make test-e2e's, which CI runs after it
test: lint compiled services slurm-engine ops-engine $(EM_STITCH)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=40 -m "not end_to_end" --ignore=tests/compose --ignore=tests/ops $(OWN_TARGET_SUITES:%=--ignore=%) tests

## test-e2e: the end-to-end units, each a chain of its own on one process: a fresh checkout's `make demo` (twice)
## with the browser tests of the UI and Neuroglancer and every command the README and docs/ show; the
## deployment's process topology (daemon, webserver, code server, Dask, S3, PostgreSQL, broker, live QC)
test-e2e: compiled services slurm-engine ops-engine $(EM_STITCH)
	$(PY) -m pytest -q -n 2 --durations=20 -m end_to_end --ignore=tests/compose --ignore=tests/ops $(OWN_TARGET_SUITES:%=--ignore=%) tests

## test-fast: make test without its `slow` tests (whole Dagster runs): the quick loop while changing code
test-fast: lint compiled services slurm-engine ops-engine $(EM_STITCH)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 -m "not end_to_end and not slow" --ignore=tests/compose --ignore=tests/ops $(OWN_TARGET_SUITES:%=--ignore=%) tests

## dev: Dagster UI + daemon on http://127.0.0.1:3000 (DEV_PORT=3001 make dev for another port); stops on SIGTERM
dev: compiled $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/em-platform dev --workspace workspace.yaml --host 127.0.0.1 --port $(DEV_PORT)

## bench: performance benchmarks; results in bench/results/*.json
bench: compiled $(EM_STITCH)
	$(PY) -m bench.run

## bench-scale: the stores filled as MONTAGES montages of a facility leave them (PostgreSQL databases
## em_scale_*, dropped afterwards), measured at 10^3, 10^4 ... MONTAGES; results in bench/results/scale.json
MONTAGES ?= 10000
bench-scale: compiled
	$(PY) -m bench.bench_scale --montages $(MONTAGES) $(SCALE_ARGS)

## bench-cryo-live: a live single-particle session (one 4096² × 40 exposure every 10 s for an hour) processed
## by cryo-live as it lands; results in bench/results/cryo_live.json, the lag plot in docs/img/cryo-live-lag.png
bench-cryo-live: compiled
	$(PY) -m bench.bench_cryo_live $(CRYO_LIVE_ARGS)

validate: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster definitions validate -w workspace.yaml

## lint: ruff (lint and format), the layers (lint-imports: [tool.importlinter] in pyproject.toml) and the type
## checker on the domain packages ([tool.mypy]); make test and test-fast run it first
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check em_platform tests bench scripts
	$(VENV)/bin/ruff format --check em_platform tests bench scripts
	$(VENV)/bin/lint-imports --no-logo
	$(VENV)/bin/mypy

## services: enable RabbitMQ's STOMP plugin when RabbitMQ is installed here (best effort, never fatal)
services:
	@(echo > /dev/tcp/127.0.0.1/61613) 2>/dev/null || { command -v rabbitmq-plugins >/dev/null 2>&1 && \
	  rabbitmq-plugins enable --quiet rabbitmq_stomp >/dev/null 2>&1; } || true

clean:
	rm -rf var .pytest_cache

.PHONY: deploy-local deploy-down deploy-status deploy-compose deploy-config images compose-up compose-down compose-status test-compose test-slurm slurm-engine test-faults

## deploy-local: the production topology (docker/compose.yaml's services) as processes on loopback; Ctrl-C stops it
deploy-local: $(VENV)/.installed services ops-engine
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

# compose settings of make compose-*: docker/.env (compose-up writes one with new secrets when there is none)
COMPOSE_ENV ?= docker/.env

## images: the user-code and Dagster images (Docker, or podman from a Debian base made here without a registry)
images: $(VENV)/.installed container-engine
	$(PY) -m em_platform.deploy images

## compose-up: docker/compose.yaml up as containers on this host (writes docker/.env with new secrets if absent)
compose-up: images
	$(PY) -m em_platform.deploy compose-up --env-file $(COMPOSE_ENV)

## compose-down: remove the stack's containers, its runs' too; the volumes (records, objects) are kept
compose-down: $(VENV)/.installed
	$(PY) -m em_platform.deploy compose-down --env-file $(COMPOSE_ENV)

## compose-status: each container of the stack and its runs, health checked now
compose-status: $(VENV)/.installed
	$(PY) -m em_platform.deploy compose-status --env-file $(COMPOSE_ENV)

## container-engine: podman, runc and debootstrap from Debian's packages where there is no Docker engine (as root)
container-engine:
	@bash scripts/install_podman.sh

## test-compose: the compose stack end to end in containers: build, up, the demo workload, faults, down/up
test-compose: compiled services container-engine
	$(PY) -m pytest -q -p no:cacheprovider --durations=20 tests/compose

## test-faults: the process topology's fault suite: the daemon, a Dask worker, a run, the listener and the object
## store killed mid-ingest or mid-montage, each ending with nothing lost or duplicated
test-faults: compiled services ops-engine $(EM_STITCH)
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 tests/deploy/test_faults.py

## test-slurm: the platform on a real single-node SLURM started here: results equal to the local cluster's, then
## its faults (a worker job cancelled, a walltime, slurmctld restarted, a queue that starts nothing or stops
## starting jobs mid-run) and the run's page in a browser showing its SLURM jobs
test-slurm: compiled services slurm-engine
	$(PY) -m pytest -q -p no:cacheprovider --durations=20 tests/slurm

## test-ops: the operations suite: a real Prometheus scrapes the services and a real Alertmanager pages a webhook
## receiver; each fault injected (live QC killed, the Dask worker killed, a scope silent mid-montage, the buffer
## filled) must page, then clear when repaired
test-ops: compiled services ops-engine
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 tests/ops

## ops-engine: Debian's prometheus (promtool) and prometheus-alertmanager for the alert rules' tests (as root)
ops-engine:
	@bash scripts/install_prometheus.sh

## slurm-engine: Debian's slurm-wlm and munge for the tests against a real single-node SLURM (tests/slurm; as root)
slurm-engine:
	@bash scripts/install_slurm.sh

## deploy-config: `docker compose config` on docker/compose.yaml (needs docker/.env and Docker's compose tool)
deploy-config:
	docker compose -f docker/compose.yaml config
