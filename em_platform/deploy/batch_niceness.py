"""Dask worker preload (`dask worker --preload em_platform.deploy.batch_niceness`): the deployment's workers
do the batch work (ingests, fusion, cryo) behind the live-QC service: their threads at nice 10 and, since
every service runs in a session of its own and Linux shares the CPU between sessions whatever the threads'
nice values (autogroup), their session's group at nice 19 (:mod:`em_platform.cluster.batch_priority`). In
containers (compose) neither counts between containers: there the workers' CPU weight does (cpu_shares). The
batch work is slower only while live tiles need the cores."""

from __future__ import annotations

import logging

from em_platform.cluster.batch_priority import BATCH_GROUP_NICENESS, BATCH_NICENESS, lower_priority

__all__ = ["BATCH_GROUP_NICENESS", "BATCH_NICENESS", "dask_setup"]


def dask_setup(worker) -> None:
    """Runs in the worker process before its executor threads exist: they inherit the niceness (Linux
    keeps it per thread)."""
    done = lower_priority()
    logging.getLogger(__name__).debug("batch worker %s: %s", getattr(worker, "address", "?"), done)
