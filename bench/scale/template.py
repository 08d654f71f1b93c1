"""One real montage through the platform on the harness's stores: what every replicated montage copies.

The simulated scope acquires a small montage into the journal (the listener's write path, ``Journal.record``);
the montage job runs on the deployment's instance (PostgreSQL) as the sensor would launch it, writing its
tiles' results into the journal, its tile records (``TileRecords.replace_montage``) and its catalog record, and
uploading to the data root; the catalog job runs once. What the run left, its events, its rows, its objects,
is the template a montage of a year is filled from (:mod:`bench.scale.fill`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from dagster._core.events.log import EventLogEntry

from bench.scale.stores import ScaleStores
from em_platform.retention.files import tree_bytes

TEMPLATE_MONTAGE = "scaletmpl-0000000"  # unique in every serialized event, so a copy can be renamed by text


@dataclass
class Template:
    montage_id: str
    run: dg.DagsterRun
    events: list[EventLogEntry]
    tiles: int  # the montage's tiles (the journal's and the catalog's rows are per tile)
    object_bytes: int  # what the upload put in the data root for it
    seconds: float  # the montage job's run, start to end


def run_template(stores: ScaleStores, work: Path, *, rows: int = 4, columns: int = 5) -> Template:
    """Acquire and process one ``rows`` x ``columns`` montage on the stores; raise if its run failed."""
    from em_platform.simulation.scope import simulate_montage
    from em_platform.simulation.scope_config import ScopeConfig
    from em_platform.tem.journal import Journal
    from tests.support.platform import make_platform

    home = stores.dagster_home(work / "dagster_home")
    os.environ["DAGSTER_HOME"] = str(home)
    platform = make_platform(work, catalog_url=stores.catalog_url)
    journal = Journal(stores.catalog_url)
    simulate_montage(
        ScopeConfig(rows=rows, columns=columns, overlap=0.12, jitter_px=8.0),
        work / "tiles" / TEMPLATE_MONTAGE,
        journal.record,
        montage_id=TEMPLATE_MONTAGE,
        sleep=lambda s: None,
    )
    journal.dispose()
    instance = dg.DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions("montages", [TEMPLATE_MONTAGE])
    result = platform.defs.resolve_job_def("montage_job").execute_in_process(
        instance=instance,
        partition_key=TEMPLATE_MONTAGE,
        raise_on_error=False,
        run_config={"ops": {"montage_tiles": {"config": {"poll_seconds": 0.05}}}},
    )
    if not result.success:
        errors = [str(e.step_failure_data.error) for e in result.get_step_failure_events()]
        raise RuntimeError(f"the template montage's run failed: {errors}")
    catalog = platform.defs.resolve_job_def("catalog_job").execute_in_process(instance=instance)
    if not catalog.success:
        raise RuntimeError("the catalog job failed on the template montage")
    run = instance.get_run_by_id(result.run_id)
    record = instance.get_run_record_by_id(result.run_id)
    events = instance.all_logs(result.run_id)
    engine = sa.create_engine(stores.catalog_url)
    with engine.connect() as conn:
        tiles = conn.execute(
            sa.text("SELECT count(*) FROM tem_tiles WHERE montage_id = :m"), {"m": TEMPLATE_MONTAGE}
        ).scalar_one()
    engine.dispose()
    instance.dispose()
    return Template(
        montage_id=TEMPLATE_MONTAGE,
        run=run,
        events=events,
        tiles=int(tiles),
        object_bytes=tree_bytes(Path(platform.settings.data_root)),
        seconds=round(record.end_time - record.start_time, 2),
    )
