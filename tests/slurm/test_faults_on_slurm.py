"""Faults of a SLURM cluster under a live montage run (issue 37, point 4), against the real slurmctld/slurmd:
a worker job cancelled mid-run, a worker at its walltime, slurmctld restarted mid-run: each time the montage
completes with every tile judged once and the same fused image as on the local cluster. A queue that starts
nothing fails the run within the configured wait, naming the partition and SLURM's reason.

The scope is gated: the first tiles land, the fault is made once the platform has judged one of them on a
worker job, then the rest land and need a worker again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import zarr

from em_platform.cluster.slurm import SlurmQueueStalled
from em_platform.resources import DaskResource
from em_platform.simulation.scope import simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.tem.journal import Journal
from tests.slurm.test_platform_on_slurm import assert_completed, run_jobs, use_slurm
from tests.support.platform import make_platform
from tests.support.polling import wait_until

CFG = ScopeConfig(rows=2, columns=3, overlap=0.15, jitter_px=6.0, seed=11)
MONTAGE = "m-slurm-fault"
FIRST = 2  # tiles that land before the fault


def _run(platform, instance) -> dg.ExecuteInProcessResult:
    instance.add_dynamic_partitions("montages", [MONTAGE])
    return platform.defs.resolve_job_def("montage_job").execute_in_process(
        instance=instance,
        partition_key=MONTAGE,
        raise_on_error=False,
        run_config={"ops": {"montage_tiles": {"config": {"poll_seconds": 0.05}}}},
    )


def _fused(platform) -> np.ndarray:
    image = zarr.open_group(str(platform.data_root / "acquisition" / MONTAGE / "montage.ome.zarr"), mode="r")
    return np.asarray(image["0"][:])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> np.ndarray:
    """The montage fused on the local cluster, all tiles there at once."""
    tmp = tmp_path_factory.mktemp("local")
    platform = make_platform(tmp)
    journal = Journal(platform.settings.catalog_url)
    simulate_montage(CFG, tmp / "tiles", journal.record, sleep=lambda s: None, montage_id=MONTAGE)
    with dg.instance_for_test() as instance:
        assert _run(platform, instance).success
    return _fused(platform)


def live_run_with_fault(
    slurm, tmp_path: Path, monkeypatch, fault: Callable[[], None], *, fails: bool = False, **env: str
):
    """The montage acquired live with its run on SLURM worker jobs; ``fault`` once a tile is judged. Returns
    the platform and the run's worker jobs, or (``fails``) the platform, the failed run's result and its
    instance's events, the scope having landed every tile."""
    platform = make_platform(tmp_path / "slurm", extra_env=use_slurm(slurm, tmp_path, monkeypatch, **env))
    journal = Journal(platform.settings.catalog_url)
    gate, landed, failed = threading.Event(), [0], []

    def emit(topic: str, payload: dict) -> None:
        reference = any(payload.get(flag) for flag in ("brightfield", "darkfield", "lens_correction"))
        if topic == "tile.raw" and not reference:  # the flatfield's frames come first, ungated
            if landed[0] >= FIRST:
                gate.wait(300)
            landed[0] += 1
        journal.record(topic, payload)

    def inject() -> None:
        try:
            wait_until(lambda: journal.messages("qc.tile", MONTAGE), 180, "a tile judged on a worker job")
            fault()
        except BaseException as exc:  # surfaced after the run
            failed.append(exc)
        finally:
            gate.set()

    scope = threading.Thread(
        target=simulate_montage,
        args=(CFG, tmp_path / "slurm" / "tiles", emit),
        kwargs={"sleep": lambda s: None, "montage_id": MONTAGE},
        daemon=True,
    )
    injector = threading.Thread(target=inject, daemon=True)
    scope.start()
    wait_until(lambda: journal.montages_after(0), 30, "the montage to start")
    injector.start()
    with dg.instance_for_test() as instance:
        result = _run(platform, instance)
        jobs = run_jobs(instance, result.run_id) if result.success else []
        events = [e for e in instance.all_logs(result.run_id)]
        tags = dict(instance.get_run_by_id(result.run_id).tags)
    injector.join(60)
    scope.join(60)
    if failed:
        raise failed[0]
    if fails:
        assert not result.success
        return platform, result, events, tags
    assert result.success
    verdicts = [m["tile_id"] for m in journal.messages("qc.tile", MONTAGE)]
    assert len(verdicts) == CFG.rows * CFG.columns == len(set(verdicts)), verdicts  # none lost, none twice
    return platform, jobs


def test_a_worker_job_cancelled_mid_run_is_replaced_and_the_montage_completes(
    slurm, tmp_path, monkeypatch, reference
):
    cancelled: list[str] = []

    def scancel() -> None:
        cancelled.extend(slurm.running_jobs())
        assert cancelled, "no worker job was running"
        slurm.run("scancel", *cancelled)

    platform, jobs = live_run_with_fault(slurm, tmp_path, monkeypatch, scancel)
    np.testing.assert_array_equal(_fused(platform), reference)
    assert set(cancelled) < set(jobs), (cancelled, jobs)  # a new job took over
    for job in cancelled:
        assert slurm.wait_for_record(job)["JobState"] == "CANCELLED"
    assert_completed(slurm, [j for j in jobs if j not in cancelled], tmp_path / "slurm-logs")


def test_a_worker_at_its_walltime_hands_over_to_a_new_job(slurm, tmp_path, monkeypatch, reference):
    """Walltime one minute: the worker retires at its lifetime (30 s) rather than being killed with TIMEOUT,
    its job ends COMPLETED, and a new job does the tiles that land after."""
    first: list[str] = []

    def outlive() -> None:
        first.extend(slurm.running_jobs())
        assert first, "no worker job was running"
        records = [slurm.wait_for_record(job, timeout=120) for job in first]
        assert [r["JobState"] for r in records] == ["COMPLETED"] * len(first), records

    platform, jobs = live_run_with_fault(slurm, tmp_path, monkeypatch, outlive, EM_SLURM_WALLTIME="1")
    np.testing.assert_array_equal(_fused(platform), reference)
    assert set(first) < set(jobs), (first, jobs)
    assert_completed(slurm, jobs, tmp_path / "slurm-logs")


def test_slurmctld_restarted_mid_run_changes_nothing(slurm, tmp_path, monkeypatch, reference):
    platform, jobs = live_run_with_fault(slurm, tmp_path, monkeypatch, slurm.restart_controller)
    np.testing.assert_array_equal(_fused(platform), reference)
    assert_completed(slurm, jobs, tmp_path / "slurm-logs")


def test_a_queue_that_starts_nothing_fails_the_run_in_time_with_slurms_reason(slurm, tmp_path, monkeypatch):
    use_slurm(slurm, tmp_path, monkeypatch, EM_SLURM_START_TIMEOUT="5")

    @dg.asset
    def needs_workers(dask: DaskResource) -> None:
        dask.get_client()

    slurm.set_partition_state(slurm.partition, "DOWN")
    try:
        began = time.monotonic()
        with dg.instance_for_test() as instance, pytest.raises(SlurmQueueStalled) as err:
            dg.materialize(
                [needs_workers], instance=instance, resources={"dask": DaskResource(compute="slurm")}
            )
        waited = time.monotonic() - began
    finally:
        slurm.set_partition_state(slurm.partition, "UP")
    text = str(err.value)
    assert f"partition {slurm.partition!r} in 5 s" in text and "PENDING (PartitionDown)" in text, text
    assert waited < 5 + 60, waited  # the wait, then the jobs cancelled: bounded, not a hang
    wait_until(lambda: not slurm.running_jobs(), 30, "the pending worker job to be cancelled")


def test_a_worker_killed_at_its_walltime_is_replaced_and_the_montage_completes(
    slurm, tmp_path, monkeypatch, reference
):
    """SLURM itself ends the worker's job at its time limit (TIMEOUT, not our retirement): as a lost worker, its
    tasks are recomputed on the job adaptive scaling starts in its place."""
    ended: list[str] = []

    def walltime() -> None:
        ended.extend(slurm.running_jobs())
        assert ended, "no worker job was running"
        for job in ended:
            slurm.end_walltime_now(job)
        records = [slurm.wait_for_record(job, timeout=120) for job in ended]  # slurmctld checks every 30 s
        assert [r["JobState"] for r in records] == ["TIMEOUT"] * len(ended), records

    platform, jobs = live_run_with_fault(slurm, tmp_path, monkeypatch, walltime)
    np.testing.assert_array_equal(_fused(platform), reference)
    assert set(ended) < set(jobs), (ended, jobs)
    assert_completed(slurm, [j for j in jobs if j not in ended], tmp_path / "slurm-logs")


def test_a_queue_that_stops_starting_jobs_mid_run_fails_the_run_in_time_and_a_rerun_resumes(
    slurm, tmp_path, monkeypatch, reference
):
    """Mid-run, the partition goes down and the only worker job is cancelled: the tiles that land wait for a
    worker the queue never starts. The run fails within the wait (EM_SLURM_START_TIMEOUT) naming SLURM's reason,
    judges no tile as failed for it, and once the partition is up again a re-run completes the montage with
    every tile judged once."""
    wait = 30  # past the 16 s after which the lost job is replaced: the replacement is what pends
    fault_at: list[float] = []

    def stall() -> None:
        slurm.set_partition_state(slurm.partition, "DOWN")
        fault_at.append(time.monotonic())
        slurm.run("scancel", *slurm.running_jobs())

    try:
        platform, result, events, tags = live_run_with_fault(
            slurm, tmp_path, monkeypatch, stall, fails=True, EM_SLURM_START_TIMEOUT=str(wait)
        )
        failed_after = time.monotonic() - fault_at[0]
    finally:
        slurm.set_partition_state(slurm.partition, "UP")
    assert failed_after < wait + 60, failed_after  # the wait, the run's teardown: bounded, not a hang
    errors = [e.user_message for e in events if e.level >= 40]
    said = [
        m for m in errors if f"no worker job ran on SLURM partition {slurm.partition!r} for {wait} s" in m
    ]
    assert said and "PENDING (PartitionDown)" in said[0] and "a re-run resumes" in said[0], errors
    assert "PartitionDown" in tags["em/slurm_stalled"], tags
    failure = [e for e in events if e.dagster_event and e.dagster_event.event_type_value == "STEP_FAILURE"]
    assert failure and "ran no worker" in str(failure[0].dagster_event.event_specific_data.error), failure
    journal = Journal(platform.settings.catalog_url)
    judged = journal.messages("qc.tile", MONTAGE)
    unreadable = [m for m in judged if any(f["fault_type"] == "unreadable_tile" for f in m["faults"])]
    assert not unreadable, unreadable  # no tile judged failed for want of a worker

    with dg.instance_for_test() as instance:
        again = _run(platform, instance)
        assert again.success
    verdicts = [m["tile_id"] for m in journal.messages("qc.tile", MONTAGE)]
    assert len(verdicts) == CFG.rows * CFG.columns == len(set(verdicts)), verdicts  # none lost, none twice
    np.testing.assert_array_equal(_fused(platform), reference)
