"""The real single-node SLURM of tests/support/slurm.py, and dask-jobqueue's SLURMCluster against it.

Every verdict is SLURM's own: the job completion records slurmctld writes (jobcomp/filetxt), squeue's states and
pending reasons, and the processes on the machine. Waits poll with timeouts; nothing sleeps a fixed time.
"""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from tests.support.polling import wait_until
from tests.support.slurm import LocalSlurm


def _running(slurm: LocalSlurm, job_id: str, timeout: float = 30) -> None:
    wait_until(
        lambda: (slurm.job_state(job_id) or ("",))[0] == "RUNNING", timeout, f"job {job_id} to be RUNNING"
    )


def _job_runs(slurm: LocalSlurm, job_id: str, program: str) -> None:
    """Wait for the job's own process (squeue says RUNNING as soon as the job has its node, before slurmd has
    started its slurmstepd and the script)."""
    wait_until(
        lambda: any(p.info["name"] == program for p in slurm.job_processes(job_id)),
        15,
        f"job {job_id}'s {program} process",
    )


@pytest.fixture(scope="module", autouse=True)
def walltime_job(slurm, tmp_path_factory) -> str:
    """A job past its time limit, made at the module's start so that the other tests run while slurmctld gets
    to it. Limits are whole minutes and slurmctld looks for jobs past theirs every 30 s (a constant), so the
    job's end is moved to now, which is what a limit reached looks like to slurmctld: TIMEOUT within 30 s."""
    folder = tmp_path_factory.mktemp("walltime")
    job = slurm.sbatch(f"--chdir={folder}", "--output=/dev/null", "--time=5", "--wrap", "sleep 300")
    _running(slurm, job)
    slurm.end_walltime_now(job)
    return job


def test_batch_job_completes_and_slurm_records_it(slurm, tmp_path):
    job = slurm.sbatch("--job-name=hello", f"--chdir={tmp_path}", "--output=out-%j.txt", "--wrap", "echo hi")

    record = slurm.wait_for_record(job)

    assert record["JobState"] == "COMPLETED", record
    assert record["Name"] == "hello"
    assert record["ExitCode"] == "0:0"
    assert record["NodeList"] == slurm.node
    assert (tmp_path / f"out-{job}.txt").read_text() == "hi\n"


def test_scancel_is_recorded_as_cancelled_and_leaves_no_process(slurm, tmp_path):
    job = slurm.sbatch(f"--chdir={tmp_path}", "--output=/dev/null", "--wrap", "sleep 300")
    _running(slurm, job)
    _job_runs(slurm, job, "sleep")

    slurm.run("scancel", job)

    assert slurm.wait_for_record(job)["JobState"] == "CANCELLED"
    # slurmctld writes the record when it orders the kill; slurmd kills the processes (SIGTERM, KillWait, SIGKILL)
    wait_until(lambda: not slurm.job_processes(job), 15, "the cancelled job's processes to end")


def test_partition_down_keeps_a_job_pending_with_slurms_reason_until_up(slurm, tmp_path):
    # a job of an earlier test still ending holds the node: SLURM would say Resources before PartitionDown
    wait_until(lambda: not slurm.running_jobs(), 60, "the node free of earlier jobs")
    slurm.set_partition_state(slurm.partition, "DOWN")
    try:
        job = slurm.sbatch(f"--chdir={tmp_path}", "--output=out-%j.txt", "--wrap", "echo ran")
        state, reason = wait_until(
            lambda: (s := slurm.job_state(job)) and s[1] not in ("None", "") and s,
            15,
            "SLURM's pending reason",
        )
        assert (state, reason) == ("PENDING", "PartitionDown")
        out = slurm.run("squeue", "-h", "-o", "%r", "-j", job).stdout.strip()
        assert out == "PartitionDown"
        assert slurm.job_record(job) is None
    finally:
        slurm.set_partition_state(slurm.partition, "UP")

    record = slurm.wait_for_record(job)
    assert record["JobState"] == "COMPLETED", record
    assert (tmp_path / f"out-{job}.txt").read_text() == "ran\n"


def test_dask_jobqueue_worker_runs_as_a_slurm_job(slurm, tmp_path, monkeypatch):
    da = pytest.importorskip("dask.array")
    from dask.distributed import Client
    from dask_jobqueue import SLURMCluster

    # dask-jobqueue runs sbatch/scancel with this process's environment
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in slurm.env.items():
        monkeypatch.setenv(name, value)

    cluster = SLURMCluster(
        queue=slurm.partition,
        cores=1,
        memory="1GB",
        processes=1,
        walltime="00:10:00",
        python=sys.executable,
        scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
        worker_extra_args=["--host", "127.0.0.1"],
        local_directory=str(tmp_path / "worker"),
        log_directory=str(tmp_path / "logs"),
        job_extra_directives=[f"--chdir={tmp_path}"],
    )
    try:
        assert "#SBATCH -p debug" in cluster.job_script()
        with Client(cluster) as client:
            began = time.monotonic()
            cluster.scale(1)
            client.wait_for_workers(1, timeout=60)
            joined_in = time.monotonic() - began
            print(f"dask-jobqueue worker joined {joined_in:.1f} s after scale(1)")

            jobs = [w.job_id for w in cluster.workers.values()]
            assert len(jobs) == 1 and jobs[0]
            job = jobs[0]
            assert slurm.job_state(job)[0] == "RUNNING"
            # the worker is the SLURM job's process, not something started beside it
            assert list(client.run(os.getenv, "SLURM_JOB_ID").values()) == [job]

            n = 1_000_000
            total = da.arange(n, chunks=100_000).sum().compute()
            assert total == n * (n - 1) // 2
    finally:
        cluster.close()

    # cluster.close() scancels the worker's job
    record = slurm.wait_for_record(job)
    assert record["JobState"] == "CANCELLED", record
    wait_until(lambda: not slurm.job_processes(job), 15, "the worker job's processes to end")


def test_walltime_exceeded_is_recorded_as_timeout(slurm, walltime_job):
    # before the controller's restart below: a restart starts slurmctld's 30 s time-limit period again
    record = slurm.wait_for_record(walltime_job, timeout=45)
    assert record["JobState"] == "TIMEOUT", record
    assert record["TimeLimit"] == "1"  # minutes: the moved end, rounded up
    wait_until(lambda: not slurm.job_processes(walltime_job), 15, "the timed-out job's processes to end")


def test_running_job_survives_a_controller_restart(slurm, tmp_path):
    # the job ends only when the test says so (a file), after the restart: no race with the restart's duration
    job = slurm.sbatch(
        f"--chdir={tmp_path}",
        "--output=out-%j.txt",
        "--time=5",
        "--wrap",
        "while [ ! -e go ]; do sleep 0.1; done; echo done",
    )
    _running(slurm, job)
    _job_runs(slurm, job, "slurmstepd")  # launched on the node, not only allocated
    before = slurm.daemon_pids()

    slurm.restart_controller()

    assert slurm.daemon_pids()["slurmctld"] != before["slurmctld"]
    assert slurm.daemon_pids()["slurmd"] == before["slurmd"]
    assert slurm.job_state(job) == ("RUNNING", "None")
    (tmp_path / "go").touch()
    record = slurm.wait_for_record(job)
    assert record["JobState"] == "COMPLETED", record
    assert (tmp_path / f"out-{job}.txt").read_text() == "done\n"


def test_a_second_slurm_runs_beside_and_stop_leaves_no_process(slurm, tmp_path):
    """Its own ports, munge key and cluster name; stop() ends its daemons and a job still running."""
    with LocalSlurm(tmp_path) as other:
        assert other.ctld_port not in (slurm.ctld_port, slurm.slurmd_port)
        job = other.sbatch(f"--chdir={tmp_path}", "--output=/dev/null", "--wrap", "sleep 300")
        _running(other, job)
        _job_runs(other, job, "sleep")
        pids = other.daemon_pids()
        assert set(pids) == {"munged", "slurmctld", "slurmd"}

    assert not [pid for pid in pids.values() if psutil.pid_exists(pid)]
    assert not other.job_processes()
    assert not other.daemon_pids()
    # the session's SLURM did not notice: its node answers and is idle (nothing of it down or drained)
    try:
        wait_until(lambda: slurm.node_state() == "idle", 15, "the session's node to be idle")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{slurm.describe()}") from None
