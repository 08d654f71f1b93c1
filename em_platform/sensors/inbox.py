"""``inbox_sensor``: new or changed inbox entries become partitions of ``ingest/local`` and runs.

The cursor maps entry name → fingerprint of what was last requested, so an unchanged entry is never
requested twice and a changed one is requested again (with a new run key). Entries still arriving
(modified within the settle period, or named like a partial download) wait for a later tick. An entry the
edge checks refuse (an unsafe name, a symlink out of the inbox) is never requested: it is logged in the
tick and dead-lettered once (again only if it changes); the loop is :mod:`em_platform.sensors.settle`'s.
"""

import time

import dagster as dg

from em_platform.ingest.inbox import scan_inbox
from em_platform.jobs import ingest_local_job
from em_platform.partitions import inbox_entries
from em_platform.resources import CatalogResource, InboxResource
from em_platform.sensors.settle import WatchedEntry, settle_entries
from em_platform.settings import sensor_interval_seconds

MAX_REQUESTS_PER_TICK = 500  # keeps a tick far below the sensor timeout; the rest come next tick


@dg.sensor(
    job=ingest_local_job,
    minimum_interval_seconds=sensor_interval_seconds(15),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches EM_INBOX; each settled new or changed file or folder stack is ingested once.",
)
def inbox_sensor(
    context: dg.SensorEvaluationContext, inbox: InboxResource, catalog: CatalogResource
) -> dg.SensorResult:
    now = time.time()
    tick = settle_entries(
        context.cursor,
        (
            WatchedEntry(e.key, e.fingerprint, e, refused=e.refused is not None)
            for e in scan_inbox(inbox.folder)
        ),
        settled=lambda e: e.settled(now, inbox.settle_seconds),
        limit=MAX_REQUESTS_PER_TICK,
    )
    for entry in (w.item for w in tick.refused):
        exc = entry.refused
        assert exc is not None  # the tick's refused entries are those scanned with refused set (above)
        letter = catalog.dead_letters().add(
            source="inbox", topic="ingest/local", field=exc.field, reason=str(exc), body=str(entry.path)
        )
        context.log.error(f"inbox entry {entry.key!r} not ingested, dead-lettered as #{letter}: {exc}")
    assert inbox_entries.name is not None  # partitions.py names it
    known = set(context.instance.get_dynamic_partitions(inbox_entries.name))
    new_keys = [e.key for e in tick.requested if e.key not in known]
    requests = [
        dg.RunRequest(
            partition_key=e.key,
            run_key=f"{e.key}@{e.fingerprint}",
            tags={"em/inbox_fingerprint": e.fingerprint},
        )
        for e in tick.requested
    ]
    waiting = tick.waiting
    if waiting:
        context.log.info(
            f"still arriving (modified in the last {inbox.settle_seconds:g} s): {', '.join(waiting[:20])}"
        )
    new_cursor = tick.cursor_json()
    if not requests:
        reason = (
            f"{len(waiting)} entr{'y' if len(waiting) == 1 else 'ies'} still arriving"
            if waiting
            else "nothing new in the inbox"
        )
        return dg.SensorResult(skip_reason=dg.SkipReason(reason), cursor=new_cursor)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[inbox_entries.build_add_request(new_keys)] if new_keys else [],
        cursor=new_cursor,
    )
