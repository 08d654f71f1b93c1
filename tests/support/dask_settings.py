"""What a Dask worker set itself up with, read on the worker (``client.run(worker_settings)``). Kept apart from
the test modules so a worker unpickling it imports this small module, not a test module and its imports."""

from __future__ import annotations


def worker_settings(dask_worker) -> tuple[bool, float, float]:
    """(profiler running, event-loop tick s, memory monitor s) of a worker, as it set itself up."""
    monitor = dask_worker.periodic_callbacks.get("memory_monitor")
    return (
        "profile" in dask_worker.periodic_callbacks,
        dask_worker._tick_interval,
        monitor.callback_time / 1000 if monitor is not None else -1.0,
    )
