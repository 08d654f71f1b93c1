"""The cryo results tables: rows linked by ids, replaced as a whole, readable by plain SQL (SQLite and PostgreSQL)."""

import pytest
import sqlalchemy as sa

from em_platform.cryo.results_db import CryoResults

SERIES = {"name": "TS_01", "kind": "tilt_series", "n_tilts": 2, "pixel_size_A": 2.0, "voltage_kV": 300.0}


def _fill(db: CryoResults, key: str, defocus: float) -> int:
    movies = [
        {"z_index": z, "tilt_angle_deg": a, "total_motion_px": 3.0, "drift_px": [[0, 0], [1, 1]]}
        for z, a in ((0, 0.0), (1, 3.0))
    ]
    ctf = [
        {
            "z_index": z,
            "defocus_u_A": defocus + 500,
            "defocus_v_A": defocus - 500,
            "estimated_defocus_A": defocus,
            "estimated_resolution_A": 6.0 + z,
        }
        for z in (0, 1)
    ]
    alignment = {"method": "xcorr", "tilt_axis_angle_deg": 85.1, "rms_residual_px": 0.4, "per_tilt": []}
    tomos = [{"method": "wbp", "voxel_size_A": 8.0, "shape_zyx": [64, 256, 256], "mrc_path": "/x/t.mrc"}]
    return db.replace(
        key, series=SERIES, movie_rows=movies, ctf_rows=ctf, alignment=alignment, tomogram_rows=tomos
    )


def _check(url: str) -> None:
    db = CryoResults(url)
    try:
        db.mark("sessions/a/TS_01", "processing", series=SERIES)
        sid = _fill(db, "sessions/a/TS_01", 30000)
        assert _fill(db, "sessions/a/TS_01", 31000) == sid  # a re-run replaces, never duplicates
        db.mark(
            "sessions/b/TS_02", "failed", series={**SERIES, "name": "TS_02"}, error="gain reference x: shape"
        )
        with db.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT ts.name, m.z_index, c.estimated_defocus_a, c.movie_id = m.id AS linked, a.tilt_axis_angle_deg, "
                    "t.method FROM cryo_tilt_series ts JOIN cryo_movies m ON m.tilt_series_id = ts.id "
                    "JOIN cryo_ctf c ON c.tilt_series_id = ts.id AND c.z_index = m.z_index "
                    "JOIN cryo_alignments a ON a.tilt_series_id = ts.id "
                    "JOIN cryo_tomograms t ON t.tilt_series_id = ts.id AND t.alignment_id = a.id "
                    "WHERE ts.status = 'complete' ORDER BY m.z_index"
                )
            ).all()
            failed = conn.execute(
                sa.text("SELECT name, error FROM cryo_tilt_series WHERE status = 'failed'")
            ).all()
        assert [(r[0], r[1], r[2], bool(r[3]), r[4], r[5]) for r in rows] == [
            ("TS_01", 0, 31000.0, True, 85.1, "wbp"),
            ("TS_01", 1, 31000.0, True, 85.1, "wbp"),
        ]
        assert failed == [("TS_02", "gain reference x: shape")]
    finally:
        db.dispose()


def test_results_on_sqlite(tmp_path):
    _check(f"sqlite:///{tmp_path / 'catalog.sqlite'}")


@pytest.mark.postgres
def test_results_on_postgres(pg_url):
    _check(pg_url)


def test_a_failed_run_fails_what_it_had_marked_complete(tmp_path):
    """The run's processing finished (complete), then a later step of it failed: Dagster says the partition
    failed, and so do the tables once the failure sensor releases the run; other runs' series stay."""
    db = CryoResults(f"sqlite:///{tmp_path / 'r.sqlite'}")
    try:
        db.replace(
            "ts/a", series=SERIES, movie_rows=[], ctf_rows=[], alignment=None, tomogram_rows=[], run_id="r1"
        )
        db.mark("ts/b", "processing", series={**SERIES, "name": "b"}, run_id="r1")
        db.replace(
            "ts/c", series=SERIES, movie_rows=[], ctf_rows=[], alignment=None, tomogram_rows=[], run_id="r2"
        )
        assert sorted(db.release_run("r1", "run r1 failed in simulation__evaluation: boom")) == [
            "ts/a",
            "ts/b",
        ]
        with db.engine.connect() as conn:
            rows = dict(conn.execute(sa.text("SELECT partition_key, status FROM cryo_tilt_series")).all())
        assert rows == {"ts/a": "failed", "ts/b": "failed", "ts/c": "complete"}
        assert db.release_run("r1", "again") == []
    finally:
        db.dispose()
