"""What a user waits for on the filled stores: the UI's pages, each sensor's tick, the catalog's queries,
and what the stores and the servers hold.

Pages: the real webserver (the guarded one every topology serves, with its code server) on the harness's
instance; each page's GraphQL captured in Chromium and replayed (:mod:`bench.scale.ui_queries`), the figure
a page's slowest query. Sensor ticks: each sensor evaluated as the daemon evaluates it (``evaluate_tick``
on the code location's definitions, with the instance), the montage sensor one montage behind the
journal's high-water mark so that it finds one and asks whether its partition exists. Queries: the
catalog's and the journal's own methods (TEMdb's QC queries, a record, every record as the catalog asset
reads them). Each figure the median of ``repeats``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import dagster as dg
import psutil

from bench.scale.fill import montage_key
from bench.scale.stores import REPO, ScaleStores
from bench.scale.ui_queries import UI_PAGES, capture, measure_queries

PAGE_TIMEOUT_S = 900  # a page that takes longer is a figure to report, not a reason to stop
SENSORS = ("montage_sensor", "inbox_sensor", "cryo_sensor", "simulation_sensor")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 4)


def sensor_ticks(defs: dg.Definitions, instance: dg.DagsterInstance, repeats: int) -> dict[str, float]:
    out = {}
    for name in SENSORS:
        sensor = defs.resolve_sensor_def(name)
        cursor = None
        if name == "montage_sensor":
            cursor = str(_newest_montage_seq(defs.resources["hardware"].journal()) - 1)

        def tick(sensor=sensor, cursor=cursor):
            with (
                dg.partition_loading_context(dynamic_partitions_store=instance),  # as the code server has it
                dg.build_sensor_context(
                    instance=instance, cursor=cursor, definitions=defs, resources=dict(defs.resources)
                ) as ctx,
            ):
                sensor.evaluate_tick(ctx)

        out[f"tick.{name}"] = median_seconds(tick, repeats)
    fresh = iter(
        f"scale-new-{i}" for i in range(repeats)
    )  # what the daemon applies after a tick found a montage
    out["tick.add_partition"] = median_seconds(
        lambda: instance.add_dynamic_partitions("montages", [next(fresh)]), repeats
    )
    for key in (f"scale-new-{i}" for i in range(repeats)):
        instance.delete_dynamic_partition("montages", key)
    return out


def _newest_montage_seq(journal) -> int:
    """The journal position of the newest montage (the fill numbers montages as a scope's journal would, the
    newest highest): one behind it, the montage sensor finds exactly one, as when a scope starts a montage."""
    import sqlalchemy as sa

    from em_platform.tem.journal import montages

    with journal.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.max(montages.c.seq))).scalar_one())


def storage_check(
    catalog_url: str, data_root: Path, template_id: str, repeats: int
) -> tuple[dict[str, float], int]:
    """storage_consistency's day: (choosing the records due, the part that grows with the catalog, and
    auditing one montage, the template's objects read back and hashed on the local data root; the records
    due)."""
    from em_platform.catalog.db import CatalogDB
    from em_platform.catalog.storage_audits import StorageAudits, cycle_days
    from em_platform.storage import DataStore
    from em_platform.storage.consistency import check_consistency

    audits, db = StorageAudits(catalog_url), CatalogDB(catalog_url, create=False)
    try:
        record, store = db.find("acquisition", template_id), DataStore(str(data_root))
        first = check_consistency([record], store)
        if not first.ok or not first.audits[0].checksummed:  # else it would time the failure's short cut
            raise RuntimeError(f"the template montage's audit: {first.summary()}")
        due: list = []
        out = {"run.storage_audit_due": median_seconds(lambda: due.append(audits.due(cycle_days())), repeats)}
        out["run.storage_audit_template_montage"] = median_seconds(
            lambda: check_consistency([record], store), repeats
        )
        return out, len(due[-1])
    finally:
        audits.dispose()
        db.dispose()


def catalog_queries(catalog_url: str, repeats: int) -> dict[str, float]:
    from em_platform.catalog.db import CatalogDB
    from em_platform.tem.journal import Journal
    from em_platform.tem.tile_records import TileRecords

    key = montage_key(0)  # the newest montage: it has tile records and journal rows at every point
    tiles, db, journal = (
        TileRecords(catalog_url, create=False),
        CatalogDB(catalog_url, create=False),
        Journal(catalog_url, create=False),
    )
    try:
        return {
            "query.montage_tiles": median_seconds(lambda: tiles.montage_tiles(key), repeats),
            "query.focus_stats": median_seconds(lambda: tiles.focus_stats(montage_id=key), repeats),
            "query.bad_focus_tiles": median_seconds(
                lambda: tiles.bad_focus_tiles(0.5, montage_id=key), repeats
            ),
            "query.record": median_seconds(lambda: db.find("acquisition", key), repeats),
            # what a montage run reads of its tiles at its layout (no user waits on it: no limit)
            "run.journal_tiles": median_seconds(lambda: journal.tiles(key), repeats),
            # every record, as the catalog asset's run and storage_consistency read them (no user waits on it)
            "run.all_records": median_seconds(lambda: db.records(), max(1, repeats // 3)),
        }
    finally:
        for store in (tiles, db, journal):
            store.dispose()


def ui_pages(
    url: str, instance: dg.DagsterInstance, repeats: int
) -> tuple[dict[str, float], dict[str, int], dict]:
    """(each page's slowest query, seconds; its bytes; every query's figures) through the webserver."""
    key = montage_key(0)
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": key}), limit=1)
    pages = UI_PAGES("montage", key, runs[0].run_id)
    timings = measure_queries(
        url, capture(url, pages, timeout_s=PAGE_TIMEOUT_S), repeats=repeats, timeout_s=PAGE_TIMEOUT_S
    )
    seconds, sizes, detail = {}, {}, {}
    for page, ops in timings.items():
        slowest = max(ops.values(), key=lambda q: q.median_seconds)
        seconds[f"page.{page}"] = round(slowest.median_seconds, 4)
        sizes[f"page.{page}"] = sum(q.response_bytes for q in ops.values())
        detail[page] = {
            op: {"s": round(q.median_seconds, 4), "bytes": q.response_bytes} for op, q in ops.items()
        }
    return seconds, sizes, detail


def memory_mb(process: psutil.Process, children: bool = True) -> float:
    """The process's resident memory, with its children's unless ``children`` is False (the webserver's
    children are its code server)."""
    total = process.memory_info().rss
    for child in process.children(recursive=True) if children else ():
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 2**20, 1)


def store_bytes(stores: ScaleStores) -> dict[str, int]:
    out = {}
    for label, db in (("dagster", stores.dagster_db), ("catalog", stores.catalog_db)):
        for table, size in stores.table_bytes(db).items():
            out[f"{label}.{table}"] = size
    return out


def per(mapping: Mapping[str, int], n: int) -> dict[str, float]:
    return {k: round(v / n, 1) for k, v in mapping.items() if n}


def backfill(
    home: Path, env: Mapping[str, str], keys: list[str], dagster_job: bool = True
) -> dict[str, float]:
    """Seconds each CLI takes to launch montage_job over ``keys``: ``em-platform backfill`` (one asset backfill
    for the daemon) and, with ``dagster_job``, ``dagster job backfill`` (which creates and queues every run
    itself, 1-2 minutes), as the docs show them; each backfill is then cancelled and its runs deleted, so the
    next measurements see the store as it was."""
    from dagster._core.execution.backfill import BulkActionStatus
    from dagster._core.storage.tags import BACKFILL_ID_TAG

    bin_dir = Path(sys.executable).parent
    commands = {
        "em_platform": [str(bin_dir / "em-platform"), "backfill", "montage_job", "--partitions", ",".join(keys)],
        "dagster_job": [str(bin_dir / "dagster"), "job", "backfill", "-w", str(REPO / "workspace.yaml"), "-j",
                        "montage_job", "--partitions", ",".join(keys), "--noprompt"],
    }  # fmt: skip
    if not dagster_job:
        del commands["dagster_job"]
    out = {}
    for name, cmd in commands.items():
        t = time.perf_counter()
        done = subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, **env, "DAGSTER_HOME": str(home)},
            capture_output=True,
            text=True,
        )
        out[f"backfill.{name}_{len(keys)}_partitions"] = round(time.perf_counter() - t, 2)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd[:3])} failed ({done.returncode}): {done.stderr[-2000:]}")
        instance = dg.DagsterInstance.from_config(str(home))
        try:
            for backfill in instance.get_backfills():
                instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELED))
                for run in instance.get_runs(
                    filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill.backfill_id})
                ):
                    instance.delete_run(run.run_id)
        finally:
            instance.dispose()
    return out
