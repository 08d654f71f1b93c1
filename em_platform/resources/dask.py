"""A Dask client for the heavy pixel work: an in-process LocalCluster by default, an existing cluster, or worker
jobs on the facility's SLURM cluster (``EM_COMPUTE=slurm``: :mod:`em_platform.cluster.slurm`)."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import PrivateAttr

from em_platform.quiet_dask import quiet_dask

if TYPE_CHECKING:  # imported where used: a run that does no pixel work imports neither
    from distributed import Client
    from distributed.deploy import Cluster

    from em_platform.cluster.slurm import JobLog


class DaskResource(dg.ConfigurableResource):
    """Created lazily on first use, so runs that do no pixel work start no cluster; an in-process one with
    :mod:`em_platform.quiet_dask`'s settings."""

    scheduler_address: str | None = None
    n_workers: int = 1
    threads_per_worker: int = 0  # 0: one thread per core
    processes: bool = False  # threads: numpy, zarr codecs and blosc release the GIL; no pickling of blocks
    # "slurm": worker jobs through dask-jobqueue, set by EM_SLURM_* (read when the run first asks for a client)
    compute: str = "local"
    data_root: str | None = None  # what SLURM workers must reach (checked when they join)
    _client: Client | None = PrivateAttr(default=None)
    _cluster: Cluster | None = PrivateAttr(default=None)  # a LocalCluster, or SLURM's
    _jobs: JobLog | None = PrivateAttr(default=None)
    _context: object | None = PrivateAttr(default=None)

    @property
    def is_cluster(self) -> bool:
        """Workers of their own (a scheduler's or SLURM's), where work spread as tasks gains over one process."""
        return bool(self.scheduler_address) or self.compute == "slurm"

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._context = context

    def get_client(self):
        from distributed import Client, LocalCluster

        if self._client is None:
            if self.compute == "slurm":
                self._client = self._slurm_client()
            elif self.scheduler_address:
                try:
                    self._client = Client(self.scheduler_address, timeout="30s")
                except OSError as exc:
                    raise RuntimeError(
                        f"cannot reach the Dask scheduler at {self.scheduler_address} ({exc}); "
                        "check DASK_SCHEDULER_ADDRESS or start the cluster"
                    ) from exc
            else:
                # loopback only: Dask runs whatever reaches its ports (dashboard_address=None would still
                # serve the scheduler's HTTP routes on *:8787, and each worker's on *:random)
                with quiet_dask():
                    self._cluster = LocalCluster(
                        n_workers=self.n_workers,
                        threads_per_worker=self.threads_per_worker or os.cpu_count() or 1,
                        processes=self.processes,
                        dashboard_address="127.0.0.1:0",
                        worker_dashboard_address="127.0.0.1:0",
                        **({"host": "127.0.0.1"} if self.processes else {}),
                    )
                    self._client = Client(self._cluster)
        return self._client

    def _slurm_client(self):
        from distributed import Client

        from em_platform.cluster.slurm import (
            JobLog,
            SlurmSettings,
            check_data_root,
            job_log_directory,
            start_cluster,
            wait_for_first_worker,
        )

        settings = SlurmSettings.from_env()
        self._jobs = JobLog()
        self._cluster = start_cluster(
            settings,
            self._jobs,
            job_log_directory(settings, self.data_root),
            warn=lambda message: self._log(message, "warning"),  # an opted-out TLS, in the run's log
        )
        client = Client(self._cluster)
        self._client = client  # closed with the cluster at teardown, whatever happens next
        wait_for_first_worker(client, self._cluster, settings, self._jobs)
        if self.data_root:
            check_data_root(client, self.data_root)
        self._log(
            f"Dask workers as SLURM jobs on partition {settings.queue!r} ({settings.min_jobs}-{settings.max_jobs} "
            f"jobs of {settings.cores} cores, {settings.memory}, {settings.walltime}"
            f"{', TLS' if settings.tls else ''}); scheduler {self._cluster.scheduler_address}; first joined: "
            + ", ".join(f"job {j.job_id}" for j in self._jobs.jobs if j.joined is not None)
        )
        return client

    def _log(self, message: str, level: str = "info") -> None:
        log = getattr(self._context, "log", None) or logging.getLogger(__name__)
        getattr(log, level)(message)

    def _record_jobs(self, jobs: JobLog, context: dg.InitResourceContext | None) -> None:
        """The worker jobs' ids and times in the run's log and tags (the run's page shows its tags)."""
        summary = jobs.summary()
        if not summary["slurm_jobs"]:
            return
        self._log(
            f"SLURM worker jobs {summary['slurm_jobs']}: {summary['slurm_queue_wait_s']} s queued in all "
            f"(longest {summary['slurm_max_queue_wait_s']} s), {summary['slurm_compute_s']} s computing"
        )
        if jobs.stalled:
            self._log(
                f"{jobs.stalled}; the run stopped (nothing of it is lost: a re-run resumes). Check "
                "`sinfo` and `squeue --me`, or raise EM_SLURM_START_TIMEOUT",
                "error",
            )
        run_id, instance = getattr(context, "run_id", None), getattr(context, "instance", None)
        if run_id and instance is not None:
            instance.add_run_tags(run_id, {f"em/{k}": v for k, v in summary.items()})

    def teardown_after_execution(self, context: dg.InitResourceContext | None) -> None:
        # None: outside a run (em-platform live-qc, tests): nothing to tag
        with _quiet_heartbeats():
            if self._jobs is not None and self._cluster is not None:
                from em_platform.cluster.slurm import release

                release(self._client, self._cluster, self._jobs)  # the jobs end COMPLETED, then close
                self._record_jobs(self._jobs, context)
            if self._client is not None:
                self._client.close()
            if self._cluster is not None:
                self._cluster.close()
        self._client = self._cluster = self._jobs = None


class _HeartbeatAtShutdown(logging.Filter):
    """A worker whose heartbeat meets the scheduler closing under it logs a traceback: our shutdown, not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "during heartbeat" not in record.getMessage()


@contextmanager
def _quiet_heartbeats():
    logger = logging.getLogger("distributed.worker")
    quiet = _HeartbeatAtShutdown()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
