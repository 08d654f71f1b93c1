"""A storage outage is a retried failure, not a stuck record: the step asks Dagster to run it again later.

The run's own retry policy (``run_retries``, ``retry_on_asset_or_op_failure: false``) does not re-run a
failed asset, on purpose: a bad file fails the same way again. An unreachable storage root is different;
the step is retried in the same run after a growing wait (its pool slot is free meanwhile), and the
catalog record says ``failed`` with the outage until the retry takes it back to processing.
"""

import dagster as dg

from em_platform.resources import StorageResource
from em_platform.storage.outage import storage_outage

MAX_WAIT_SECONDS = 600.0


def retry_on_storage_outage(
    context: dg.AssetExecutionContext, exc: Exception, storage: StorageResource
) -> None:
    """Raise :class:`dagster.RetryRequested` when ``exc`` is a storage outage (its ``outage`` attribute, or a
    root that does not answer now); return when it is not one, or when the retries are used up."""
    outage = getattr(exc, "outage", None) or storage_outage(exc, storage.store())
    attempt = context.retry_number
    if outage is None or attempt >= storage.outage_retries:
        return
    wait = min(storage.outage_retry_seconds * 2**attempt, MAX_WAIT_SECONDS)
    context.log.warning(
        f"storage outage: {outage}; retry {attempt + 1} of {storage.outage_retries} in {wait:g} s"
    )
    raise dg.RetryRequested(max_retries=storage.outage_retries, seconds_to_wait=wait) from exc
