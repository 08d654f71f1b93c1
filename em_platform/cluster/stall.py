"""A task that failed for want of any worker: the cluster's fault (a queue that starts nothing), not the item's."""

from __future__ import annotations


def is_stalled(exc: BaseException | None) -> bool:
    """Whether a task failed because no worker was there to run it for the cluster's whole wait (Dask's
    ``no-workers-timeout``): a run stops on it rather than recording the item as failed, and a re-run resumes."""
    from distributed.scheduler import NoWorkerError

    return isinstance(exc, NoWorkerError)
