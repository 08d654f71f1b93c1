"""Cryo processing results as tables in the catalog database (the role ISPyB plays for cryoem-services).

One row per tilt series, per movie (motion correction), per CTF estimate, per alignment and per tomogram,
linked by ids, with lower-case column names (units as suffixes: ``_a`` Å, ``_px``, ``_deg``, ``_kv``), so a
facility can ask plain SQL ("the tilt series of today whose CTF fit is worse than 8 Å").
A tilt series' rows are replaced as a whole in one transaction: running the processing again never
duplicates a row, and a reader never sees half of a tilt series' results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from em_platform.sql import JSONType, open_database

metadata_obj = sa.MetaData()

tilt_series = sa.Table(
    "cryo_tilt_series",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("partition_key", sa.String(512), nullable=False, unique=True),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("mdoc_path", sa.Text),
    sa.Column("stack_path", sa.Text),
    sa.Column("n_tilts", sa.Integer),
    sa.Column("pixel_size_a", sa.Float),
    sa.Column("voltage_kv", sa.Float),
    sa.Column("tilt_axis_nominal_deg", sa.Float),
    sa.Column("status", sa.String(16), nullable=False),  # processing / complete / failed
    sa.Column("error", sa.Text),
    sa.Column("run_id", sa.String(64)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


def _ts_fk() -> sa.ForeignKey:
    return sa.ForeignKey("cryo_tilt_series.id", ondelete="CASCADE")


movies = sa.Table(
    "cryo_movies",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tilt_series_id", sa.Integer, _ts_fk(), nullable=False, index=True),
    sa.Column("z_index", sa.Integer, nullable=False),
    sa.Column("tilt_angle_deg", sa.Float),
    sa.Column("movie_path", sa.Text),
    sa.Column("n_frames", sa.Integer),
    sa.Column("dose_per_frame_e_per_a2", sa.Float),
    sa.Column("pre_exposure_e_per_a2", sa.Float),
    sa.Column("total_motion_px", sa.Float),
    sa.Column("early_motion_px", sa.Float),
    sa.Column("late_motion_px", sa.Float),
    sa.Column("average_motion_per_frame_px", sa.Float),
    sa.Column("local_motion_rms_px", sa.Float),
    sa.Column("patches_used", sa.Integer),
    sa.Column("drift_px", JSONType),
    sa.Column("micrograph_path", sa.Text),
    sa.UniqueConstraint("tilt_series_id", "z_index", name="uq_cryo_movie"),
)

ctf = sa.Table(
    "cryo_ctf",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tilt_series_id", sa.Integer, _ts_fk(), nullable=False, index=True),
    sa.Column("movie_id", sa.Integer, sa.ForeignKey("cryo_movies.id", ondelete="SET NULL")),
    sa.Column("z_index", sa.Integer, nullable=False),
    sa.Column("defocus_u_a", sa.Float),
    sa.Column("defocus_v_a", sa.Float),
    sa.Column("astigmatism_a", sa.Float),
    sa.Column("astigmatism_angle_deg", sa.Float),
    sa.Column("estimated_defocus_a", sa.Float),
    sa.Column("nominal_defocus_a", sa.Float),
    sa.Column("cc_value", sa.Float),
    sa.Column("estimated_resolution_a", sa.Float),
    sa.Column("ice_ring_density", sa.Float),
    sa.Column("diagnostic_path", sa.Text),
    sa.UniqueConstraint("tilt_series_id", "z_index", name="uq_cryo_ctf"),
)

alignments = sa.Table(
    "cryo_alignments",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tilt_series_id", sa.Integer, _ts_fk(), nullable=False, unique=True),
    sa.Column("method", sa.String(64)),
    sa.Column("tilt_axis_angle_deg", sa.Float),
    sa.Column("rms_residual_px", sa.Float),
    sa.Column("xf_path", sa.Text),
    sa.Column("tlt_path", sa.Text),
    sa.Column("per_tilt", JSONType),  # [{z_index, angle_deg, shift_px, residual_px, score}]
)

tomograms = sa.Table(
    "cryo_tomograms",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tilt_series_id", sa.Integer, _ts_fk(), nullable=False, index=True),
    sa.Column("alignment_id", sa.Integer, sa.ForeignKey("cryo_alignments.id", ondelete="SET NULL")),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("voxel_size_a", sa.Float),
    sa.Column("shape_zyx", JSONType),
    sa.Column("mrc_path", sa.Text),
    sa.Column("zarr_url", sa.Text),
    sa.Column("denoised_path", sa.Text),
    sa.Column("denoise_method", sa.String(32)),
    sa.UniqueConstraint("tilt_series_id", "method", name="uq_cryo_tomogram"),
)


def _inserted_id(result: sa.CursorResult[Any]) -> Any:
    """The primary key of the row an INSERT added (each table here has a one-column key)."""
    key = result.inserted_primary_key
    assert key is not None  # an INSERT's result has it
    return key[0]


def _lower(row: Mapping[str, Any]) -> dict[str, Any]:
    """Column names are lower case (plain SQL on PostgreSQL needs no quoting); callers may write ``_A``."""
    return {k.lower(): v for k, v in row.items()}


class CryoResults:
    """Read and write the cryo results tables (SQLite or PostgreSQL)."""

    def __init__(self, url: str, *, create: bool = True):
        self.engine = open_database(url, metadata_obj, create=create)

    def dispose(self) -> None:
        self.engine.dispose()

    def _series_id(self, conn, key: str, fields: Mapping[str, Any]) -> int:
        fields = _lower(fields)
        row = conn.execute(sa.select(tilt_series.c.id).where(tilt_series.c.partition_key == key)).first()
        values = {**fields, "updated_at": datetime.now(UTC)}
        if row is None:
            return conn.execute(
                tilt_series.insert().values(partition_key=key, **values)
            ).inserted_primary_key[0]
        conn.execute(tilt_series.update().where(tilt_series.c.id == row.id).values(**values))
        return row.id

    def mark(
        self, key: str, status: str, *, series: Mapping[str, Any], error: str | None = None, run_id=None
    ) -> None:
        """Record a tilt series' status (processing / failed), keeping its results rows as they are."""
        with self.engine.begin() as conn:
            self._series_id(conn, key, {**series, "status": status, "error": error, "run_id": run_id})

    def release_run(self, run_id: str, reason: str, *, status: str = "failed") -> list[str]:
        """Tilt series of a run that failed go to ``status`` with ``reason``: those it left 'processing' and
        those it had marked 'complete' before a later step failed (Dagster says the partition failed; so do
        these tables). Their results rows stay as they were; returns their partition keys."""
        t = tilt_series
        held = sa.and_(t.c.run_id == run_id, t.c.status.in_(("processing", "complete")))
        with self.engine.begin() as conn:
            keys = conn.execute(sa.select(t.c.partition_key).where(held)).scalars().all()
            if keys:
                conn.execute(
                    t.update().where(held).values(status=status, error=reason, updated_at=datetime.now(UTC))
                )
        return list(keys)

    def replace(
        self,
        key: str,
        *,
        series: Mapping[str, Any],
        movie_rows: Sequence[Mapping[str, Any]],
        ctf_rows: Sequence[Mapping[str, Any]],
        alignment: Mapping[str, Any] | None,
        tomogram_rows: Sequence[Mapping[str, Any]],
        run_id: str | None = None,
    ) -> int:
        """Replace all rows of one tilt series (one transaction) and mark it complete; returns its id."""
        with self.engine.begin() as conn:
            sid = self._series_id(
                conn, key, {**series, "status": "complete", "error": None, "run_id": run_id}
            )
            for table in (tomograms, alignments, ctf, movies):
                conn.execute(table.delete().where(table.c.tilt_series_id == sid))
            movie_ids = {}
            for row in movie_rows:
                mid = _inserted_id(conn.execute(movies.insert().values(tilt_series_id=sid, **_lower(row))))
                movie_ids[row["z_index"]] = mid
            for row in ctf_rows:
                conn.execute(
                    ctf.insert().values(
                        tilt_series_id=sid, movie_id=movie_ids.get(row["z_index"]), **_lower(row)
                    )
                )
            aid = None
            if alignment is not None:
                aid = _inserted_id(conn.execute(alignments.insert().values(tilt_series_id=sid, **alignment)))
            for row in tomogram_rows:
                conn.execute(tomograms.insert().values(tilt_series_id=sid, alignment_id=aid, **_lower(row)))
        return sid

    def finished_before(self, before: datetime) -> list[str]:
        """Partition keys of the tilt series complete or failed, last changed before ``before`` (what a retention
        policy may tidy; one still processing is not finished)."""
        t = tilt_series
        q = sa.select(t.c.partition_key).where(
            t.c.status.in_(("complete", "failed")), t.c.updated_at < before
        )
        with self.engine.connect() as conn:
            return list(conn.execute(q.order_by(t.c.partition_key)).scalars())

    def series(self, key: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(sa.select(tilt_series).where(tilt_series.c.partition_key == key))
                .mappings()
                .first()
            )
        return dict(row) if row else None

    def rows(self, table: sa.Table, key: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            q = (
                sa.select(table)
                .join(tilt_series, tilt_series.c.id == table.c.tilt_series_id)
                .where(tilt_series.c.partition_key == key)
                .order_by(table.c.id)
            )
            return [dict(r) for r in conn.execute(q).mappings()]
