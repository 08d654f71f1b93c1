"""An outage is a retried failure, not a stuck record: the step asks Dagster to run it again later.

Two outages pass by themselves: the storage root not answering, and the catalog database restarting or
unreachable (PostgreSQL restarted under a running ingest failed the dataset before; found on the compose
containers).

The run's own retry policy (``run_retries``, ``retry_on_asset_or_op_failure: false``) does not re-run a
failed asset, on purpose: a bad file fails the same way again. An unreachable storage root is different;
the step is retried in the same run after a growing wait (its pool slot is free meanwhile), and the
catalog record says ``failed`` with the outage until the retry takes it back to processing.

A full filesystem is neither: the step fails at once with a sentence naming the mount and the setting that
places the data there (:func:`em_platform.storage.disk_full.disk_full`); the re-run after the operator
frees space resumes.
"""

import dagster as dg

from em_platform.resources import StorageResource
from em_platform.sql import database_outage
from em_platform.storage.disk_full import disk_full
from em_platform.storage.outage import storage_outage

MAX_WAIT_SECONDS = 600.0


def retry_on_outage(context: dg.AssetExecutionContext, exc: Exception, storage: StorageResource) -> None:
    """Raise :class:`dagster.RetryRequested` when ``exc`` is a storage outage (its ``outage`` attribute, or a
    root that does not answer now) or a database outage, :class:`dagster.Failure` naming the filesystem when
    a disk is full; return when it is none of these, or when the retries are used up."""
    if full := disk_full(exc, storage_folders(storage)):
        context.log.error(full)
        raise dg.Failure(description=full) from exc
    outage = getattr(exc, "outage", None) or storage_outage(exc, storage.store())
    what = "storage outage"
    if outage is None and (outage := database_outage(exc)):
        what = "catalog database outage"
    attempt = context.retry_number
    if outage is None or attempt >= storage.outage_retries:
        return
    wait = min(storage.outage_retry_seconds * 2**attempt, MAX_WAIT_SECONDS)
    context.log.warning(f"{what}: {outage}; retry {attempt + 1} of {storage.outage_retries} in {wait:g} s")
    raise dg.RetryRequested(max_retries=storage.outage_retries, seconds_to_wait=wait) from exc


def storage_folders(storage: StorageResource) -> dict[str, str]:
    """The folders a step may write to, by the setting that places them."""
    return {
        "EM_DATA_ROOT": storage.root_url,
        "EM_BUFFER": storage.buffer_root,
        "EM_DOWNLOADS": storage.downloads_root,
    }
