"""Fill the stores as N montages of acquisition leave them, copying the template montage (bench.scale.template).

Montage i ended ``i / per_day`` days ago: montage 0 is the newest, so a store grown from 10³ to 10⁴ montages
gains older ones, and the newest keep their runs and journal rows.

Dagster's instance: each montage a key of the ``montages`` dynamic partitions (``add_dynamic_partitions``, as
the sensor's request is applied); the first ``real_runs`` montages a run of ``montage_job`` with every event
of the template's run, the others its materializations and check evaluations as runless events, copied on
the server from the rows Dagster wrote for that run (:mod:`bench.scale.dagster_rows`: through the storage
API a run costs 0.2-0.4 s here, 10⁴ of them most of an hour).

The catalog and the journal, in SQL on the server (``INSERT … SELECT`` from the template's rows, which the
platform's own writers wrote: ``Journal.record`` and the run's tile results, ``TileRecords.replace_montage``,
``CatalogDB``): each montage's catalog record and status history; ``tiles_per_montage`` tile records for the
montages within ``tile_rows`` (the template's rows repeated, renamed, raster positions renumbered; its
reference frames and montage-level messages once); a journal montage row for each, and the journal's
messages and tiles for the newest ``journal_montages`` (what the retention window keeps; older ones are what
``Journal.retire`` leaves). Writing 10⁸ rows through SQLAlchemy's per-row inserts would take hours; the
server copies a million rows in seconds. The journal's tables get their indexes after the copy
(:func:`_without_indexes`): their keys are digests, and a million random inserts into an index was most of
the fill's time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import dagster as dg
import sqlalchemy as sa

from bench.scale.dagster_rows import DagsterRows
from bench.scale.template import Template

# montage i's journal position: the newest montage the highest, as a scope's journal numbers them (the fill
# adds older montages after newer ones); the journal's sequence then goes on above it
MONTAGE_SEQ_TOP = 10**9


def montage_key(i: int) -> str:
    return f"scale-{i:07d}"


@dataclass(frozen=True)
class FillPlan:
    per_day: float = 100.0  # two scopes at TilEM's rate: some 100 montages of 5,000 tiles a day
    real_runs: int = 10_000
    tiles_per_montage: int = 5_000
    tile_rows: int = 10_000_000  # the catalog's tile records the disk is given (the rest: bytes per row)
    journal_montages: int = 100  # the newest montages whose journal rows are kept


class DagsterFill:
    """Each montage a partition (``add_dynamic_partitions``, as the sensor's request is applied), and its run
    and events copied from the template run's rows (:mod:`bench.scale.dagster_rows`)."""

    def __init__(self, instance: dg.DagsterInstance, dagster_url: str, template: Template, plan: FillPlan):
        self.instance = instance
        self.rows = DagsterRows(
            dagster_url,
            template.run.run_id,
            template.montage_id,
            per_day=plan.per_day,
            real_runs=plan.real_runs,
        )

    def dispose(self) -> None:
        self.rows.dispose()

    def add(self, first: int, last: int) -> dict[str, int]:
        self.instance.add_dynamic_partitions("montages", [montage_key(i) for i in range(first, last)])
        return self.rows.add(first, last)


class CatalogFill:
    """The template's catalog and journal rows, copied per montage on the server."""

    def __init__(self, url: str, template: Template, plan: FillPlan):
        self.engine = sa.create_engine(url)
        self.t = template
        self.plan = plan
        self.seconds: dict[str, float] = {}  # each table's copies, in all

    def dispose(self) -> None:
        self.engine.dispose()

    def _timed(self, conn, table: str, statement, params: dict) -> int:
        """Run one table's copy; its seconds add up in :attr:`seconds`. Returns the rows written."""
        t = time.perf_counter()
        n = conn.execute(statement, params).rowcount
        self.seconds[table] = self.seconds.get(table, 0.0) + time.perf_counter() - t
        return n

    def add(self, first: int, last: int) -> dict[str, int]:
        """Montages ``first`` .. ``last`` - 1; returns the rows written per table."""
        p, m = self.plan, self.t.montage_id
        copies = max(1, p.tiles_per_montage // max(self.t.tiles, 1))
        params = {
            "m": m, "a": first, "b": last - 1, "per_day": p.per_day, "copies": copies,
            "tile_montages": p.tile_rows // p.tiles_per_montage, "journal": p.journal_montages,
            "top": MONTAGE_SEQ_TOP,
        }  # fmt: skip
        key = "('scale-' || lpad(g::text, 7, '0'))"
        ended = "(now() - make_interval(secs => g * 86400.0 / :per_day))"
        rows: dict[str, int] = {}
        with self.engine.begin() as conn:
            rows["datasets"] = self._timed(
                conn,
                "datasets",
                sa.text(f"""
                INSERT INTO datasets (id, source, source_id, status, retry_count, error, record, created_at, updated_at)
                SELECT md5(t.id || g)::uuid::text, t.source, {key}, t.status, t.retry_count, t.error,
                       replace(t.record::text, :m, {key})::jsonb, {ended}, {ended}
                FROM datasets t, generate_series(:a, :b) g WHERE t.source_id = :m"""),
                params,
            )
            rows["dataset_status_history"] = self._timed(
                conn,
                "dataset_status_history",
                sa.text(f"""
                INSERT INTO dataset_status_history (dataset_id, from_status, to_status, at, message, run_id)
                SELECT md5(d.id || g)::uuid::text, h.from_status, h.to_status, {ended}, h.message, h.run_id
                FROM dataset_status_history h JOIN datasets d ON d.id = h.dataset_id,
                     generate_series(:a, :b) g WHERE d.source_id = :m"""),
                params,
            )
            rows["tem_tiles"] = self._timed(
                conn,
                "tem_tiles",
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
            )
            rows["acq_montages"] = self._timed(
                conn,
                "acq_montages",
                sa.text(f"""
                INSERT INTO acq_montages
                SELECT {key}, :top - g, t.state, t.total_tiles, replace(t.acquisition_id, :m, {key}), t.pixel_size_nm,
                       t.rotation_angle, t.roi_id, {ended}, {ended}, {ended}, t.error_message,
                       replace(t.complete_message::text, :m, {key})::jsonb
                FROM acq_montages t, generate_series(:a, :b) g WHERE t.montage_id = :m"""),
                params,
            )
            journal = first < p.journal_montages
            rebuild = (
                [*_without_indexes(conn, "acq_messages"), *_without_indexes(conn, "acq_tiles")]
                if journal
                else []
            )
            conn.execute(  # what the journal numbers next comes after every montage
                sa.text(
                    "SELECT setval('acq_messages_seq_seq', GREATEST(:top, (SELECT last_value FROM acq_messages_seq_seq)))"
                ),
                params,
            )
            rows["acq_messages"] = self._timed(
                conn,
                "acq_messages",
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
            )
            rows["acq_tiles"] = self._timed(
                conn,
                "acq_tiles",
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
            )
            rows["acq_qc_status"] = self._timed(
                conn,
                "acq_qc_status",
                sa.text(f"""
                INSERT INTO acq_qc_status (montage_id, status, reason, at)
                SELECT {key}, t.status, t.reason, {ended}
                FROM acq_qc_status t, generate_series(:a, LEAST(:b, :journal - 1)) g
                WHERE t.montage_id = :m"""),
                params,
            )
            for statement in rebuild:
                self._timed(conn, "journal_indexes", sa.text(statement), {})
        return rows


def _without_indexes(conn, table: str) -> list[str]:
    """Drop ``table``'s indexes and unique constraints but its primary key; returns the statements that make
    them again. The journal's keys are digests, random in every index: inserted one by one, a million of
    them touch a random page each (the fill's slowest part by far); made after the copy, each index is
    built once, sorted, and ends the same."""
    params = {"t": table}
    constraints = conn.execute(
        sa.text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = CAST(:t AS regclass) AND contype = 'u'"
        ),
        params,
    ).all()
    indexes = conn.execute(
        sa.text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t AND indexname NOT IN "
            "(SELECT conname FROM pg_constraint WHERE conrelid = CAST(:t AS regclass))"
        ),
        params,
    ).all()
    for name, _ in constraints:
        conn.execute(sa.text(f'ALTER TABLE "{table}" DROP CONSTRAINT "{name}"'))
    for name, _ in indexes:
        conn.execute(sa.text(f'DROP INDEX "{name}"'))
    return [f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" {d}' for name, d in constraints] + [
        d for _, d in indexes
    ]


def fill(catalog: CatalogFill, dagster: DagsterFill, first: int, last: int, batch: int = 1000) -> dict:
    """Montages ``first`` .. ``last`` - 1 into both stores, ``batch`` montages a transaction; the seconds each
    store took and the rows written."""
    rows: dict[str, int] = defaultdict(int)
    t = time.perf_counter()
    for a in range(first, last, batch):
        for table, n in dagster.add(a, min(last, a + batch)).items():
            rows[f"dagster.{table}"] += n
    dagster_s = time.perf_counter() - t
    t = time.perf_counter()
    for a in range(first, last, batch):
        for table, n in catalog.add(a, min(last, a + batch)).items():
            rows[f"catalog.{table}"] += n
    seconds, catalog.seconds = catalog.seconds, {}
    return {
        "dagster_s": round(dagster_s, 1),
        "catalog_s": round(time.perf_counter() - t, 1),
        "catalog_s_by_table": {k: round(v, 1) for k, v in seconds.items()},
        "rows": dict(rows),
    }
