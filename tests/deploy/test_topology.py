"""End to end on the production topology run as processes: the daemon's sensors, runs on the code server,
pixels on the two Dask workers, OME-Zarr in S3 (moto), records in PostgreSQL, the microscope on the broker;
then faults: a Dask worker killed mid-run, the daemon restarted mid-run, the code server restarted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
import zarr

from em_platform.catalog.db import CatalogDB
from em_platform.deploy.compose import COMPOSE_FILE
from em_platform.deploy.services import SERVICES, service
from em_platform.deploy.templates import interpolate
from em_platform.tem.journal import Journal
from tests.deploy.conftest import acquire, drop_into_inbox
from tests.deploy.dagster_api import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def dask_client(topology):
    from distributed import Client

    with Client(topology.scheduler, timeout="30s") as client:  # its task stream: recorded since start-up
        yield client


def worker_groups(client) -> dict[str, int]:
    """Dask worker address -> process group (= the PID of the `dask worker` process the runner started)."""
    return {addr: os.getpgid(pid) for addr, pid in client.run(os.getpid).items()}


def storage_options(topology) -> dict:
    env = topology.platform_env
    return {
        "key": env["AWS_ACCESS_KEY_ID"],
        "secret": env["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": env["EM_S3_ENDPOINT_URL"]},
    }


def record(topology, source: str, key: str) -> dict | None:
    db = CatalogDB(topology.catalog_url)
    try:
        return db.find(source, key)
    finally:
        db.dispose()


def assert_success(dagster_api, runs: list[dict]) -> None:
    for run in runs:
        if run["status"] != "SUCCESS":
            pytest.fail(
                f"run {run['runId']} ended {run['status']}:\n{dagster_api.failure_messages(run['runId'])}"
            )


# -- the processes are the compose services ---------------------------------------------------------------


def _compose_to_process(topology) -> callable:
    """Map a value of docker/compose.yaml to what it must be in this topology: compose's own interpolation
    of the operator settings, then service addresses and ports, the bind address and the /data volume."""
    names = {s.name for s in SERVICES}
    ports = {str(s.port): str(topology.addresses.ports[s.name]) for s in SERVICES if s.port is not None}

    def convert(value: str) -> str:
        value = interpolate(str(value), topology.settings)
        for svc in SERVICES:
            if svc.port is not None:
                value = value.replace(f"{svc.name}:{svc.port}", topology.addresses.addr(svc.name))
        if value in names:
            return topology.addresses.hosts[value]
        if value in ports:
            return ports[value]
        if value == "0.0.0.0":
            return "127.0.0.1"
        return re.sub(r"^/data(?=/|$)", topology.addresses.data, value)

    return convert


def test_every_process_runs_its_compose_service_command_and_environment(topology):
    """Read docker/compose.yaml (not the table) and compare each running process's argv and environment."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    convert = _compose_to_process(topology)
    pids = topology.pids()
    for svc in SERVICES:
        spec = compose[svc.name]
        if svc.runs_as != "process":
            continue
        replicas = int(convert(spec.get("deploy", {}).get("replicas", 1)))
        assert len(pids[svc.name]) == replicas, svc.name
        for pid in pids[svc.name]:
            proc = psutil.Process(pid)
            argv = proc.cmdline()
            if Path(argv[0]).name.startswith("python"):
                argv = argv[1:]  # a console script runs under the venv's interpreter
            expected = [convert(a) for a in spec["command"]]
            assert Path(argv[0]).name == expected[0], (svc.name, argv)
            assert argv[1:] == expected[1:], svc.name
            environ = proc.environ()
            compose_only = set(svc.compose_only_env)
            for key, value in spec.get("environment", {}).items():
                if key not in compose_only:
                    assert environ.get(key) == convert(value), (svc.name, key)
            assert "DAGSTER_CURRENT_IMAGE" not in environ  # the Docker launcher's, not the default one's
    # the stand-ins for the infrastructure containers
    assert psutil.Process(pids["minio"][0]).cmdline()[1:3] == ["-m", "moto.server"]
    assert record(topology, "local", "no-such-entry") is None  # the catalog database exists and answers


# -- the happy paths ----------------------------------------------------------------------------------


def test_inbox_drop_is_ingested_on_the_dask_workers_into_s3_and_postgres(
    topology, dagster_api, dask_client, ingested_entry
):
    name, runs = ingested_entry.name, ingested_entry.runs
    assert_success(dagster_api, runs)
    assert len(runs) == 1 and runs[0]["jobName"] == "ingest_local_job"
    assert runs[0]["tags"].get("dagster/sensor_name") == "inbox_sensor"  # the daemon's sensor requested it

    # the pixel work ran as tasks on the topology's two `dask worker` processes, not in the run
    stream = dask_client.get_task_stream(start=ingested_entry.began)
    groups = worker_groups(dask_client)
    assert stream, "no Dask task ran on the cluster during the ingest"
    assert {t["worker"] for t in stream} <= set(groups)
    assert set(groups.values()) == set(topology.pids()["dask-worker"])

    rec = record(topology, "local", name)
    assert rec is not None and rec["status"] == "complete"
    url = rec["files"]["volume"]
    assert (
        url
        == f"s3://{topology.settings['EM_S3_BUCKET']}/em/ingest/local/{name.removesuffix('.ome.tif')}.ome.zarr"
    )
    level0 = zarr.open_group(url, mode="r", storage_options=storage_options(topology))["0"]
    np.testing.assert_array_equal(level0[...], ingested_entry.volume)


def test_scope_on_the_broker_is_journaled_processed_and_answered(
    topology, dagster_api, dask_client, clean_montage
):
    """scope-sim --broker -> listener -> journal -> montage_sensor -> montage_job on Dask -> QC on the broker."""
    m = clean_montage
    assert_success(dagster_api, m.runs)
    assert len(m.runs) == 1 and m.runs[0]["tags"].get("dagster/sensor_name") == "montage_sensor"
    journal = Journal(topology.catalog_url)
    try:
        row = journal.montage(m.montage_id)
        assert row is not None and row.state == "completed"  # the listener journaled montage.complete
        assert len([t for t in journal.tiles(m.montage_id) if not t.is_reference]) == m.tiles
    finally:
        journal.dispose()
    assert m.qc_status[-1][0] == "GOOD"
    assert (
        len({t["tile_id"] for t in m.qc_tiles if t.get("montage_id", m.montage_id) == m.montage_id})
        >= m.tiles
    )
    rec = record(topology, "acquisition", m.montage_id)
    assert rec is not None and rec["status"] == "complete"
    fs_root = f"{topology.settings['EM_S3_BUCKET']}/em/acquisition/{m.montage_id}"
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options(topology))
    assert fs.exists(f"{fs_root}/montage.ome.zarr/zarr.json") and fs.exists(f"{fs_root}/upload-manifest.json")


def test_failed_qc_goes_back_to_the_scope_and_blocks_the_montage(topology, dagster_api, faulty_montage):
    m = faulty_montage
    assert [r["status"] for r in m.runs] == ["FAILURE"]  # the blocking focus check stops the run
    assert m.qc_status[-1][0] == "STOP_AT_END"
    assert record(topology, "acquisition", m.montage_id) is None  # nothing published for a failed montage


def test_cli_backfill_queues_and_completes_the_runs(topology, dagster_api, clean_montage, faulty_montage):
    """Re-processing old montages: `dagster job backfill` queues one run per partition; the daemon runs them."""
    partitions = [clean_montage.montage_id, faulty_montage.montage_id]
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "job", "backfill", "-w", "workspace.yaml"]
        + ["-j", "montage_job", "--partitions", ",".join(partitions), "--noprompt"],
        cwd=topology.dagster_home,
        env={**os.environ, **topology.env_of(service("daemon"))},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    backfill = re.search(r"Launched backfill job `(\w+)`", proc.stdout + proc.stderr)
    assert backfill, proc.stdout + proc.stderr
    runs = dagster_api.wait_runs_done({"dagster/backfill": backfill.group(1)}, 2, timeout=900)
    by_partition = {r["tags"]["dagster/partition"]: r["status"] for r in runs}
    assert len(runs) == 2, runs
    # the same verdicts as when they were acquired: the clean one re-published, the faulty one blocked again
    assert by_partition == {clean_montage.montage_id: "SUCCESS", faulty_montage.montage_id: "FAILURE"}


# -- faults ---------------------------------------------------------------------------------------------


TILE_TASKS = ("process_tile_file-", "judge_tile-")  # the run's per-tile Dask tasks (pure=False: unique keys)


def test_a_dask_worker_killed_mid_run_does_not_fail_the_run(topology, dagster_api, dask_client):
    """SIGKILL the worker that has tile tasks in flight (assigned to it, not finished): the scheduler hands
    them to the surviving worker, the run completes, and the task stream shows that work done there."""
    killed = {}
    groups = worker_groups(dask_client)  # worker address -> PID, taken before the run: the kill is immediate

    def tile_work_in_flight():
        for worker, keys in dask_client.processing().items():
            tiles = {str(k) for k in keys if str(k).startswith(TILE_TASKS)}
            if tiles:
                return worker, tiles
        return None

    def kill_a_busy_worker(montage_id: str) -> None:
        worker, in_flight = wait_until(tile_work_in_flight, 600, "a tile task in flight on a worker", 0.05)
        replica = topology.pids()["dask-worker"].index(groups[worker])
        killed.update(worker=worker, in_flight=in_flight, replica=replica)
        killed["pid"] = topology.kill("dask-worker", replica)  # SIGKILL: the worker and its nanny are gone

    began = time.time()
    m = acquire(topology, dagster_api, "--rate", "3", rows=3, columns=4, during=kill_a_busy_worker)
    try:
        assert killed, "no worker was killed"
        assert_success(dagster_api, m.runs)
        assert m.qc_status[-1][0] == "GOOD"
        assert len(dask_client.scheduler_info()["workers"]) == 1  # it really was gone for the rest of the run
        rec = record(topology, "acquisition", m.montage_id)
        assert rec is not None and rec["status"] == "complete"
        # who finished each task (the scheduler's task stream); a key names one submission, so a key the
        # victim held that finished on another worker was moved there (or recomputed, if it finished twice)
        ran_on: dict[str, set[str]] = {}
        for t in dask_client.get_task_stream(start=began):
            ran_on.setdefault(str(t["key"]), set()).add(t["worker"])
        victim = killed["worker"]
        moved = {k for k in killed["in_flight"] if ran_on.get(k, set()) - {victim}}
        recomputed = {k for k, ws in ran_on.items() if victim in ws and ws - {victim}}
        assert moved | recomputed, (
            f"none of the killed worker's tasks ({sorted(killed['in_flight'])}) finished elsewhere: {ran_on}"
        )
        print(
            f"killed {victim} with {len(killed['in_flight'])} tile task(s) in flight; moved to the "
            f"survivor: {len(moved)}, recomputed there: {len(recomputed)}"
        )
    finally:
        if killed:
            topology.start_again("dask-worker", killed["replica"])  # as compose's restart policy would


def test_daemon_restarted_mid_run_loses_nothing_and_runs_nothing_twice(topology, dagster_api):
    first, second = (f"restart_{i}_{uuid.uuid4().hex[:6]}.ome.tif" for i in (1, 2))
    drop_into_inbox(topology, first, seed=21, shape=(16, 256, 256))
    wait_until(
        lambda: any(r["status"] == "STARTED" for r in dagster_api.partition_runs(first)),
        600,
        f"{first}'s run to start",
    )
    topology.kill("daemon")  # a crash, mid-run
    drop_into_inbox(topology, second, seed=22)  # arrives while no daemon watches the inbox
    topology.start_again("daemon")
    for name in (first, second):
        runs = dagster_api.wait_runs_done({"dagster/partition": name}, 1, timeout=600)
        assert len(runs) == 1, f"{name} ran {len(runs)} times"
        assert_success(dagster_api, runs)
        rec = record(topology, "local", name)
        assert rec is not None and rec["status"] == "complete"


LOCATION = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus updatedTimestamp
  locationOrLoadError { __typename ... on RepositoryLocation { repositories { assetNodes { id } } } } } } } }"""


def test_code_server_restart_the_webserver_reconnects(topology, dagster_api):
    def location():
        [entry] = dagster_api.query(LOCATION)["workspaceOrError"]["locationEntries"]
        return entry

    before = location()
    assert before["loadStatus"] == "LOADED"
    topology.restart("user-code")  # SIGTERM, the same command again on the same port
    after = wait_until(
        lambda: (
            (e := location())["updatedTimestamp"] > before["updatedTimestamp"]
            and e["loadStatus"] == "LOADED"
            and e["locationOrLoadError"]["__typename"] == "RepositoryLocation"
            and e
        ),
        120,
        "the webserver to reload the restarted code location",
    )
    nodes = after["locationOrLoadError"]["repositories"][0]["assetNodes"]
    assert len(nodes) == len(before["locationOrLoadError"]["repositories"][0]["assetNodes"]) > 0
