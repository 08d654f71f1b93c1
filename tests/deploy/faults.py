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
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import zarr

from em_platform.catalog.db import CatalogDB
from em_platform.storage.consistency import check_consistency
from em_platform.storage.store import DataStore
from em_platform.tem.broker import BrokerPublisher
from tests.deploy.conftest import acquire, drop_into_inbox
from tests.deploy.dagster_api import DagsterApi, wait_until

FAULTS = ("daemon", "dask-worker", "run", "run-montage", "listener", "object-store")
OBJECT_STORE = "minio"  # the topology's S3 service (compose's name)


@dataclass
class FaultResult:
    fault: str
    during: str  # the work under way when the service was killed
    items: int  # datasets or tiles that work had to deliver
    lost: int  # items not complete at the end (or whose objects are missing or corrupt)
    duplicated: int  # items done twice (two successful runs, two qc.tile for one tile)
    recovery_s: float  # from the kill until every item is complete
    service_back_s: float  # from the kill until the service answered again
    details: dict = field(default_factory=dict)

    def doc(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


def run(fault: str, topology, api: DagsterApi) -> FaultResult:
    return SCENARIOS[fault](topology, api)


# -- counting ---------------------------------------------------------------------------------------------


def _records(topology, source: str, keys: list[str]) -> dict[str, dict | None]:
    db = CatalogDB(topology.catalog_url)
    try:
        return {k: db.find(source, k) for k in keys}
    finally:
        db.dispose()


def _options(topology) -> dict:
    env = topology.platform_env
    return {
        "key": env["AWS_ACCESS_KEY_ID"],
        "secret": env["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": env["EM_S3_ENDPOINT_URL"]},
    }


def _store(topology) -> DataStore:
    return DataStore(topology.platform_env["EM_DATA_ROOT"], _options(topology))


def _pixels_differ(topology, record: dict, volume: np.ndarray) -> bool:
    """The stored OME-Zarr's full-resolution level is not the volume dropped into the inbox."""
    try:
        level0 = zarr.open_group(record["files"]["volume"], mode="r", storage_options=_options(topology))["0"]
        return not np.array_equal(level0[...], volume)
    except Exception:  # unreadable: as lost as different
        return True


def _datasets_outcome(topology, api: DagsterApi, dropped: dict[str, np.ndarray]) -> tuple[int, int, dict]:
    """(lost, duplicated, details) of inbox entries: each must have one complete catalog record whose
    objects are all present (with their recorded checksums, where recorded) and whose stored pixels are
    the dropped volume's, and exactly one successful run."""
    keys = list(dropped)
    records = _records(topology, "local", keys)
    report = check_consistency([r for r in records.values() if r], _store(topology))
    broken = {a.name.split("/", 1)[-1] for a in report.problems}
    broken |= {k for k, r in records.items() if r and _pixels_differ(topology, r, dropped[k])}
    successes = {k: sum(r["status"] == "SUCCESS" for r in api.partition_runs(k)) for k in keys}
    lost = [k for k in keys if not records[k] or records[k]["status"] != "complete" or k in broken]
    twice = [k for k in keys if successes[k] > 1]
    runs = {k: len(api.partition_runs(k)) for k in keys}
    return len(lost), len(twice), {"lost": lost, "duplicated": twice, "runs": runs, "store": report.summary()}


def _tiles_outcome(topology, acquired) -> tuple[int, int, dict]:
    """(lost, duplicated, details) of a montage's tiles: one ``qc.tile`` each, and the montage complete."""
    heard = Counter(t["tile_id"] for t in acquired.qc_tiles)
    rows = _records(topology, "acquisition", [acquired.montage_id])[acquired.montage_id]
    lost = acquired.tiles - len(heard)
    if not rows or rows["status"] != "complete":
        lost = acquired.tiles  # the montage itself did not end complete
    twice = sum(1 for n in heard.values() if n > 1)
    details = {
        "montage": acquired.montage_id,
        "qc_status": acquired.qc_status,
        "runs": [r["status"] for r in acquired.runs],
        "record": rows and rows["status"],
    }
    return lost, twice, details


def _wait_done(api: DagsterApi, keys: list[str], timeout: float = 600) -> float:
    """Until each key has a successful run and no run still going; returns the time it was so."""

    def done():
        for k in keys:
            runs = api.partition_runs(k)
            if not any(r["status"] == "SUCCESS" for r in runs):
                return False
            if any(r["status"] not in ("SUCCESS", "FAILURE", "CANCELED") for r in runs):
                return False
        return True

    wait_until(done, timeout, f"{keys} to complete")
    return time.monotonic()


def _bring_back(topology, service: str, replica: int = 0) -> float:
    """When the service answers again after a kill: the topology's supervisor restarts it, nobody else."""
    topology.wait_back(service, replica)
    return time.monotonic()


def _started(api: DagsterApi, key: str) -> None:
    wait_until(
        lambda: any(r["status"] == "STARTED" for r in api.partition_runs(key)), 600, f"{key}'s run to start"
    )


# -- scenarios --------------------------------------------------------------------------------------------


def daemon_during_ingest(topology, api: DagsterApi) -> FaultResult:
    """The daemon dies mid-run; a second entry arrives while no daemon watches the inbox."""
    first, second = (f"fault_daemon_{i}_{uuid.uuid4().hex[:6]}.ome.tif" for i in (1, 2))
    dropped = {first: drop_into_inbox(topology, first, seed=21, shape=(16, 256, 256))}
    _started(api, first)
    killed_at = time.monotonic()
    pid = topology.kill("daemon")
    dropped[second] = drop_into_inbox(topology, second, seed=22)
    back = _bring_back(topology, "daemon")
    done = _wait_done(api, list(dropped))
    lost, twice, details = _datasets_outcome(topology, api, dropped)
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
    done = _wait_done(api, [name])
    lost, twice, details = _datasets_outcome(topology, api, dropped)
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
    _started(api, name)
    [started] = [r for r in api.partition_runs(name) if r["status"] == "STARTED"]
    pid = wait_until(lambda: _step_pid(api, started["runId"]), 120, f"run {started['runId']}'s step process")
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(api.partition_runs(name)) >= 2, 600, f"a retry of {name}'s killed run")
    back = time.monotonic()  # the retry exists: the platform noticed and acted
    done = _wait_done(api, [name])
    lost, twice, details = _datasets_outcome(topology, api, dropped)
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
        done = _wait_done(api, [m.montage_id])
        wait_until(lambda: len(set(verdicts)) >= m.tiles, 60, "a verdict for every tile on the broker")
    m.qc_tiles[:] = [{"tile_id": t} for t in verdicts]
    lost, twice, details = _tiles_outcome(topology, m)
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
    lost, twice, details = _tiles_outcome(topology, m)
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
    _wait_done(api, [before])
    name = f"fault_store_1_{uuid.uuid4().hex[:6]}.ome.tif"
    dropped[name] = drop_into_inbox(topology, name, seed=25, shape=(32, 512, 512))
    _started(api, name)
    killed_at = time.monotonic()
    pid = topology.kill(OBJECT_STORE)
    back = _bring_back(topology, OBJECT_STORE)
    done = _wait_done(api, [name])
    lost, twice, details = _datasets_outcome(topology, api, dropped)
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
