"""Dask worker preload (`dask worker --preload em_platform.deploy.batch_niceness`): the deployment's workers
do the batch work (ingests, fusion, cryo) behind the live-QC service: their threads at nice 10 and, since
every service runs in a session of its own and Linux shares the CPU between sessions whatever the threads'
nice values (autogroup), their session's group at nice 19; the threads that run tasks at ``SCHED_IDLE``, so a
waking live thread takes their core (:mod:`em_platform.cluster.batch_priority`). In containers (compose)
nice values do not count between containers: there the workers' CPU weight does (cpu_shares). The batch work
is slower only while live tiles need the cores."""

from __future__ import annotations

import logging
import threading

from distributed.threadpoolexecutor import ThreadPoolExecutor

from em_platform.cluster.batch_priority import (
    BATCH_GROUP_NICENESS,
    BATCH_NICENESS,
    idle_thread,
    lower_priority,
    session_is_a_dask_worker,
)

__all__ = ["BATCH_GROUP_NICENESS", "BATCH_NICENESS", "IdleThreadPoolExecutor", "dask_setup"]

_thread = threading.local()


class IdleThreadPoolExecutor(ThreadPoolExecutor):
    """Dask's task thread pool whose threads run at ``SCHED_IDLE``: each puts itself there before its first
    task. The worker's event loop, which is not one of them, keeps its policy. The name must say
    ``ThreadPoolExecutor``: Dask's worker gives a task its worker context (``get_worker``, P2P rechunks) only
    on an executor whose type's name does."""

    # Dask's ThreadPoolExecutor.submit (fn positional-or-keyword) already differs from the standard
    # Executor.submit (fn positional-only) that the stubs give its base: no signature matches both.
    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        return super().submit(_idle_then, fn, *args, **kwargs)


def _idle_then(fn, /, *args, **kwargs):
    if not getattr(_thread, "asked", False):  # once a thread, whether or not the kernel allows it
        _thread.asked = True
        idle_thread()
    return fn(*args, **kwargs)


def dask_setup(worker) -> None:
    """Runs in the worker process before its executor threads exist: they inherit the niceness (Linux
    keeps it per thread). In a session of its own, the task pool becomes :class:`IdleThreadPoolExecutor`
    before any task is given it; a worker that shares its session (a ``LocalCluster`` in a run) keeps Dask's
    pool: there an idle task thread holding the GIL would wait behind the session's other work, and the event
    loop behind it."""
    done = lower_priority()
    if session_is_a_dask_worker() and isinstance(worker.executors.get("default"), ThreadPoolExecutor):
        worker.executors["default"].shutdown(wait=False)  # no thread started yet: nothing to wait for
        worker.executors["default"] = IdleThreadPoolExecutor(
            max_workers=worker.state.nthreads, thread_name_prefix="Dask-Default-Threads"
        )
    logging.getLogger(__name__).debug("batch worker %s: %s", getattr(worker, "address", "?"), done)
