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


DEMO_MONTAGE = "demo-montage-5x5"


def _already_ran(instance: dg.DagsterInstance, sensor_name: str, run_key: str) -> bool:
    tags = {RUN_KEY_TAG: run_key, SENSOR_NAME_TAG: sensor_name}
    return bool(instance.get_runs(filters=dg.RunsFilter(tags=tags), limit=1))


def tick_and_run(defs, instance, sensor_name: str, resources: dict, out) -> tuple[list[str], list[str]]:
    """Evaluate a sensor once and run what it requests in this process, as the daemon would.

    The runs carry the sensor's name and run key, so neither a later demo nor the daemon launches them again.
    """
    sensor = defs.resolve_sensor_def(sensor_name)
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(), definitions=defs, resources={**defs.resources, **resources}
    ) as ctx:
        tick = sensor.evaluate_tick(ctx)
    for req in tick.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    job = defs.resolve_job_def(sensor.job_name)
    ran, failed = [], []
    for req in tick.run_requests or []:
        if _already_ran(instance, sensor_name, req.run_key):
            continue
        tags = {**req.tags, RUN_KEY_TAG: req.run_key, SENSOR_NAME_TAG: sensor_name}
        print(f"{sensor.job_name}: {req.partition_key} ...", file=out, flush=True)
        result = job.execute_in_process(
            instance=instance,
            partition_key=req.partition_key,
            tags=tags,
            run_config=QUIET,
            raise_on_error=False,
        )
        (ran if result.success else failed).append(req.partition_key)
    return ran, failed


def simulate_demo_montage(settings, out) -> bool:
    """Acquire the demo montage with the embedded scope, once (5 x 5 tiles, one of them blank)."""
    from em_platform.simulation.scope import simulate_montage
    from em_platform.simulation.scope_config import ScopeConfig
    from em_platform.tem.journal import Journal

    journal = Journal(settings.catalog_url)
    try:
        if journal.montage(DEMO_MONTAGE) is not None:
            return False
        cfg = ScopeConfig(rows=5, columns=5, overlap=0.15, jitter_px=8.0, faults=("blank:12",), seed=7)
        out_dir = Path(settings.data_root) / "scope" / DEMO_MONTAGE
        simulate_montage(cfg, out_dir, journal.record, montage_id=DEMO_MONTAGE, sleep=lambda s: None)
        print(
            f"scope-sim: montage {DEMO_MONTAGE} acquired (5 x 5 tiles of 512² px, a blank tile injected)",
            file=out,
        )
        return True
    finally:
        journal.dispose()


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
    # The samples are written atomically, so the demo need not wait out the settle period.
    inbox_res = {"inbox": InboxResource(path=str(inbox), settle_seconds=0)}
    ran, failed = tick_and_run(defs, instance, "inbox_sensor", inbox_res, out)
    m_ran: list[str] = []
    m_failed: list[str] = []
    if "://" not in settings.data_root:  # the simulated scope writes tile files to the local data root
        simulate_demo_montage(settings, out)
        m_ran, m_failed = tick_and_run(defs, instance, "montage_sensor", {}, out)
    catalog_stale = bool(ran or failed or m_ran) or not instance.get_latest_materialization_event(
        dg.AssetKey(["catalog", "metadata_catalog"])
    )
    if catalog_stale:
        defs.resolve_job_def("catalog_job").execute_in_process(
            instance=instance, run_config=QUIET, raise_on_error=False
        )
    _print_summary(settings, ran, failed, out)
    if "://" not in settings.data_root:
        _print_qc(settings, m_ran, m_failed, out)
    failed += m_failed
    print("browse runs and lineage: make dev, then http://127.0.0.1:3000", file=out)
    return 1 if failed else 0


def _print_qc(settings, ran: list[str], failed: list[str], out) -> None:
    from em_platform.catalog.db import CatalogDB
    from em_platform.tem.journal import Journal

    journal = Journal(settings.catalog_url)
    catalog = CatalogDB(settings.catalog_url)
    try:
        print("", file=out)
        print(
            f"montages this time: {len(ran)} processed, {len(failed)} failed"
            + ("" if ran or failed else " (nothing new)"),
            file=out,
        )
        for m in journal.montages_after(0):
            tiles = [t for t in journal.tiles(m.montage_id) if not t.is_reference]
            judged = [t for t in tiles if t.qc_passed is not None]
            statuses = journal.qc_statuses(m.montage_id)
            status, reason = statuses[-1] if statuses else ("(not processed)", None)
            print(
                f"  montage {m.montage_id}: {len(tiles)} tiles, {sum(t.qc_passed for t in judged)}/{len(judged)} passed QC, "
                f"qc.status {status}" + (f" ({reason})" if reason else ""),
                file=out,
            )
            for t in judged:
                for f in t.qc_faults or []:
                    print(f"    tile r{t.row} c{t.column}: {f['fault_type']} ({f['scope']})", file=out)
            record = catalog.find("acquisition", m.montage_id)
            if record and record["status"] == "complete":
                core, metrics = record["metadata"]["core"], record["metadata"]["quality"]["metrics"]
                lay = metrics["layout"]
                print(
                    f"    stitched: {lay['edges']} matches, {lay['rejected_edges']} rejected, RMS residual "
                    f"{lay['rms_residual_px']} px; fused {core['volume_shape'][0]} x {core['volume_shape'][1]} px "
                    f"at {core['voxel_size_nm']['x']} nm",
                    file=out,
                )
                print(f"    uploaded: {record['files']['volume']}", file=out)
    finally:
        journal.dispose()
        catalog.dispose()


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
