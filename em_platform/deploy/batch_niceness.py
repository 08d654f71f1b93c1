"""Dask worker preload (`dask worker --preload em_platform.deploy.batch_niceness`): the deployment's workers
do the batch work (ingests, fusion, cryo) at nice 10, so the kernel gives the live-QC service's threads the
cores first. With an ingest and a fusion beside two scopes on two cores, live verdicts took p95 1.8-3.6 s
with the batch worker at nice 0 and 1.3-1.4 s at nice 10 (bench_tiles_live --with-batch); the batch work
is slower only while live tiles need the cores."""

from __future__ import annotations

import os

BATCH_NICENESS = 10


def dask_setup(worker) -> None:
    """Runs in the worker process before its executor threads exist: they inherit the niceness (Linux
    keeps it per thread)."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current < BATCH_NICENESS:
        os.nice(BATCH_NICENESS - current)
