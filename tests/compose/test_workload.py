"""`make demo`'s workload through the containers: an inbox file, a montage acquired live through the published
broker by `scope-sim` on the host, a simulated tilt series processed into a tomogram; each run launched by
the daemon as a container of its own through the engine's Docker API, and removed when it ends; what the
UI shows of them in Chromium, and the fused montage opened in the viewer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from em_platform.cryo.results_db import CryoResults, tomograms
from em_platform.tem.broker import BrokerPublisher
from tests.deploy.conftest import drop_into_inbox
from tests.deploy.dagster_api import TERMINAL, wait_until
from tests.support.browser import (
    goto,
    new_page,
    open_browser,
    open_in_neuroglancer,
    require_browser,
    screenshot,
)
from tests.support.outcomes import catalog_records, data_store, datasets_outcome

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
CONTAINER_TAG = "docker/container_id"


class RunContainers:
    """The run containers the engine lists while work goes on (`podman ps`, label dagster/run_id), polled."""

    def __init__(self, stack):
        self.stack, self.seen, self.mounts, self._stop = stack, {}, {}, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.is_set():
            for c in self.stack.stack.run_containers():
                run_id = (c.get("Labels") or {}).get("dagster/run_id")
                if run_id not in self.seen:
                    self.seen[run_id] = c.get("Id")
                    info = self.stack.stack.engine_cmd("inspect", c.get("Id"))  # gone already: nothing seen
                    if info.returncode == 0:
                        self.mounts[run_id] = sorted(
                            m["Destination"] for m in json.loads(info.stdout)[0]["Mounts"]
                        )
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _assert_ran_in_its_own_container(stack, api, run: dict, watched: RunContainers) -> None:
    assert run["status"] == "SUCCESS", api.failure_messages(run["runId"])
    cid = run["tags"].get(CONTAINER_TAG)
    assert cid, f"run {run['runId']} has no {CONTAINER_TAG} tag: not launched by the Docker run launcher"
    assert watched.seen.get(run["runId"], "").startswith(cid[:12]), (run["runId"], watched.seen)
    # the data and compute-log volumes and the Dask certificate, nothing else of the host (no engine socket)
    assert watched.mounts.get(run["runId"]) == ["/data", "/opt/dagster/compute_logs", "/opt/dask-certs"], (
        watched.mounts
    )
    events = [e.get("message") or "" for e in api.run_events(run["runId"])]
    assert any(f"Launching run in a new container {cid}" in m for m in events)
    # removed when it ended (auto_remove): the engine no longer knows it
    wait_until(
        lambda: (
            stack.stack.engine_cmd("container", "exists", cid).returncode != 0
            if stack.stack.tool == "podman"
            else stack.stack.engine_cmd("inspect", cid).returncode != 0
        ),
        60,
        f"run {run['runId']}'s container {cid[:12]} to be removed",
    )


def test_an_inbox_file_ends_complete_in_s3_from_a_run_in_its_own_container(stack, dagster_api):
    name = f"drop_{uuid.uuid4().hex[:6]}.ome.tif"
    with RunContainers(stack) as watched:
        dropped = {name: drop_into_inbox(stack, name, seed=11)}
        [run] = dagster_api.wait_runs_done({"dagster/partition": name}, 1, timeout=900)
    _assert_ran_in_its_own_container(stack, dagster_api, run, watched)
    lost, twice, details = datasets_outcome(stack, dagster_api, dropped)
    assert (lost, twice) == (0, 0), details
    record = catalog_records(stack, "local", [name])[name]
    assert record["files"]["volume"].startswith(f"{stack.platform_env['EM_DATA_ROOT']}/")
    # the run's logs reach the UI: its step's own log lines in the event log, its stdout/stderr captured
    # on the compute-log volume the webserver reads
    events = [e.get("message") or "" for e in dagster_api.run_events(run["runId"])]
    assert any(m.startswith(f"converting {name}") for m in events), events
    logs = Path(
        stack.stack.engine_cmd(
            "volume",
            "inspect",
            "--format",
            "{{.Mountpoint}}",
            f"{stack.stack.project}-compute-logs",
            check=True,
        ).stdout.strip()
    )
    assert list(logs.rglob(f"*{run['runId']}*")), f"no compute logs of run {run['runId']} in {logs}"


def _scope_sim(stack, montage_id: str, *args: str) -> subprocess.CompletedProcess:
    """`em-platform scope-sim` on the host as the microscope PC: it publishes to the published STOMP port (TLS) and
    writes its tiles into the data volume's scope folder, which the containers mount as /data/scope."""
    s = stack.settings
    argv = [str(Path(sys.executable).parent / "em-platform"), "scope-sim", "--montage-id", montage_id]
    argv += ["--broker", f"127.0.0.1:{s['EM_BROKER_PORT']}", "--out", str(stack.data / "scope")]
    argv += ["--share-as", "/data/scope", *args]
    env = {
        **os.environ,
        "EM_SCOPE_SHARES": "/data/scope",
        "EM_BROKER_USERNAME": s["EM_SCOPE_BROKER_USERNAME"],  # the microscope's own broker user
        "EM_BROKER_PASSWORD": s["EM_SCOPE_BROKER_PASSWORD"],
        "EM_BROKER_TOPIC_PREFIX": s["EM_BROKER_TOPIC_PREFIX"],
        "EM_BROKER_TLS": stack.machine.stomp_tls,  # the published port speaks TLS only
    }
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def _asset_metadata(api, asset: list[str], partition: str) -> dict[str, str]:
    data = api.query(
        """query M($key: AssetKeyInput!, $p: [String!]) { assetOrError(assetKey: $key) { ... on Asset {
             assetMaterializations(partitions: $p, limit: 1) { metadataEntries { label
               ... on UrlMetadataEntry { url } ... on PathMetadataEntry { path } ... on TextMetadataEntry { text }
               ... on MarkdownMetadataEntry { mdStr } } } } } }""",
        {"key": {"path": asset}, "p": [partition]},
    )["assetOrError"]
    [mat] = data["assetMaterializations"]
    return {
        e["label"]: e.get("url") or e.get("path") or e.get("text") or e.get("mdStr")
        for e in mat["metadataEntries"]
    }


@pytest.fixture(scope="module")
def montage(stack, dagster_api) -> str:
    montage_id = f"m{uuid.uuid4().hex[:10]}"
    m = stack.machine
    heard: list[str] = []
    with (
        RunContainers(stack) as watched,
        BrokerPublisher(
            m.stomp_host,
            m.stomp_port,
            topic_prefix=stack.settings["EM_BROKER_TOPIC_PREFIX"],
            username=m.stomp_user,
            password=m.stomp_password,
            tls=m.stomp_tls,
        ) as ear,
    ):
        ear.subscribe("qc.tile", lambda msg: heard.append(msg.tile_id))
        grid = ["--rows", "3", "--columns", "3", "--overlap", "0.15", "--jitter", "8"]
        scope = _scope_sim(stack, montage_id, *grid)
        assert scope.returncode == 0, scope.stdout + scope.stderr
        assert "9/9 judged by the platform (qc.tile)" in scope.stdout, scope.stdout
        [run] = dagster_api.wait_runs_done({"dagster/partition": montage_id}, 1, timeout=900)
    assert sorted(set(heard)) == sorted(heard) and len(heard) == 9, heard  # each tile judged once, live
    _assert_ran_in_its_own_container(stack, dagster_api, run, watched)
    return montage_id


def test_a_montage_from_the_host_scope_is_judged_live_stitched_fused_uploaded_and_recorded(
    stack, dagster_api, montage
):
    record = catalog_records(stack, "acquisition", [montage])[montage]
    assert record and record["status"] == "complete", record
    volume = record["files"]["volume"]
    assert volume.startswith(f"{stack.platform_env['EM_DATA_ROOT']}/") and volume.endswith(".zarr"), volume
    store = data_store(stack)
    assert store.fs.exists(f"{volume.removeprefix('s3://')}/zarr.json")
    meta = _asset_metadata(dagster_api, ["montage_upload"], montage)
    link = re.search(r"\]\((http[^)\s]+)\)", meta["neuroglancer"])  # a Markdown link
    assert link and link.group(1).startswith(f"{stack.viewer}/v/em/#!"), meta["neuroglancer"]


def test_a_simulated_tilt_series_is_processed_into_a_tomogram(stack, dagster_api):
    from em_platform.simulation.cryoet.examples import DEMO_SPEC_NAME, write_demo_spec

    began = time.monotonic()
    with RunContainers(stack) as watched:
        write_demo_spec(stack.data / "simulations")
        stack_key = f"{DEMO_SPEC_NAME}_000"
        sim = _job_run_done(dagster_api, "simulation_job", stack_key)
        simulated = time.monotonic()
        _assert_ran_in_its_own_container(stack, dagster_api, sim, watched)
        cryo = _job_run_done(dagster_api, "cryo_job", stack_key)
    _assert_ran_in_its_own_container(stack, dagster_api, cryo, watched)
    print(f"simulated in {simulated - began:.0f} s, processed in {time.monotonic() - simulated:.0f} s")
    results = CryoResults(stack.catalog_url, create=False)
    try:
        series = results.series(stack_key)
        assert series and series["status"] == "complete", series
        made = results.rows(tomograms, stack_key)
    finally:
        results.dispose()
    record = catalog_records(stack, "simulation", [stack_key])[stack_key]
    assert record["status"] == "complete" and record["files"]["volume"].startswith("s3://")
    assert {t["method"] for t in made} >= {"wbp"} and all(files_exist(stack, t) for t in made), made
    assert any(t["zarr_url"] and t["zarr_url"].startswith("s3://") for t in made), made  # for the viewer


def _job_run_done(api, job: str, partition: str, timeout: float = 1800) -> dict:
    """The one run of ``job`` for ``partition``, once it has ended."""

    def done():
        runs = [r for r in api.partition_runs(partition) if r["jobName"] == job]
        return runs if runs and all(r["status"] in TERMINAL for r in runs) else None

    [run] = wait_until(done, timeout, f"the {job} run of {partition}")
    return run


def files_exist(stack, row: dict) -> bool:
    """Every file a results row names exists: s3:// ones in the stack's S3, /data ones on its data volume."""
    store = data_store(stack)
    paths = [v for v in row.values() if isinstance(v, str) and v.startswith(("s3://", "/data/"))]
    return bool(paths) and all(
        store.fs.exists(p.removeprefix("s3://")) if p.startswith("s3://") else (stack.data / p[6:]).exists()
        for p in paths
    )


@pytest.fixture(scope="module")
def browser():
    require_browser()
    with open_browser() as b:
        yield b


def test_the_ui_shows_each_run_its_container_checks_and_lineage(stack, dagster_api, montage, browser):
    runs = dagster_api.runs()
    assert {r["jobName"] for r in runs} >= {"ingest_local_job", "montage_job", "simulation_job", "cryo_job"}
    page = new_page(browser, **stack.browser_options())
    goto(page, f"{stack.webserver}/runs")
    for r in runs[:4]:  # each run's row: its id and the container it ran in (its tags)
        page.get_by_text(r["runId"][:8]).first.wait_for()
        page.get_by_text(f"{CONTAINER_TAG}: {r['tags'][CONTAINER_TAG][:12]}").first.wait_for()
    screenshot(page, "compose_runs")
    goto(page, f"{stack.webserver}/assets/ingest/local?view=checks")
    page.get_by_text("converted", exact=True).first.wait_for()
    screenshot(page, "compose_checks")
    goto(page, f"{stack.webserver}/asset-groups")
    for group in ("ingest", "acquisition", "montage", "simulation", "cryo", "catalog"):
        page.get_by_text(group, exact=True).first.wait_for(state="visible")
    screenshot(page, "compose_lineage")
    page.context.close()


def test_the_viewer_opens_the_fused_montage(stack, montage, browser):
    open_in_neuroglancer(
        browser,
        stack.webserver,
        stack.viewer,
        "montage_upload",
        montage,
        "compose_montage",
        **stack.browser_options(),
    )
