"""Faults an operator meets, injected into the running process topology (issue 22, point 6), shared by
tests/deploy/test_faults.py and bench/bench_faults.py.

Each scenario starts work of its own (an inbox entry or a montage acquired through the broker), kills one
service with SIGKILL while that work is under way, lets the platform bring it back, and then counts, from
the catalog, Dagster's runs, the broker's ``qc.tile`` messages and the stored objects' checksums, how many
items ended incomplete (lost) or were done twice (duplicated). Recovery time is from the kill until every
item of the scenario is complete.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Callable

from em_platform.tem.broker import BrokerPublisher
from tests.deploy.conftest import acquire, drop_into_inbox
from tests.deploy.dagster_api import DagsterApi, wait_until
from tests.support.outcomes import (
    FaultResult,
    datasets_outcome,
    tiles_outcome,
    wait_partition_started,
    wait_partitions_done,
)

FAULTS = ("daemon", "dask-worker", "run", "run-montage", "listener", "object-store")
OBJECT_STORE = "minio"  # the topology's S3 service (compose's name)


def run(fault: str, topology, api: DagsterApi) -> FaultResult:
    return SCENARIOS[fault](topology, api)


def _bring_back(topology, service: str, replica: int = 0) -> float:
    """When the service answers again after a kill: the topology's supervisor restarts it, nobody else."""
    topology.wait_back(service, replica)
    return time.monotonic()


# -- scenarios --------------------------------------------------------------------------------------------


def daemon_during_ingest(topology, api: DagsterApi) -> FaultResult:
    """The daemon dies mid-run; a second entry arrives while no daemon watches the inbox."""
    first, second = (f"fault_daemon_{i}_{uuid.uuid4().hex[:6]}.ome.tif" for i in (1, 2))
    dropped = {first: drop_into_inbox(topology, first, seed=21, shape=(16, 256, 256))}
    wait_partition_started(api, first)
    killed_at = time.monotonic()
    pid = topology.kill("daemon")
    dropped[second] = drop_into_inbox(topology, second, seed=22)
    back = _bring_back(topology, "daemon")
    done = wait_partitions_done(api, list(dropped))
    lost, twice, details = datasets_outcome(topology, api, dropped)
    return FaultResult(
        "daemon", "ingest", 2, lost, twice, done - killed_at, back - killed_at, {"pid": pid, **details}
    )


def _worker_groups(client) -> dict[str, int]:
    return {addr: os.getpgid(pid) for addr, pid in client.run(os.getpid).items()}


def dask_worker_during_ingest(topology, api: DagsterApi) -> FaultResult:
    """The Dask worker holding an ingest's conversion tasks dies; the scheduler hands them to the survivor.
    (Live tiles no longer run on the deployment's workers: the live-QC service judges them on threads of
    its own, so the workers' work is the batch work.)"""
    from distributed import Client

    name = f"fault_worker_{uuid.uuid4().hex[:6]}.ome.tif"
    killed: dict = {}
    with Client(topology.scheduler, timeout="30s", security=topology.dask_security()) as client:
        groups = _worker_groups(client)
        dropped = {name: drop_into_inbox(topology, name, seed=26, shape=(24, 1024, 1024))}

        def in_flight():
            for worker, keys in client.processing().items():
                if keys:
                    return worker, keys
            return None

        worker, keys = wait_until(in_flight, 600, "the ingest's tasks in flight on a worker", 0.02)
        replica = topology.pids()["dask-worker"].index(groups[worker])
        killed.update(at=time.monotonic(), in_flight=len(keys))
        killed["pid"] = topology.kill("dask-worker", replica)
        back = _bring_back(topology, "dask-worker", replica)
    done = wait_partitions_done(api, [name])
    lost, twice, details = datasets_outcome(topology, api, dropped)
    details.update(pid=killed["pid"], tasks_in_flight=killed["in_flight"])
    return FaultResult(
        "dask-worker", "ingest", 1, lost, twice, done - killed["at"], back - killed["at"], details
    )


def _step_pid(api: DagsterApi, run_id: str) -> int | None:
    """The process executing run ``run_id``'s steps, as its engine event says ("... (pid: N)"), once a step
    has started in it."""
    events = api.run_events(run_id)
    if not any("Started execution of step" in (e.get("message") or "") for e in events):
        return None
    for e in events:
        m = re.search(r"Executing steps in process \(pid: (\d+)\)", e.get("message") or "")
        if m:
            return int(m.group(1))
    return None


def run_process_during_ingest(topology, api: DagsterApi) -> FaultResult:
    """The run's own process is killed mid-conversion: run monitoring fails the run and frees its slot,
    the catalog record goes to failed, and the run retry completes the ingest."""
    name = f"fault_run_{uuid.uuid4().hex[:6]}.ome.tif"
    dropped = {name: drop_into_inbox(topology, name, seed=23, shape=(32, 512, 512))}
    wait_partition_started(api, name)
    [started] = [r for r in api.partition_runs(name) if r["status"] == "STARTED"]
    pid = wait_until(lambda: _step_pid(api, started["runId"]), 120, f"run {started['runId']}'s step process")
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(api.partition_runs(name)) >= 2, 600, f"a retry of {name}'s killed run")
    back = time.monotonic()  # the retry exists: the platform noticed and acted
    done = wait_partitions_done(api, [name])
    lost, twice, details = datasets_outcome(topology, api, dropped)
    details.update(pid=pid, run_statuses=[r["status"] for r in api.partition_runs(name)])
    return FaultResult("run", "ingest", 1, lost, twice, done - killed_at, back - killed_at, details)


def run_process_during_montage(topology, api: DagsterApi) -> FaultResult:
    """The montage run's process is killed after it sent its third verdict, while the scope is still
    acquiring: run monitoring fails the run, its retry resumes from the journal (the verdicts already sent
    are kept, not judged or sent again) and judges the rest."""
    m_ = topology.machine
    verdicts: list[str] = []
    killed: dict = {}

    def kill_the_run(montage_id: str) -> None:
        started = wait_until(
            lambda: [r for r in api.partition_runs(montage_id) if r["status"] == "STARTED"],
            120,
            f"montage {montage_id}'s run to start",
        )
        pid = wait_until(lambda: _step_pid(api, started[0]["runId"]), 120, "the montage run's step process")
        wait_until(lambda: len(verdicts) >= 3, 120, "three verdicts on the broker")
        killed.update(at=time.monotonic(), pid=pid, verdicts_before=len(verdicts))
        os.kill(pid, signal.SIGKILL)

    with BrokerPublisher(
        m_.stomp_host,
        m_.stomp_port,
        topic_prefix=topology.settings["EM_BROKER_TOPIC_PREFIX"],
        username=m_.stomp_user,
        password=m_.stomp_password,
        tls=m_.stomp_tls,
    ) as ear:  # every qc.tile of the scenario, the killed run's and its retry's
        ear.subscribe("qc.tile", lambda msg: verdicts.append(msg.tile_id))
        # 0.25 tiles/s: the run must be up and killed mid-montage even when its launch is slow (at 1 and then
        # 0.5 tiles/s a loaded machine started it after all 12 verdicts were out: nothing was left to resume)
        m = acquire(topology, api, "--rate", "0.25", rows=3, columns=4, during=kill_the_run)
        wait_until(
            lambda: len(api.partition_runs(m.montage_id)) >= 2, 600, "a retry of the killed montage run"
        )
        back = time.monotonic()
        done = wait_partitions_done(api, [m.montage_id])
        wait_until(lambda: len(set(verdicts)) >= m.tiles, 60, "a verdict for every tile on the broker")
    m.qc_tiles[:] = [{"tile_id": t} for t in verdicts]
    lost, twice, details = tiles_outcome(topology, m)
    details.update(
        pid=killed["pid"],
        verdicts_before_the_kill=killed["verdicts_before"],
        run_statuses=[r["status"] for r in api.partition_runs(m.montage_id)],
    )
    return FaultResult(
        "run-montage", "montage", m.tiles, lost, twice, done - killed["at"], back - killed["at"], details
    )


def listener_during_montage(topology, api: DagsterApi) -> FaultResult:
    """The listener dies after three tiles and is restarted while the scope goes on acquiring: its durable
    subscription keeps what was published meanwhile, and the run judges every tile once."""
    m_ = topology.machine
    raw: list[str] = []
    killed: dict = {}

    def kill_the_listener(montage_id: str) -> None:
        with BrokerPublisher(
            m_.stomp_host,
            m_.stomp_port,
            topic_prefix=topology.settings["EM_BROKER_TOPIC_PREFIX"],
            username=m_.stomp_user,
            password=m_.stomp_password,
            tls=m_.stomp_tls,
        ) as ear:
            ear.subscribe("tile.raw", lambda msg: raw.append(msg.tile_id))
            wait_until(lambda: len(raw) >= 3, 120, "three tiles on the broker")
            killed["at"] = time.monotonic()
            killed["pid"] = topology.kill("listener")
            published = len(raw)
            killed["back"] = _bring_back(topology, "listener")
            killed["while_down"] = len(raw) - published  # kept for it by its durable subscription

    m = acquire(topology, api, "--rate", "3", rows=3, columns=3, during=kill_the_listener)
    done = time.monotonic()
    lost, twice, details = tiles_outcome(topology, m)
    details.update(pid=killed["pid"], tiles_published_while_down=killed["while_down"])
    return FaultResult(
        "listener",
        "montage",
        m.tiles,
        lost,
        twice,
        done - killed["at"],
        killed["back"] - killed["at"],
        details,
    )


def object_store_during_ingest(topology, api: DagsterApi) -> FaultResult:
    """The object store dies under a running ingest and comes back: what it held before is still there,
    and the ingest (a storage outage: a retried failure) completes."""
    before = f"fault_store_0_{uuid.uuid4().hex[:6]}.ome.tif"
    dropped = {before: drop_into_inbox(topology, before, seed=24)}
    wait_partitions_done(api, [before])
    name = f"fault_store_1_{uuid.uuid4().hex[:6]}.ome.tif"
    dropped[name] = drop_into_inbox(topology, name, seed=25, shape=(32, 512, 512))
    wait_partition_started(api, name)
    killed_at = time.monotonic()
    pid = topology.kill(OBJECT_STORE)
    back = _bring_back(topology, OBJECT_STORE)
    done = wait_partitions_done(api, [name])
    lost, twice, details = datasets_outcome(topology, api, dropped)
    details.update(pid=pid)
    return FaultResult("object-store", "ingest", 2, lost, twice, done - killed_at, back - killed_at, details)


SCENARIOS: dict[str, Callable[..., FaultResult]] = {
    "daemon": daemon_during_ingest,
    "dask-worker": dask_worker_during_ingest,
    "run": run_process_during_ingest,
    "run-montage": run_process_during_montage,
    "listener": listener_during_montage,
    "object-store": object_store_during_ingest,
}
