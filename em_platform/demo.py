"""`em-platform demo`: the platform's main job end to end on the embedded defaults.

Writes sample volumes into the inbox, ticks the inbox sensor once, runs what it requests through
Dagster on the instance in $DAGSTER_HOME (so the runs show in the UI of `make dev`), refreshes the
catalog, and prints the summary. Runs carry the sensor's run keys, so a second demo (or the daemon
later) launches nothing for entries already ingested.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG

from em_platform.resources import InboxResource
from em_platform.samples import write_samples
from em_platform.settings import load_settings

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the full log is in the run's page


def _already_ran(instance: dg.DagsterInstance, run_key: str) -> bool:
    return bool(
        instance.get_runs(
            filters=dg.RunsFilter(tags={RUN_KEY_TAG: run_key, SENSOR_NAME_TAG: "inbox_sensor"}), limit=1
        )
    )


def run_demo(out=sys.stdout) -> int:
    from em_platform.definitions import defs

    settings = load_settings()
    inbox = Path(settings.inbox)
    new = write_samples(inbox)
    print(
        f"inbox {inbox}: {len(new)} new sample(s) written"
        + (f" ({', '.join(p.name for p in new)})" if new else ""),
        file=out,
    )

    instance = dg.DagsterInstance.get()
    sensor = defs.resolve_sensor_def("inbox_sensor")
    # The samples are written atomically, so the demo need not wait out the settle period.
    ctx = dg.build_sensor_context(
        instance_ref=instance.get_ref(),
        definitions=defs,
        resources={"inbox": InboxResource(path=str(inbox), settle_seconds=0)},
    )
    tick = sensor.evaluate_tick(ctx)
    for req in tick.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    job = defs.resolve_job_def("ingest_local_job")
    ran, failed = [], []
    for req in tick.run_requests or []:
        if _already_ran(instance, req.run_key):
            continue
        tags = {**req.tags, RUN_KEY_TAG: req.run_key, SENSOR_NAME_TAG: "inbox_sensor"}
        print(f"ingesting {req.partition_key} ...", file=out, flush=True)
        result = job.execute_in_process(
            instance=instance,
            partition_key=req.partition_key,
            tags=tags,
            run_config=QUIET,
            raise_on_error=False,
        )
        (ran if result.success else failed).append(req.partition_key)
    catalog_stale = bool(ran or failed) or not instance.get_latest_materialization_event(
        dg.AssetKey(["catalog", "metadata_catalog"])
    )
    if catalog_stale:
        defs.resolve_job_def("catalog_job").execute_in_process(instance=instance, run_config=QUIET, raise_on_error=False)
    _print_summary(settings, ran, failed, out)
    return 1 if failed else 0


def _print_summary(settings, ran: list[str], failed: list[str], out) -> None:
    from em_platform.catalog.db import CatalogDB

    db = CatalogDB(settings.catalog_url)
    records = db.records()
    db.dispose()
    print("", file=out)
    print(
        f"runs this time: {len(ran)} ingested, {len(failed)} failed"
        + ("" if ran or failed else " (nothing new)"),
        file=out,
    )
    print(f"catalog {settings.catalog_url}: {len(records)} record(s)", file=out)
    header = f"  {'source_id':<24} {'status':<9} {'shape':<16} {'dtype':<8} {'voxel nm (z,y,x)':<20} output"
    print(header, file=out)
    for r in records:
        core = r["metadata"]["core"]
        vox = core.get("voxel_size_nm", {})
        vox_s = ",".join(f"{vox[a]:g}" for a in ("z", "y", "x") if a in vox)
        if core.get("voxel_size_source") == "assumed":
            vox_s += " (assumed)"
        shape = "x".join(map(str, core.get("volume_shape", []))) or "-"
        target = r.get("files", {}).get("volume") or r.get("error", {}).get("message", "")
        print(
            f"  {r['source_id']:<24} {r['status']:<9} {shape:<16} {core.get('data_type', '-'):<8} {vox_s:<20} {target}",
            file=out,
        )
    exports = (
        sorted(Path(settings.data_root, "catalog").glob("metadata_catalog_*.json"))
        if "://" not in settings.data_root
        else []
    )
    if exports:
        print(f"catalog export: {exports[-1]}", file=out)
    print("browse runs and lineage: make dev, then http://127.0.0.1:3000", file=out)
