"""``storage_consistency``: an asset check on the catalog that every complete record's objects are still in
the storage root, intact where a checksum was recorded; its own job and a daily schedule.

The logic is :mod:`em_platform.storage.consistency`'s; which records an evaluation audits,
:mod:`em_platform.catalog.storage_audits`'s (a share a day, each once a cycle). The schedule is on by default: a
store that loses data says nothing, so the check must run whether or not anyone remembered to turn it on.
Its cost is a listing and a HEAD per named object on S3 (checksums come from the listed ETags), but on a
local folder the montages' objects are read back to be hashed: a large local root can move it to a quiet
hour, lengthen the cycle, or stop it in the UI.
"""

import dagster as dg

from em_platform.assets.catalog import metadata_catalog
from em_platform.assets.presentation import check_result
from em_platform.catalog.storage_audits import CYCLE_SETTING, StorageAudits, cycle_days
from em_platform.resources import CatalogResource, StorageResource
from em_platform.storage.consistency import check_consistency

CHECK_NAME = "storage_consistency"
DAILY = "0 4 * * *"  # 04:00 UTC, after the weekly ingest re-checks (Sunday 03:00)


@dg.asset_check(
    asset=metadata_catalog,
    name=CHECK_NAME,
    description="Every 'complete' catalog record's objects exist in the storage root, and match their "
    "recorded checksums (montages: the upload manifest's MD5 of each object; ingests and simulated stacks "
    "record none of their outputs and are checked for presence only). Each evaluation audits a share of the "
    "records, every one at least once in EM_CONSISTENCY_CYCLE_DAYS (7), and every record that failed its last "
    "audit. Fails naming each record and object. "
    "Evaluated daily at 04:00 UTC (the schedule storage_consistency_daily, on by default), by `make demo`, "
    "and whenever Execute is pressed here.",
)
def storage_consistency(
    context: dg.AssetCheckExecutionContext, catalog: CatalogResource, storage: StorageResource
) -> dg.AssetCheckResult:
    audits = StorageAudits(catalog.url)
    try:
        cycle = cycle_days()
        report = check_consistency(audits.due(cycle), storage.store())
        audits.record(report.audits)
        coverage = audits.coverage()
    finally:
        audits.dispose()
    oldest = coverage["oldest_audit"]
    context.log.info(
        f"{report.summary()}; {coverage['complete_records']} complete record(s) in all, each audited once in "
        f"{cycle} day(s) ({CYCLE_SETTING})"
    )
    lost = {
        a.name: {"missing": list(a.missing), "corrupted": list(a.corrupted), "record_id": a.record_id}
        for a in report.problems
    }
    return check_result(
        passed=report.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        description=report.summary(),
        metadata={
            "records_checked": len(report.audits),
            "complete_records": coverage["complete_records"],
            "never_audited": coverage["never_audited"],
            "oldest_audit": oldest.isoformat(timespec="seconds") if oldest else "",
            "cycle_days": cycle,
            "objects_checked": sum(a.objects for a in report.audits),
            "objects_checksummed": sum(a.checksummed for a in report.audits),
            "records_with_lost_objects": len(lost),
            "lost": dg.MetadataValue.json(lost),
            "presence_only": dg.MetadataValue.json(report.presence_only[:200]),
            "outside_the_root": dg.MetadataValue.json(
                {a.name: list(a.elsewhere) for a in report.audits if a.elsewhere}
            ),
            "root": report.root,
        },
    )


storage_consistency_job = dg.define_asset_job(
    "storage_consistency_job",
    selection=dg.AssetSelection.checks(storage_consistency),
    description="Check every complete catalog record against the storage root (storage_consistency).",
)

storage_consistency_schedule = dg.ScheduleDefinition(
    name="storage_consistency_daily",
    job=storage_consistency_job,
    cron_schedule=DAILY,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily: complete catalog records against the objects they name (on by default: a store "
    "that loses data says nothing).",
)
