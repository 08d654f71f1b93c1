"""How the worker jobs end, against the session's real SLURM: at a run's end (:func:`em_platform.cluster.slurm.release`)
a job still queued is cancelled before it starts, not started to be retired (or, starting as the cluster
closes, cancelled mid-start), and a running worker's job ends COMPLETED; so does the job of a worker adaptive
scaling lets go mid-run."""

from __future__ import annotations

import os
import sys
import time

from dask.distributed import Client

from em_platform.cluster.slurm import JobLog, SlurmSettings, release, start_cluster
from tests.support.polling import wait_until


def _use(slurm, monkeypatch) -> None:
    """dask-jobqueue runs sbatch/scancel with this process's environment: the session's cluster in it."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in slurm.env.items():
        monkeypatch.setenv(name, value)


def _start(slurm, tmp_path, cores: int = 1):
    """A platform cluster of one to two worker jobs of ``cores`` each on the session's SLURM, and its job log."""
    settings = SlurmSettings(
        queue=slurm.partition,
        cores=cores,
        memory="1GB",
        walltime="00:10:00",
        python=sys.executable,
        min_jobs=1,
        max_jobs=2,
        start_timeout=60,
    )
    log = JobLog()
    return start_cluster(settings, log, str(tmp_path / "logs")), log


def test_a_job_still_queued_at_release_never_starts_and_the_running_one_completes(
    slurm, tmp_path, monkeypatch
):
    _use(slurm, monkeypatch)
    # each job takes every core of the node, so the second job queues (Resources) while the first runs
    cluster, log = _start(slurm, tmp_path, cores=slurm.cpus)
    with Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        cluster.adapt(minimum_jobs=2, maximum_jobs=2)
        wait_until(lambda: len(log.jobs) == 2, 30, "the second job's submission")
        running, queued = (job.job_id for job in log.jobs)
        assert slurm.job_state(queued)[0] == "PENDING", slurm.describe()
        began = time.monotonic()
        release(client, cluster, log)
        took = time.monotonic() - began
    first, second = slurm.wait_for_record(running), slurm.wait_for_record(queued)
    assert (first["JobState"], first["NodeCnt"]) == ("COMPLETED", "1"), first
    # cancelled where it waited: no node, no process, nothing to retire
    assert (second["JobState"], second["NodeCnt"], second["NodeList"]) == ("CANCELLED", "0", "(null)"), second
    print(f"release: {took:.1f} s; job {running} COMPLETED, queued job {queued} cancelled before it started")


def test_a_worker_adaptive_scaling_lets_go_ends_its_job_completed(slurm, tmp_path, monkeypatch):
    _use(slurm, monkeypatch)
    cluster, log = _start(slurm, tmp_path)
    with Client(cluster) as client:
        cluster.adapt(minimum_jobs=2, maximum_jobs=2)
        client.wait_for_workers(2, timeout=90)
        cluster.adapt(minimum_jobs=1, maximum_jobs=1)  # no work: adaptive scaling lets one worker go
        let_go = wait_until(
            lambda: [j.job_id for j in log.jobs if slurm.job_record(j.job_id)], 60, "a job's end"
        )
        record = slurm.job_record(let_go[0])
        release(client, cluster, log)
    # its worker was retired, then its job closed: the job script's own exit, not scancel
    assert (record["JobState"], record["NodeCnt"]) == ("COMPLETED", "1"), record
    assert all(slurm.wait_for_record(j.job_id)["JobState"] == "COMPLETED" for j in log.jobs), log.jobs
