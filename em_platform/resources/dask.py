"""A Dask client for the heavy pixel work: an in-process LocalCluster by default, or an existing cluster."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import dagster as dg
from pydantic import PrivateAttr

from em_platform.quiet_dask import quiet_dask


class DaskResource(dg.ConfigurableResource):
    """Created lazily on first use, so runs that do no pixel work start no cluster; an in-process one with
    :mod:`em_platform.quiet_dask`'s settings."""

    scheduler_address: str | None = None
    n_workers: int = 1
    threads_per_worker: int = 0  # 0: one thread per core
    processes: bool = False  # threads: numpy, zarr codecs and blosc release the GIL; no pickling of blocks
    _client: object | None = PrivateAttr(default=None)
    _cluster: object | None = PrivateAttr(default=None)

    def get_client(self):
        from distributed import Client, LocalCluster

        if self._client is None:
            if self.scheduler_address:
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

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        with _quiet_heartbeats():
            if self._client is not None:
                self._client.close()
            if self._cluster is not None:
                self._cluster.close()
        self._client = self._cluster = None


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
