"""Fill the stores as N montages of acquisition leave them, copying the template montage (bench.scale.template).

Dagster's instance, through its storage APIs: each montage a key of the ``montages`` dynamic partitions
(``add_dynamic_partitions``, as the sensor's request is applied); the first ``real_runs`` montages a run of
``montage_job`` (``add_run``) with the template run's every event (``store_event_batch``, run status through
``handle_run_event``, as the instance does for a run's own events), renamed to the montage and a new run id;
the others the same materializations and check evaluations as runless events (what
``report_runless_asset_event`` stores). Montage i ended ``i / per_day`` days ago: montage 0 is the newest, so
a store grown from 10³ to 10⁴ montages gains older ones, and the newest keep their runs and journal rows.

The catalog and the journal, in SQL on the server (``INSERT … SELECT`` from the template's rows, which the
platform's own writers wrote: ``Journal.record`` and the run's tile results, ``TileRecords.replace_montage``,
``CatalogDB``): each montage's catalog record and status history; ``tiles_per_montage`` tile records for the
montages within ``tile_rows`` (the template's rows repeated, renamed, raster positions renumbered; its
reference frames and montage-level messages once); a journal
montage row for each, and the journal's messages and tiles for the newest ``journal_montages`` (what the
retention window keeps; older ones are what ``Journal.retire`` leaves). Writing 10⁸ rows through
SQLAlchemy's per-row inserts would take hours; the server copies a million rows in seconds.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dagster as dg
import sqlalchemy as sa
from dagster._core.events import DagsterEventType
from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID
from dagster._serdes import deserialize_value, serialize_value

from bench.scale.template import Template

RUN_EVENTS = {
    DagsterEventType.PIPELINE_START.value,
    DagsterEventType.PIPELINE_SUCCESS.value,
    DagsterEventType.PIPELINE_FAILURE.value,
    DagsterEventType.PIPELINE_STARTING.value,
    DagsterEventType.PIPELINE_ENQUEUED.value,
}
ASSET_EVENTS = {DagsterEventType.ASSET_MATERIALIZATION.value, DagsterEventType.ASSET_CHECK_EVALUATION.value}
BATCHED = {  # what the event log storage takes in one batch; every other event is stored on its own
    DagsterEventType.ASSET_MATERIALIZATION.value,
    DagsterEventType.ASSET_MATERIALIZATION_PLANNED.value,
    DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED.value,
    DagsterEventType.ASSET_OBSERVATION.value,
    DagsterEventType.ASSET_FAILED_TO_MATERIALIZE.value,
}


def montage_key(i: int) -> str:
    return f"scale-{i:07d}"


@dataclass(frozen=True)
class FillPlan:
    per_day: float = 100.0  # two scopes at TilEM's rate: some 100 montages of 5,000 tiles a day
    real_runs: int = 10_000
    tiles_per_montage: int = 5_000
    tile_rows: int = 10_000_000  # the catalog's tile records the disk is given (the rest: bytes per row)
    journal_montages: int = 100  # the newest montages whose journal rows are kept

    def ended(self, i: int) -> datetime:
        """When montage i ended: montage 0 now, each after it 1/per_day day earlier."""
        return datetime.now(UTC) - timedelta(days=i / self.per_day)


class DagsterFill:
    """The template's run, copied per montage into Dagster's storage."""

    def __init__(self, instance: dg.DagsterInstance, template: Template):
        self.instance = instance
        self.template = template
        t0 = template.events[0].timestamp
        self._texts = [(serialize_value(e), e.timestamp - t0) for e in template.events]
        self._runless = [(t, dt) for (t, dt), e in zip(self._texts, template.events, strict=True)
                         if e.dagster_event and e.dagster_event.event_type_value in ASSET_EVENTS]  # fmt: skip

    def _events(self, texts, key: str, run_id: str, start: float) -> list:
        out = []
        for text, dt in texts:
            entry = deserialize_value(
                text.replace(self.template.run.run_id, run_id).replace(self.template.montage_id, key)
            )
            out.append(entry._replace(timestamp=start + dt))
        return out

    def add(self, keys: list[str], starts: list[float], real: list[bool]) -> int:
        """Partitions, runs and events of the montages ``keys``; returns the events stored."""
        self.instance.add_dynamic_partitions("montages", keys)
        storage = self.instance.event_log_storage
        stored, runless = 0, []
        for key, start, is_real in zip(keys, starts, real, strict=True):
            if not is_real:
                for entry in self._events(self._runless, key, RUNLESS_RUN_ID, start):
                    event = entry.dagster_event._replace(job_name=RUNLESS_JOB_NAME, step_key=None)
                    runless.append(
                        entry._replace(job_name=RUNLESS_JOB_NAME, step_key=None, dagster_event=event)
                    )
                continue
            run_id = str(uuid.uuid4())
            tags = {**self.template.run.tags, "dagster/partition": key, "dagster/run_key": key}
            self.instance.add_run(
                self.template.run.with_status(dg.DagsterRunStatus.NOT_STARTED)._replace(
                    run_id=run_id, tags=tags
                )
            )
            events = self._events(self._texts, key, run_id, start)
            batch: list = []
            for e in events:
                kind = e.dagster_event.event_type_value if e.dagster_event else None
                if kind in BATCHED:
                    batch.append(e)
                    continue
                if batch:
                    storage.store_event_batch(batch)
                    batch = []
                storage.store_event(e)
                if kind in RUN_EVENTS:
                    self.instance.run_storage.handle_run_event(
                        run_id, e.dagster_event, datetime.fromtimestamp(e.timestamp, UTC)
                    )
            if batch:
                storage.store_event_batch(batch)
            stored += len(events)
        checks = [e for e in runless if e.dagster_event.event_type_value not in BATCHED]
        if runless:
            storage.store_event_batch([e for e in runless if e.dagster_event.event_type_value in BATCHED])
        for e in checks:
            storage.store_event(e)
            stored += len(runless)
        return stored


def backdate_runs(instance: dg.DagsterInstance) -> None:
    """Each run's last change at its end, as the run storage holds it after the run (retention reads it)."""
    from dagster._core.storage.runs.schema import RunsTable

    with instance.run_storage.connect() as conn:
        conn.execute(
            RunsTable.update()
            .where(RunsTable.c.end_time.is_not(None))
            .values(update_timestamp=sa.func.to_timestamp(RunsTable.c.end_time).op("AT TIME ZONE")("UTC"))
        )


class CatalogFill:
    """The template's catalog and journal rows, copied per montage on the server."""

    def __init__(self, url: str, template: Template, plan: FillPlan):
        self.engine = sa.create_engine(url)
        self.t = template
        self.plan = plan

    def dispose(self) -> None:
        self.engine.dispose()

    def add(self, first: int, last: int) -> dict[str, int]:
        """Montages ``first`` .. ``last`` - 1; returns the rows written per table."""
        p, m = self.plan, self.t.montage_id
        copies = max(1, p.tiles_per_montage // max(self.t.tiles, 1))
        params = {
            "m": m, "a": first, "b": last - 1, "per_day": p.per_day, "copies": copies,
            "tile_montages": p.tile_rows // p.tiles_per_montage, "journal": p.journal_montages,
        }  # fmt: skip
        key = "('scale-' || lpad(g::text, 7, '0'))"
        ended = "(now() - make_interval(secs => g * 86400.0 / :per_day))"
        rows: dict[str, int] = {}
        with self.engine.begin() as conn:
            rows["datasets"] = conn.execute(
                sa.text(f"""
                INSERT INTO datasets (id, source, source_id, status, retry_count, error, record, created_at, updated_at)
                SELECT md5(t.id || g)::uuid::text, t.source, {key}, t.status, t.retry_count, t.error,
                       replace(t.record::text, :m, {key})::jsonb, {ended}, {ended}
                FROM datasets t, generate_series(:a, :b) g WHERE t.source_id = :m"""),
                params,
            ).rowcount
            rows["dataset_status_history"] = conn.execute(
                sa.text(f"""
                INSERT INTO dataset_status_history (dataset_id, from_status, to_status, at, message, run_id)
                SELECT md5(d.id || g)::uuid::text, h.from_status, h.to_status, {ended}, h.message, h.run_id
                FROM dataset_status_history h JOIN datasets d ON d.id = h.dataset_id,
                     generate_series(:a, :b) g WHERE d.source_id = :m"""),
                params,
            ).rowcount
            rows["tem_tiles"] = conn.execute(
                sa.text(f"""
                INSERT INTO tem_tiles
                SELECT {key} || '-t' || c || '-' || t.raster_index, {key},
                       replace(t.acquisition_id, :m, {key}), c * 1000 + t.raster_index, t.stage_x_nm,
                       t.stage_y_nm, t.raster_row + 5 * (c / 50), t.raster_col + 5 * (c % 50), t.focus_score,
                       t.min_value, t.max_value, t.mean_value, t.std_value,
                       replace(t.image_uri, :m, {key}), replace(t.matcher::text, :m, {key})::jsonb,
                       t.supertile_id, {ended}
                FROM tem_tiles t, generate_series(:a, LEAST(:b, :tile_montages - 1)) g,
                     generate_series(0, :copies - 1) c WHERE t.montage_id = :m"""),
                params,
            ).rowcount
            rows["acq_montages"] = conn.execute(
                sa.text(f"""
                INSERT INTO acq_montages
                SELECT {key}, nextval('acq_messages_seq_seq'), t.state, t.total_tiles, replace(t.acquisition_id, :m, {key}), t.pixel_size_nm,
                       t.rotation_angle, t.roi_id, {ended}, {ended}, {ended}, t.error_message,
                       replace(t.complete_message::text, :m, {key})::jsonb
                FROM acq_montages t, generate_series(:a, :b) g WHERE t.montage_id = :m"""),
                params,
            ).rowcount
            rows["acq_messages"] = conn.execute(
                sa.text(f"""
                INSERT INTO acq_messages (message_key, topic, montage_id, tile_id, payload, received_at)
                SELECT md5(t.message_key || g || '-' || c), t.topic, {key},
                       md5(t.tile_id || g || '-' || c)::uuid::text, replace(t.payload::text, :m, {key})::jsonb,
                       {ended}
                FROM acq_messages t, generate_series(:a, LEAST(:b, :journal - 1)) g,
                     generate_series(0, :copies - 1) c WHERE t.montage_id = :m AND (c = 0 OR (
                         t.topic NOT IN ('montage.complete', 'buffer.status', 'qc.status') AND (t.tile_id IS NULL
                         OR t.tile_id NOT IN (SELECT tile_id FROM acq_tiles WHERE montage_id = :m
                                              AND (brightfield OR darkfield)))))"""),
                params,
            ).rowcount
            rows["acq_tiles"] = conn.execute(
                sa.text(f"""
                INSERT INTO acq_tiles
                SELECT md5(t.tile_id || g || '-' || c)::uuid::text, {key}, nextval('acq_messages_seq_seq'),
                       c * 1000 + t.raster_index, t.row + 5 * (c / 50), t.column + 5 * (c % 50), t.overlap,
                       t.stage_x_nm, t.stage_y_nm, replace(t.path, :m, {key}), t.brightfield, t.darkfield,
                       {ended}, t.status, replace(t.results::text, :m, {key})::jsonb, t.qc_passed, t.qc_faults,
                       t.error, {ended}
                FROM acq_tiles t, generate_series(:a, LEAST(:b, :journal - 1)) g,
                     generate_series(0, :copies - 1) c WHERE t.montage_id = :m
                  AND (c = 0 OR NOT (t.brightfield OR t.darkfield))"""),
                params,
            ).rowcount
            rows["acq_qc_status"] = conn.execute(
                sa.text(f"""
                INSERT INTO acq_qc_status (montage_id, status, reason, at)
                SELECT {key}, t.status, t.reason, {ended}
                FROM acq_qc_status t, generate_series(:a, LEAST(:b, :journal - 1)) g
                WHERE t.montage_id = :m"""),
                params,
            ).rowcount
        return rows


def fill(
    catalog: CatalogFill, dagster: DagsterFill, plan: FillPlan, first: int, last: int, batch: int = 500
) -> dict:
    """Montages ``first`` .. ``last`` - 1 into both stores; the seconds each took and the rows written."""
    t = time.perf_counter()
    events = 0
    for a in range(first, last, batch):
        b = min(last, a + batch)
        keys = [montage_key(i) for i in range(a, b)]
        starts = [plan.ended(i).timestamp() - dagster.template.seconds for i in range(a, b)]
        events += dagster.add(keys, starts, [i < plan.real_runs for i in range(a, b)])
    dagster_s = time.perf_counter() - t
    t = time.perf_counter()
    rows = catalog.add(first, last)
    return {"dagster_s": round(dagster_s, 1), "events": events, "catalog_s": round(time.perf_counter() - t, 1),
            "rows": rows}  # fmt: skip
