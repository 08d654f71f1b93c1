"""Deleting a finished run with everything Dagster keeps of it.

``DagsterInstance.delete_run`` deletes the run, its event log and its materializations' tags, but not its
asset check executions (Dagster 1.13's ``SqlEventLogStorage.delete_events_for_run``): a montage run leaves ten
rows of them, which would grow with every montage of every year (``make bench-scale`` measures their bytes).
Dagster has no public call for them, so they are deleted here through the event log storage's own table and
connection, before the run, so that a job killed between the two leaves nothing for ever: the next day's run
finds the run again and deletes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

BATCH = 500


def delete_runs(instance: dg.DagsterInstance, run_ids: Sequence[str]) -> int:
    """Delete each run, its check executions first; returns the runs deleted."""
    for i in range(0, len(run_ids), BATCH):
        chunk = list(run_ids[i : i + BATCH])
        forget_check_executions(instance, chunk)
        for run_id in chunk:
            instance.delete_run(run_id)
    return len(run_ids)


def forget_check_executions(instance: dg.DagsterInstance, run_ids: list[str]) -> int:
    """The asset check executions the runs ``run_ids`` recorded; returns the rows deleted (0 on a storage that is
    not SQL: there ``delete_run`` is all there is)."""
    from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable
    from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

    storage = instance.event_log_storage
    if not isinstance(storage, SqlEventLogStorage) or not run_ids:
        return 0
    with storage.index_connection() as conn:
        return conn.execute(
            AssetCheckExecutionsTable.delete().where(AssetCheckExecutionsTable.c.run_id.in_(run_ids))
        ).rowcount
