"""One process topology (the production services on loopback) for every test in tests/deploy/: starting it
is the expensive part, so it is started once, and each test works with inputs of its own (file names,
montage ids). PostgreSQL and RabbitMQ STOMP are the machine's; without them the tests skip and say why."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from em_platform.deploy.processes import Machine, ProcessTopology, TopologyError, s3rver
from em_platform.samples import em_texture, write_ome_tiff
from em_platform.tem.broker import BrokerPublisher
from tests.deploy.dagster_api import DagsterApi, wait_until

# Test tuning, all of it configuration (environment and instance config), none of it code: sensors tick
# every second (the daemon's loop still sets a 5 s floor), the run queue is read every second, run monitoring
# polls every 2 s, and an inbox entry counts as arrived half a second after its last change.
TEST_SETTINGS = {
    "EM_SENSOR_INTERVAL_SECONDS": "1",
    "EM_INBOX_SETTLE_SECONDS": "0.5",
    "DASK_WORKER_MEMORY": "2GiB",
}
TEST_INSTANCE = {
    "run_coordinator": {"config": {"dequeue_interval_seconds": 1}},
    # a dead run is noticed within 2 s, not 15 (docker/dagster.yaml's production poll)
    "run_monitoring": {"poll_interval_seconds": 2, "free_slots_after_run_end_seconds": 2},
}


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="package")
def topology(tmp_path_factory):
    machine = Machine()
    for what, host, port, hint in (
        ("PostgreSQL", machine.pg_host, machine.pg_port, "start the PostgreSQL server"),
        ("the STOMP broker", machine.stomp_host, machine.stomp_port, "start RabbitMQ and `make services`"),
    ):
        if not _reachable(host, port):
            reason = (
                f"{what} is not reachable at {host}:{port} ({hint}); the deployment topology tests skipped"
            )
            print(reason)
            pytest.skip(reason)
    try:
        s3rver()
    except TopologyError as exc:
        print(exc)
        pytest.skip(f"{exc}; the deployment topology tests skipped")
    topo = ProcessTopology(
        tmp_path_factory.mktemp("topology"),
        name=f"em_dep_{uuid.uuid4().hex[:8]}",
        workers=2,
        worker_threads=1,
        settings=TEST_SETTINGS,
        dagster_overrides=TEST_INSTANCE,
        machine=machine,
        drop_on_stop=True,
    )
    began, cpu0 = time.monotonic(), _children_cpu()
    try:
        topo.start()
        print(f"\ntopology up in {time.monotonic() - began:.1f} s")
        from distributed import Client

        with Client(topo.scheduler, timeout="30s", security=topo.dask_security()) as client:
            client.get_task_stream()  # the scheduler records every task from now on (see dask_client)
        yield topo
    finally:
        topo.stop()
        print(
            f"\ntopology: {time.monotonic() - began:.1f} s wall, {_children_cpu() - cpu0:.1f} CPU s in its "
            f"processes (a quiet 2-core machine needs about half that, or more where they ran one at a time)"
        )


@pytest.fixture(scope="package")
def dagster_api(topology) -> DagsterApi:
    return DagsterApi(topology.webserver)


# -- data the tests share: made on first use, reused by later tests (each still makes it if run alone) -----


@dataclass
class Ingested:
    name: str
    volume: np.ndarray
    began: float
    runs: list[dict]


@dataclass
class Acquired:
    montage_id: str
    tiles: int
    qc_status: list[tuple[str, str | None]]  # qc.status verdicts heard on the broker, in order
    qc_tiles: list[dict]  # qc.tile messages heard on the broker
    runs: list[dict]
    scope_output: str


def drop_into_inbox(topology, name: str, seed: int, shape=(8, 256, 256)) -> np.ndarray:
    """Write an OME-TIFF beside the inbox and move it in (an entry appears whole, as a finished copy does)."""
    inbox = Path(topology.platform_env["EM_INBOX"])
    vol = em_texture(shape, seed=seed, dtype=np.uint16)
    staging = inbox.parent / f".{name}"
    write_ome_tiff(staging, vol, {"z": 40.0, "y": 4.0, "x": 4.0})
    os.replace(staging, inbox / name)
    return vol


def scope_sim(topology, montage_id: str, *args: str, timeout: float = 180) -> subprocess.Popen:
    """`em-platform scope-sim` as the microscope: it publishes to the topology's broker (EM_BROKER)."""
    argv = [str(Path(sys.executable).parent / "em-platform"), "scope-sim", "--montage-id", montage_id]
    argv += ["--out", str(Path(topology.platform_env["EM_INBOX"]).parent / "scope"), *args]
    env = {**os.environ, **topology.platform_env}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def acquire(topology, dagster_api, *args: str, rows: int = 3, columns: int = 3, during=None) -> Acquired:
    """Acquire one montage through the broker and wait for its montage_job run to end; ``during(montage_id)``
    runs while the scope is still acquiring."""
    montage_id = f"m{uuid.uuid4().hex[:10]}"
    heard_status: list[tuple[str, str | None]] = []
    heard_tiles: list[dict] = []
    m = topology.machine
    with BrokerPublisher(
        m.stomp_host,
        m.stomp_port,
        topic_prefix=topology.settings["EM_BROKER_TOPIC_PREFIX"],
        username=m.stomp_user,
        password=m.stomp_password,
        tls=m.stomp_tls,
    ) as ear:
        ear.subscribe("qc.status", lambda msg: heard_status.append((msg.status, msg.reason)))
        ear.subscribe("qc.tile", lambda msg: heard_tiles.append(msg.model_dump(mode="json")))
        grid = ["--rows", str(rows), "--columns", str(columns), "--overlap", "0.15", "--jitter", "8"]
        scope = scope_sim(topology, montage_id, *grid, *args)
        try:
            if during is not None:
                during(montage_id)
            out, _ = scope.communicate(timeout=180)
        finally:
            if scope.poll() is None:
                scope.kill()
        assert scope.returncode == 0, out
        runs = dagster_api.wait_runs_done({"dagster/partition": montage_id}, 1, timeout=600)
        wait_until(lambda: heard_status, 30, "a qc.status verdict on the broker")
    return Acquired(montage_id, rows * columns, heard_status, heard_tiles, runs, out)


@pytest.fixture(scope="package")
def ingested_entry(topology, dagster_api) -> Ingested:
    name = f"drop_{uuid.uuid4().hex[:6]}.ome.tif"
    began = time.time()
    vol = drop_into_inbox(topology, name, seed=11)
    runs = dagster_api.wait_runs_done({"dagster/partition": name}, 1, timeout=600)
    return Ingested(name, vol, began, runs)


@pytest.fixture(scope="package")
def clean_montage(topology, dagster_api) -> Acquired:
    return acquire(topology, dagster_api)


@pytest.fixture(scope="package")
def faulty_montage(topology, dagster_api) -> Acquired:
    """Four tiles out of focus: the focus check fails (blocking) and QC asks the scope to stop at the end."""
    return acquire(topology, dagster_api, "--fault", "defocus:4-7", rows=3, columns=4)
