"""Faults an operator meets, on the containers: a run's container killed mid-ingest, the daemon's and a Dask
worker's containers killed (their main process SIGKILLed, as a crash: compose's restart policy brings them
back), PostgreSQL restarted under a running ingest, the S3 server killed and started again. Each ends with
every dataset complete exactly once, its stored pixels the dropped volume's and its objects present with
their checksums (tests/deploy/faults.py counts, from the catalog, Dagster's runs and the store); nothing
here is tuned: the production instance (docker/dagster.yaml) watches runs every 15 s."""

from __future__ import annotations

import json
import time
import uuid
import warnings

import pytest

from tests.deploy.conftest import drop_into_inbox
from tests.deploy.dagster_api import wait_until
from tests.support.outcomes import FaultResult, datasets_outcome, wait_partition_started, wait_partitions_done

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
RESULTS: list[FaultResult] = []


def _name(kind: str) -> str:
    return f"fault_{kind}_{uuid.uuid4().hex[:6]}.ome.tif"


def _step_started(api, run_id: str) -> bool:
    return any("Started execution of step" in (e.get("message") or "") for e in api.run_events(run_id))


def _running_run(api, key: str) -> dict:
    wait_partition_started(api, key)
    [run] = [r for r in api.partition_runs(key) if r["status"] == "STARTED"]
    wait_until(lambda: _step_started(api, run["runId"]), 300, f"run {run['runId']}'s step to start")
    return run


def _finish(result: FaultResult) -> None:
    RESULTS.append(result)
    print(json.dumps(result.doc()))
    assert (result.lost, result.duplicated) == (0, 0), result.details


def test_a_run_container_killed_mid_ingest_is_retried_and_completes(stack, dagster_api):
    name = _name("run")  # big enough to be mid-run when the container goes
    dropped = {name: drop_into_inbox(stack, name, seed=23, shape=(24, 1024, 1024))}
    run = _running_run(dagster_api, name)
    cid = run["tags"]["docker/container_id"]
    killed_at = time.monotonic()
    stack.stack.engine_cmd("kill", "--signal", "KILL", cid, check=True)
    wait_until(lambda: len(dagster_api.partition_runs(name)) >= 2, 600, f"a retry of {name}'s killed run")
    back = time.monotonic()
    done = wait_partitions_done(dagster_api, [name], timeout=900)
    lost, twice, details = datasets_outcome(stack, dagster_api, dropped)
    details["run_statuses"] = [r["status"] for r in dagster_api.partition_runs(name)]
    assert details["run_statuses"].count("FAILURE") == 1, details
    _finish(
        FaultResult("run-container", "ingest", 1, lost, twice, done - killed_at, back - killed_at, details)
    )


def test_the_daemon_container_killed_comes_back_and_misses_nothing(stack, dagster_api):
    first, second = _name("daemon1"), _name("daemon2")
    dropped = {first: drop_into_inbox(stack, first, seed=21, shape=(16, 256, 256))}
    wait_partition_started(dagster_api, first)
    killed_at = time.monotonic()
    pid = stack.kill("daemon")
    dropped[second] = drop_into_inbox(stack, second, seed=22)  # arrives while no daemon watches the inbox
    stack.wait_back("daemon", after_pid=pid)
    back = time.monotonic()
    done = wait_partitions_done(dagster_api, list(dropped), timeout=900)
    lost, twice, details = datasets_outcome(stack, dagster_api, dropped)
    _finish(FaultResult("daemon", "ingest", 2, lost, twice, done - killed_at, back - killed_at, details))


def _worker_ips(stack) -> dict[str, int]:
    """Each Dask worker container's address on the stack's network -> its replica index."""
    ips = {}
    for i, name in enumerate(stack.stack.container_names("dask-worker")):
        info = json.loads(stack.stack.engine_cmd("inspect", name, check=True).stdout)[0]
        for net in (info["NetworkSettings"].get("Networks") or {}).values():
            ips[net["IPAddress"]] = i
    return ips


def test_a_dask_worker_container_killed_with_tasks_in_flight_comes_back_and_the_ingest_completes(
    stack, dagster_api
):
    from distributed import Client
    from distributed.versions import VersionMismatchWarning

    name = _name("worker")
    killed: dict = {}
    with warnings.catch_warnings():  # the host's Python and packages are not the image's (3.12 / 3.11)
        warnings.simplefilter("ignore", VersionMismatchWarning)
        client = Client(stack.scheduler, timeout="30s", security=stack.dask_security())
    with client:
        dropped = {name: drop_into_inbox(stack, name, seed=26, shape=(24, 1024, 1024))}

        def in_flight():
            return next(((w, k) for w, k in client.processing().items() if k), None)

        worker, keys = wait_until(in_flight, 900, "the ingest's tasks in flight on a worker", 0.05)
        replica = _worker_ips(stack)[worker.split("://", 1)[-1].rsplit(":", 1)[0]]
        killed.update(at=time.monotonic(), in_flight=len(keys), pid=stack.kill("dask-worker", replica))
        stack.wait_back("dask-worker", replica, after_pid=killed["pid"])
        back = time.monotonic()
    done = wait_partitions_done(dagster_api, [name], timeout=900)
    lost, twice, details = datasets_outcome(stack, dagster_api, dropped)
    details.update(tasks_in_flight=killed["in_flight"])
    _finish(
        FaultResult(
            "dask-worker", "ingest", 1, lost, twice, done - killed["at"], back - killed["at"], details
        )
    )


def test_postgresql_restarted_under_a_running_ingest(stack, dagster_api):
    name = _name("postgres")  # big enough to be mid-run when PostgreSQL goes
    dropped = {name: drop_into_inbox(stack, name, seed=27, shape=(24, 1024, 1024))}
    _running_run(dagster_api, name)
    killed_at = time.monotonic()
    stack.stack.engine_cmd("restart", "-t", "30", stack.container("postgresql"), check=True)
    stack.wait_back("postgresql")
    back = time.monotonic()
    done = wait_partitions_done(dagster_api, [name], timeout=900)
    lost, twice, details = datasets_outcome(stack, dagster_api, dropped)
    details["run_statuses"] = [r["status"] for r in dagster_api.partition_runs(name)]
    _finish(FaultResult("postgresql", "ingest", 1, lost, twice, done - killed_at, back - killed_at, details))


def test_the_s3_server_killed_under_an_ingest_keeps_its_objects_and_the_ingest_completes(stack, dagster_api):
    before = _name("s3before")
    dropped = {before: drop_into_inbox(stack, before, seed=24)}
    wait_partitions_done(dagster_api, [before], timeout=900)
    name = _name("s3")
    dropped[name] = drop_into_inbox(stack, name, seed=25, shape=(32, 512, 512))
    _running_run(dagster_api, name)
    killed_at = time.monotonic()
    pid = stack.kill("minio")
    stack.wait_back("minio", after_pid=pid)
    back = time.monotonic()
    done = wait_partitions_done(dagster_api, [name], timeout=900)
    lost, twice, details = datasets_outcome(stack, dagster_api, dropped)  # `before`'s objects checked too
    _finish(FaultResult("s3-server", "ingest", 2, lost, twice, done - killed_at, back - killed_at, details))
