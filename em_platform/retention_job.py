"""``retention_job`` and its daily schedule: the retention policy (:mod:`em_platform.retention.policy`) applied.

Each day it lets go of, in order (each step idempotent, so a run killed midway is finished by the next):

1. archived montages past ``EM_RETAIN_JOURNAL_DAYS``: their journal rows (:meth:`Journal.retire`), their
   finished runs (:func:`montage_runs`) and their partition of ``montages`` (which the UI's pages list, and
   whose runs' materializations Dagster's staleness reads in full on every partition page: both would
   otherwise grow by every montage of a year); the catalog's record, status history and tile records answer
   for the montage afterwards; a montage the catalog does not hold ``complete`` is never touched;
2. the journal's messages and QC statuses that name no montage, past the same window;
3. dead letters decided past ``EM_RETAIN_DEAD_LETTERS_DAYS``;
4. montage folders of the acquisition buffer past ``EM_RETAIN_BUFFER_DAYS`` (:mod:`em_platform.retention.buffer`);
5. finished tilt series' intermediates past ``EM_RETAIN_CRYO_INTERMEDIATES_DAYS`` (:mod:`em_platform.retention.cryo`);
6. finished runs past ``EM_RETAIN_RUNS_DAYS`` that hold nothing still shown: a run of a partition that still
   exists, and the run of each unpartitioned asset's latest materialization, are kept (:func:`runs_to_let_go`);
   each goes with its event log and its asset check executions (:mod:`em_platform.retention.dagster_runs`);
7. archived montages' tile records past ``EM_RETAIN_TILE_RECORDS_DAYS`` (default ``forever``: never).

Steps 4 and 5 never touch a montage or tilt series with a run queued, running or ended within their window
(:func:`partitions_with_runs`); they come before step 6, which may delete such a run.

What it let go of is in the run's log and its output's metadata.
"""

import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import dagster as dg
from dagster._core.storage.dagster_run import FINISHED_STATUSES, NOT_FINISHED_STATUSES, RunsFilter

from em_platform.cryo.results_db import CryoResults
from em_platform.jobs import montage_job
from em_platform.partitions import montages
from em_platform.resources import CatalogResource, StorageResource
from em_platform.resources.acquisition import AcquisitionHardware
from em_platform.retention.buffer import apply_buffer_policy
from em_platform.retention.cryo import apply_cryo_policy
from em_platform.retention.dagster_runs import delete_runs
from em_platform.retention.policy import RetentionPolicy
from em_platform.tem.archive import SOURCE as MONTAGE_SOURCE

DAILY = "30 4 * * *"  # 04:30 UTC: after the storage consistency check (04:00), before the working day
PARTITION_TAG = "dagster/partition"


def runs_to_let_go(
    instance: dg.DagsterInstance, before: datetime, kept_partitions: set[str], kept_runs: set[str]
) -> Iterator[str]:
    """Finished runs that ended (last changed) before ``before``, oldest first, but those whose partition is in
    ``kept_partitions`` and those in ``kept_runs``."""
    cursor = None
    while True:
        records = instance.get_run_records(
            filters=RunsFilter(statuses=list(FINISHED_STATUSES), updated_before=before),
            limit=500,
            cursor=cursor,
            ascending=True,
        )
        if not records:
            return
        for r in records:
            run = r.dagster_run
            if run.run_id in kept_runs or run.tags.get(PARTITION_TAG) in kept_partitions:
                continue
            yield run.run_id
        cursor = records[-1].dagster_run.run_id


def montage_runs(
    instance: dg.DagsterInstance, keys: Sequence[str], assets: Sequence[dg.AssetsDefinition]
) -> Iterator[str]:
    """The finished runs of the montages ``keys``: runs of ``montage_job``, or of montage assets alone, tagged
    with one of the keys."""
    montage_assets = {k for a in assets if a.partitions_def == montages for k in a.keys}
    for i in range(0, len(keys), 500):
        chunk = list(keys[i : i + 500])
        cursor = None
        while records := instance.get_run_records(
            filters=RunsFilter(tags={PARTITION_TAG: chunk}, statuses=list(FINISHED_STATUSES)),
            limit=500,
            cursor=cursor,
        ):
            for r in records:
                run = r.dagster_run
                selection = run.asset_selection or set()
                if run.job_name == montage_job.name or (selection and selection <= montage_assets):
                    yield run.run_id
            cursor = records[-1].dagster_run.run_id


def partitions_with_runs(instance: dg.DagsterInstance, since: datetime) -> set[str]:
    """Partition keys (of any job) of the runs queued or running, or that last changed after ``since``: what
    a run may still be writing, or an operator is working on."""
    keys: set[str] = set()
    for filters in (RunsFilter(statuses=NOT_FINISHED_STATUSES), RunsFilter(updated_after=since)):
        cursor = None
        while records := instance.get_run_records(filters=filters, limit=500, cursor=cursor):
            keys.update(
                r.dagster_run.tags[PARTITION_TAG] for r in records if PARTITION_TAG in r.dagster_run.tags
            )
            cursor = records[-1].dagster_run.run_id
    return keys


def _shown(instance: dg.DagsterInstance, assets: Sequence[dg.AssetsDefinition]) -> tuple[set[str], set[str]]:
    """(every partition key of ``assets`` that still exists, the runs of the unpartitioned ones' latest
    materializations)."""
    partitions: set[str] = set()
    runs: set[str] = set()
    for asset in assets:
        for key in asset.keys:
            if asset.partitions_def is not None:
                partitions.update(asset.partitions_def.get_partition_keys(dynamic_partitions_store=instance))
                continue
            latest = instance.get_latest_materialization_event(key)
            if latest is not None and latest.run_id:
                runs.add(latest.run_id)
    return partitions, runs


def build_retention(assets: Sequence[dg.AssetsDefinition]) -> tuple[dg.JobDefinition, dg.ScheduleDefinition]:
    """The job and its daily schedule, for the code location whose ``assets`` decide what is still shown."""

    @dg.op(
        description="Let go of what the retention policy (EM_RETAIN_*) no longer keeps: archived montages' "
        "journal rows and partitions, decided dead letters, finished runs that hold nothing still shown, "
        "left-over montage folders of the buffer, finished tilt series' intermediates (docs/retention.md)."
    )
    def apply_retention(
        context: dg.OpExecutionContext,
        hardware: AcquisitionHardware,
        catalog: CatalogResource,
        storage: StorageResource,
    ) -> dg.Output[dict]:
        policy = RetentionPolicy.from_env()
        done = apply(context, policy, hardware, catalog, assets, datetime.now(UTC), storage)
        context.log.info(f"retention applied ({policy}): {done}")
        return dg.Output(done, metadata={k: dg.MetadataValue.int(v) for k, v in done.items()})

    @dg.job(
        name="retention_job",
        description="The retention policy applied (EM_RETAIN_*: docs/retention.md): nothing the platform "
        "keeps grows without a bound.",
        tags={"em/workload": "maintenance"},
    )
    def retention_job():
        apply_retention()

    schedule = dg.ScheduleDefinition(
        name="retention_daily",
        job=retention_job,
        cron_schedule=DAILY,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Daily: what the retention policy no longer keeps is let go (on by default: a year of "
        "montages would otherwise slow every page).",
    )
    return retention_job, schedule


def apply(
    context: dg.OpExecutionContext,
    policy: RetentionPolicy,
    hardware: AcquisitionHardware,
    catalog: CatalogResource,
    assets: Sequence[dg.AssetsDefinition],
    now: datetime,
    storage: StorageResource,
) -> dict[str, int]:
    """The steps of the module's docstring; what each let go of."""
    instance = context.instance
    done: dict[str, int] = {}
    journal_cutoff = policy.cutoff(policy.journal_days, now)
    if journal_cutoff is not None:
        journal = hardware.journal()
        archived = catalog.db().complete_before(MONTAGE_SOURCE, journal_cutoff, journal.unretired())
        # runs and partition first, journal last: a job killed between them finds the montage again tomorrow
        # (the journal's unretired montages are what it looks at)
        montage_runs_gone = delete_runs(instance, list(montage_runs(instance, archived, assets)))
        assert montages.name is not None  # partitions.py names it
        for key in set(archived) & set(instance.get_dynamic_partitions(montages.name)):
            instance.delete_dynamic_partition(montages.name, key)
        retired = journal.retire(archived)
        unattached = journal.forget_unattached(journal_cutoff)
        done |= {
            "montages_retired": len(archived),
            "montage_runs": montage_runs_gone,
            "journal_messages": retired["messages"] + unattached["messages"],
            "journal_tiles": retired["tiles"],
        }
    letters_cutoff = policy.cutoff(policy.dead_letters_days, now)
    if letters_cutoff is not None:
        done["dead_letters"] = catalog.dead_letters().forget_decided(letters_cutoff)
    done |= _files(context, instance, policy, hardware, catalog, storage, now)
    runs_cutoff = policy.cutoff(policy.runs_days, now)
    if runs_cutoff is not None:
        partitions, runs = _shown(instance, assets)
        runs.add(context.run_id)
        done["runs"] = delete_runs(instance, list(runs_to_let_go(instance, runs_cutoff, partitions, runs)))
    tiles_cutoff = policy.cutoff(policy.tile_records_days, now)
    if tiles_cutoff is not None:
        archived = catalog.db().complete_ids_before(MONTAGE_SOURCE, tiles_cutoff)
        done["tile_records"] = catalog.tile_records().forget_montages(archived)
    return done


def _files(
    context: dg.OpExecutionContext,
    instance: dg.DagsterInstance,
    policy: RetentionPolicy,
    hardware: AcquisitionHardware,
    catalog: CatalogResource,
    storage: StorageResource,
    now: datetime,
) -> dict[str, int]:
    """Steps 4 and 5: the buffer's montage folders and the tilt series' intermediates."""
    done: dict[str, int] = {}
    cryo_root = storage.cryo_root()
    buffer_cutoff = policy.cutoff(policy.buffer_days, now)
    if buffer_cutoff is not None:
        store = storage.store()
        in_buffer = os.path.realpath(cryo_root.parent) == os.path.realpath(storage.buffer_root)
        buffer = apply_buffer_policy(
            storage.buffer_root,
            journal=hardware.journal(),
            catalog=catalog.db(),
            before=buffer_cutoff,
            busy=partitions_with_runs(instance, buffer_cutoff),
            archive_url=lambda montage_id: store.url(MONTAGE_SOURCE, montage_id),
            storage_options=store.storage_options or None,
            reserved={cryo_root.name} if in_buffer else (),  # the cryo work root (object-storage data root)
            now=now,
        )
        for warning in buffer.warnings:
            context.log.warning(warning)
        done |= {"buffer_montages": len(buffer.removed), "buffer_bytes": buffer.freed_bytes}
    cryo_cutoff = policy.cutoff(policy.cryo_intermediates_days, now)
    if cryo_cutoff is not None:
        results = CryoResults(catalog.url)
        try:
            cryo = apply_cryo_policy(
                cryo_root,
                results=results,
                before=cryo_cutoff,
                busy=partitions_with_runs(instance, cryo_cutoff),
            )
        finally:
            results.dispose()
        for refused in cryo.refused:
            context.log.warning(refused)
        done |= {"cryo_series": len(cryo.series), "cryo_bytes": cryo.freed_bytes}
    return done
