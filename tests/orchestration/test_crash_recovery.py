"""A run process killed with ``kill -9`` while it holds the ``pixels`` pool slot: the platform recovers by
itself. A real daemon (``dagster-daemon run``) with the project's dagster.yaml (poll intervals shortened)
launches the inbox sensor's run through the default run launcher; the test kills the run's process in the
middle of the conversion. Then the slot comes back (run monitoring), the catalog record goes to 'failed'
naming the killed run (sensor ``failed_run_records``, with the crash as the reason, or the retry, whichever
reaches it first), and the run retry completes the ingest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import yaml
from dagster._core.events import DagsterEventType

from em_platform.catalog.db import CatalogDB
from em_platform.samples import em_texture, write_ome_tiff
from tests.support.polling import wait_until

REPO = Path(__file__).resolve().parents[2]
ENTRY = "slow_stack.ome.tif"


def _instance_home(home: Path) -> None:
    """The project's dagster.yaml, only its polling made fast enough for a test."""
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    config["run_coordinator"]["config"]["dequeue_interval_seconds"] = 1
    monitoring = config["run_monitoring"]
    assert monitoring.get("free_slots_after_run_end_seconds"), "dagster.yaml never frees a dead run's slots"
    monitoring["poll_interval_seconds"] = 1
    monitoring["free_slots_after_run_end_seconds"] = 1
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    (home / "workspace.yaml").write_text(
        yaml.safe_dump(
            {
                "load_from": [
                    {
                        "python_module": {
                            "module_name": "em_platform.definitions",
                            "location_name": "em_platform",
                            "working_directory": str(REPO),
                        }
                    }
                ]
            }
        )
    )


def _step_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_START).records
    return records[0].event_log_entry.dagster_event.pid if records else None


def _pixels_held_by(instance: dg.DagsterInstance, run_id: str) -> int:
    info = instance.event_log_storage.get_concurrency_info("pixels")
    return sum(1 for slot in info.claimed_slots if slot.run_id == run_id)


@pytest.mark.timeout(300)
def test_a_killed_run_frees_its_slot_fails_its_record_and_is_retried(tmp_path, monkeypatch):
    home, data, inbox = tmp_path / "home", tmp_path / "data", tmp_path / "inbox"
    _instance_home(home)
    inbox.mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "EM_DATA_ROOT": str(data),
        "EM_INBOX": str(inbox),
        "EM_INBOX_SETTLE_SECONDS": "0",
        "EM_SENSOR_INTERVAL_SECONDS": "1",
    }
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the test's own look at the instance
    catalog = CatalogDB(f"sqlite:///{data / 'catalog.sqlite'}")  # its tables, before any run's
    log = (tmp_path / "daemon.log").open("w")  # read it when this test fails
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(home / "workspace.yaml")],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # while the daemon starts: a stack big enough that its conversion takes seconds (the kill lands
        # inside it; 100 MB took under 1 s on a quiet machine, ending before the test could open the instance
        # and find the step); a texture tiled, since drawing one this size takes long
        volume = np.tile(em_texture((6, 256, 256), seed=3, dtype=np.uint16), (16, 6, 6))  # 453 MB
        write_ome_tiff(tmp_path / ENTRY, volume, {"z": 40.0, "y": 4.0, "x": 4.0})
        os.replace(tmp_path / ENTRY, inbox / ENTRY)  # arrives whole
        record = wait_until(
            lambda: (r := catalog.find("local", ENTRY)) and r["status"] == "processing" and r,
            180,
            "processing",
        )
        first_run = catalog.history(record["id"])[-1].run_id
        with dg.DagsterInstance.from_config(str(home)) as instance:
            pid = wait_until(lambda: _step_pid(instance, first_run), 30, "the step's process")
            assert _pixels_held_by(instance, first_run) == 1
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_until(lambda: _pixels_held_by(instance, first_run) == 0, 60, "the dead run's slot freed")
            done = wait_until(
                lambda: (r := catalog.get(record["id"]))["status"] == "complete" and r, 180, "the retry"
            )
            recovered = time.monotonic() - killed_at
            # the record went to 'failed', naming the killed run: by the failure sensor with the crash as
            # its reason, or, when the retry reached the record first, by the retry taking it over
            failed = [h for h in catalog.history(record["id"]) if h.to_status == "failed"]
            assert len(failed) == 1 and first_run in failed[0].message, failed
            if failed[0].run_id == first_run:
                assert "SIGKILL" in failed[0].message, failed
            else:
                assert failed[0].message.startswith(f"interrupted: run {first_run} stopped"), failed
            assert done["error"]["retry_count"] == 1
            assert instance.get_run_by_id(first_run).status == dg.DagsterRunStatus.FAILURE
            retry = wait_until(
                lambda: next(
                    (
                        r
                        for r in instance.get_runs(dg.RunsFilter(tags={"dagster/partition": ENTRY}))
                        if r.parent_run_id == first_run and r.is_finished
                    ),
                    None,
                ),
                60,
                "the retry run's end",
            )
            assert retry.status == dg.DagsterRunStatus.SUCCESS
            assert done["lineage"]["run_id"] == retry.run_id
        statuses = [h.to_status for h in catalog.history(record["id"])]
        assert statuses[-5:] == ["failed", "pending", "processing", "saving-data", "complete"], statuses
        print(f"recovered {recovered:.1f} s after the kill")
    finally:
        catalog.dispose()
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(10)
        log.close()


def test_a_cancelled_runs_records_say_so(tmp_path):
    """A run cancelled from the UI (or by max_runtime_seconds) leaves its catalog record cancelled and its
    cryo tilt series failed, with the reason, instead of 'processing' forever."""
    from em_platform.cryo.results_db import CryoResults
    from em_platform.resources import CatalogResource
    from em_platform.sensors.recovery import cancelled_run_records

    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"

    @dg.op
    def noop():
        pass

    @dg.job
    def some_job():
        noop()

    with dg.instance_for_test() as instance:
        run = instance.create_run_for_job(some_job)
        catalog, cryo = CatalogDB(url), CryoResults(url)
        rec = catalog.begin("local", "a.tif", description="a", files=[], run_id=run.run_id)
        catalog.transition(rec["id"], "processing", run_id=run.run_id)
        cryo.mark("TS_01", "processing", series={"name": "TS_01", "kind": "tilt_series"}, run_id=run.run_id)
        instance.report_run_canceling(run)
        instance.report_run_canceled(run, "stopped by the operator")
        event = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.RUN_CANCELED).records[0]
        with dg.build_run_status_sensor_context(
            sensor_name="cancelled_run_records",
            dagster_instance=instance,
            dagster_run=instance.get_run_by_id(run.run_id),
            dagster_event=event.event_log_entry.dagster_event,
            resources={"catalog": CatalogResource(url=url)},
        ) as context:
            cancelled_run_records(context)
    after = catalog.get(rec["id"])
    assert after["status"] == "cancelled"
    assert "stopped by the operator" in catalog.history(rec["id"])[-1].message
    series = cryo.series("TS_01")
    assert series["status"] == "failed" and "stopped by the operator" in series["error"]
    catalog.dispose()
    cryo.dispose()
