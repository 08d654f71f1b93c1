"""End to end on the production topology run as processes: the daemon's sensors, runs on the code server,
pixels on the two Dask workers, OME-Zarr in S3 (s3rver), records in PostgreSQL, the microscope on the broker;
then faults: a Dask worker killed mid-run, the daemon restarted mid-run, the code server restarted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import fsspec
import numpy as np
import psutil
import pytest
import requests
import yaml
import zarr

from em_platform.catalog.db import CatalogDB
from em_platform.deploy.compose import COMPOSE_FILE
from em_platform.deploy.processes import DEBIAN_NAMES, process_only_args
from em_platform.deploy.services import SERVICES, service
from em_platform.tem.journal import Journal
from tests.deploy.compose_values import compose_to_process
from tests.deploy.dagster_api import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def dask_client(topology):
    from distributed import Client

    with Client(
        topology.scheduler, timeout="30s", security=topology.dask_security()
    ) as client:  # its task stream
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


def test_every_process_runs_its_compose_service_command_and_environment(topology):
    """Read docker/compose.yaml (not the table) and compare each running process's argv and environment."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    convert = compose_to_process(topology.addresses, topology.settings)
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
            expected = [convert(a, command=True) for a in spec["command"]]
            if Path(argv[0]).name.startswith("python") and expected[0] != "python":
                argv = argv[1:]  # a console script runs under the venv's interpreter
            argv = [
                "python" if i == 0 and Path(a).name.startswith("python") else a for i, a in enumerate(argv)
            ]
            assert Path(argv[0]).name == DEBIAN_NAMES.get(expected[0], expected[0]), (svc.name, argv)
            assert argv[1:] == expected[1:] + list(process_only_args(svc.name, "127.0.0.1")), svc.name
            environ = proc.environ()
            compose_only = set(svc.compose_only_env)
            for key, value in spec.get("environment", {}).items():
                if key not in compose_only:
                    expected_value = convert(value)
                    if svc.name == "user-code" and key in ("EM_CATALOG_URL", "PGPASSWORD"):
                        # as processes the code server starts the runs: it holds their role, as the daemon does
                        expected_value = topology.platform_env[key]
                    assert environ.get(key) == expected_value, (svc.name, key)
            assert "DAGSTER_CURRENT_IMAGE" not in environ  # the Docker launcher's, not the default one's
    # the stand-ins for the infrastructure containers
    store = psutil.Process(pids["minio"][0]).cmdline()  # s3rver (node), file-backed in the state folder
    assert any(a.endswith("s3rver") for a in store[:2]), store
    assert store[store.index("-d") + 1] == str(topology.object_store_dir)
    assert record(topology, "local", "no-such-entry") is None  # the catalog database exists and answers


def test_prometheus_scrapes_every_service_and_serves_the_facility_page(topology):
    """Issue 52: every service with metrics, Prometheus and Alertmanager scraped and up; the rules loaded;
    the operators' page served."""
    prometheus = f"{topology.url('prometheus')}/prometheus"  # where the proxy serves it in compose
    jobs = {s.name for s in SERVICES if s.metrics}
    assert {"listener", "live-qc", "metrics", "prometheus", "alertmanager", "dask-scheduler"} <= jobs

    def targets():
        active = requests.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return {t["labels"]["job"]: t["health"] for t in active}

    wait_until(lambda: targets() == dict.fromkeys(jobs, "up"), 120, f"every target of {sorted(jobs)} up")
    groups = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = {r["name"] for g in groups for r in g["rules"]}
    assert {"ServiceDown", "ScopeSilent", "LiveQCLate", "em_dask_workers"} <= rules
    # Dask's scheduler serves its own metrics: its workers, counted by the recording rule NoDaskWorker reads
    workers = len(topology.pids()["dask-worker"])

    def recorded() -> float | None:
        query = requests.get(f"{prometheus}/api/v1/query", params={"query": "em_dask_workers"}, timeout=10)
        result = query.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    wait_until(lambda: recorded() == workers, 60, f"em_dask_workers {workers}")
    page = requests.get(f"{prometheus}/consoles/facility.html", timeout=10)
    assert page.status_code == 200 and "The facility now" in page.text and "live-qc" in page.text
    assert requests.get(f"{topology.url('alertmanager')}/-/ready", timeout=10).status_code == 200


def test_no_service_listens_beyond_loopback(topology):
    """Issue 22: Dask runs the code that reaches its ports; no process of the topology (nor a child: a
    worker's nanny, a run) listens on any address but loopback."""
    listening = {}
    for service_pids in topology.pids().values():
        for pid in service_pids:
            proc = psutil.Process(pid)
            for p in (proc, *proc.children(recursive=True)):
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        listening[(c.laddr.ip, c.laddr.port)] = " ".join(p.cmdline()[:3])
    assert len(listening) >= 6, listening  # web, code server, scheduler (+HTTP), workers, object store
    loopback = ("127.", "::1", "::ffff:127.")  # IPv4, IPv6 and IPv4-mapped IPv6 loopback
    outside = {a: cmd for a, cmd in listening.items() if not a[0].startswith(loopback)}
    assert not outside, f"listening beyond loopback: {outside}"


def test_a_page_on_the_machine_cannot_drive_the_ui_and_no_local_user_the_dask_cluster(topology):
    """Issue 50: on loopback, the UI is reachable from every page the operator's browser opens and the
    scheduler from every local user. The UI refuses the cross-site forms and a foreign origin (it answers its
    own kind of request); the scheduler refuses a client without the topology's certificate."""
    import json
    import urllib.error
    import urllib.request

    from distributed import Client

    body = json.dumps({"query": 'mutation { terminateRun(runId: "none") { __typename } }'}).encode()

    def status(**headers: str) -> int:
        headers = {k.replace("_", "-"): v for k, v in headers.items()}
        req = urllib.request.Request(topology.webserver + "/graphql", data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(Content_Type="text/plain") == 415
    assert status(Content_Type="application/json", Origin="http://evil.example") == 403
    assert status(Content_Type="application/json", Origin=topology.webserver) == 200
    with pytest.raises((OSError, TimeoutError)):
        Client(topology.scheduler.replace("tls://", "tcp://"), timeout="5s")


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

    # one click to full resolution: the partition's Neuroglancer link names the topology's viewer, which
    # serves the image's chunks from S3 byte for byte
    link = _neuroglancer_link(dagster_api, ["ingest", "local"], name)
    assert link.startswith(f"{topology.url('viewer')}/v/em/#!"), link
    source = json.loads(urllib.parse.unquote(link.split("#!", 1)[1]))["layers"][0]["source"]
    chunk = requests.get(source.removeprefix("zarr3://") + "0/c/0/0/0", timeout=30)
    assert chunk.status_code == 200
    stored = fsspec.filesystem("s3", **storage_options(topology)).cat_file(f"{url}/0/c/0/0/0")
    assert chunk.content == stored


LATEST_METADATA = """query($key: [String!]!, $partition: String!) { assetNodeOrError(assetKey: {path: $key}) {
  ... on AssetNode { assetMaterializations(partitions: [$partition], limit: 1) { metadataEntries {
  label ... on MarkdownMetadataEntry { mdStr } ... on UrlMetadataEntry { url } } } } } }"""


def _neuroglancer_link(dagster_api, key: list[str], partition: str) -> str:
    node = dagster_api.query(LATEST_METADATA, {"key": key, "partition": partition})["assetNodeOrError"]
    (entry,) = [
        e for e in node["assetMaterializations"][0]["metadataEntries"] if e["label"] == "neuroglancer"
    ]
    return entry.get("url") or entry["mdStr"].rsplit("](", 1)[1].removesuffix(")")


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
    # the warm live-QC service judged the tiles as they landed; the run recorded them (issue 26)
    assert f"montage {m.montage_id} judged ({m.tiles} tiles)" in topology.log_of("live-qc").read_text()
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


# The daemon, a Dask worker, a run, the listener and the object store killed mid-work: test_faults.py.


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


def test_a_killed_viewer_is_restarted_and_its_links_open_again(topology):
    """The viewer keeps nothing: SIGKILLed, it is started again by the supervisor (compose: unless-stopped)
    and the same URL answers; nothing else notices."""
    page = f"{topology.url('viewer')}/v/em/"
    assert requests.get(page, timeout=30).status_code == 200
    topology.kill("viewer")
    topology.wait_back("viewer", timeout=120)
    assert requests.get(page, timeout=30).status_code == 200


def test_batch_work_runs_niced_on_the_workers_so_live_tiles_get_the_cores_first(dask_client):
    """The workers' task threads run at nice 10 (their preload), the live-QC service's at the default 0."""
    import os

    from em_platform.deploy.batch_niceness import BATCH_NICENESS

    # os.getpriority(PRIO_PROCESS, 0) in a task: on Linux, the niceness of the worker thread running it
    futures = [
        dask_client.submit(os.getpriority, os.PRIO_PROCESS, 0, pure=False, workers=[w])
        for w in dask_client.nthreads()
    ]
    assert [f.result() for f in futures] == [BATCH_NICENESS] * len(futures)
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0  # this (test) process is not niced: the check can fail
