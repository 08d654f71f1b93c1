"""TEM tile records (TEMdb's Tile) built from the acquisition journal, on SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest

from em_platform.tem.journal import Journal
from em_platform.tem.tile_records import TileRecords, tile_records_from_journal

MONTAGE = "m-1"
FOCUS = {"t00": 0.31, "t01": 0.62, "t10": 0.44, "t11": None}  # t11 failed processing: no results


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    return request.getfixturevalue("pg_url")


def _match(row: int, column: int, position: str, quality: float) -> dict:
    """A match as run_montage stores it in a tile's results (TEM_comms Match fields + quality)."""
    return {
        "row": row,
        "column": column,
        "dX": 1.5,
        "dY": -0.5,
        "dXsd": 0.1,
        "dYsd": 0.2,
        "distance": 1.58,
        "rotation": 0.001,
        "position": position,
        "pX": [1.0, 2.0],
        "pY": [3.0, 4.0],
        "qX": [5.0, 6.0],
        "qY": [7.0, 8.0],
        "quality": quality,
        "n_agreeing": 5,
        "search": "stage",
    }


@pytest.fixture
def journal(db_url):
    """A 2 × 2 montage and a brightfield reference frame in the journal, processed as run_montage leaves it."""
    j = Journal(db_url)
    tiles = {tid: (int(tid[1]), int(tid[2])) for tid in FOCUS}
    for tid, (row, col) in tiles.items():
        j.record(
            "tile.raw",
            {
                "tile_id": tid,
                "montage_id": MONTAGE,
                "row": row,
                "column": col,
                "overlap": 512,
                "stage_position": (10_000 + 4_000 * col, -20_000 + 4_000 * row),
                "path": f"/buffer/{tid}.tiff",
            },
        )
    j.record(
        "tile.raw",
        {
            "tile_id": "bf",
            "montage_id": MONTAGE,
            "row": 0,
            "column": 0,
            "path": "/buffer/bf.tiff",
            "brightfield": True,
        },
    )
    j.record(
        "montage.complete",
        {
            "montage_id": MONTAGE,
            "acquisition_id": "acq-1",
            "tiles": {tid: {"raster_index": i} for i, tid in enumerate(tiles)},
        },
    )
    for tid, focus in FOCUS.items():
        if focus is None:
            j.save_tile_results(tid, status="failed", error="unreadable TIFF")
            continue
        row, col = tiles[tid]
        matches = {}
        if row:
            matches["top"] = _match(row - 1, col, "top", 0.9)
        if col:
            matches["left"] = _match(row, col - 1, "left", 0.8)
        j.save_tile_results(
            tid,
            status="processed",
            results={
                "min": 3,
                "max": 250,
                "mean": 120.5,
                "std": 30.25,
                "focus": focus,
                "histogram": [0] * 256,
                "matches": matches,
            },
        )
    yield j
    j.dispose()


@pytest.fixture
def store(db_url):
    s = TileRecords(db_url)
    yield s
    s.dispose()


def _uris(ids) -> dict[str, str]:
    return {tid: f"s3://em-data/montages/{MONTAGE}/tiles/{tid}.processed.tiff" for tid in ids}


def test_records_come_from_the_journal_with_the_temdb_fields(journal):
    records = tile_records_from_journal(journal.tiles(MONTAGE), _uris(FOCUS), acquisition_id="acq-1")
    by_id = {r.tile_id: r for r in records}
    assert set(by_id) == set(FOCUS)  # the brightfield reference frame is not a montage tile
    t11 = by_id["t11"]
    assert (t11.raster_row, t11.raster_col, t11.raster_index) == (1, 1, 3)
    assert (t11.stage_x_nm, t11.stage_y_nm) == (14_000, -16_000)
    assert t11.focus_score is None and t11.mean_value is None and t11.matcher == []  # failed: no results
    t10 = by_id["t10"]
    assert t10.focus_score == 0.44 and t10.acquisition_id == "acq-1" and t10.montage_id == MONTAGE
    assert (t10.min_value, t10.max_value, t10.mean_value, t10.std_value) == (3, 250, 120.5, 30.25)
    assert t10.image_uri.endswith("/tiles/t10.processed.tiff")
    (m,) = t10.matcher
    assert m == {
        "row": 0,
        "col": 0,
        "dX": 1.5,
        "dY": -0.5,
        "dXsd": 0.1,
        "dYsd": 0.2,
        "distance": 1.58,
        "rotation": 0.001,
        "match_quality": 0.9,
        "position": "top",
        "pX": [1.0, 2.0],
        "pY": [3.0, 4.0],
        "qX": [5.0, 6.0],
        "qY": [7.0, 8.0],
    }
    assert [x["position"] for x in by_id["t01"].matcher] == ["left"] and by_id["t00"].matcher == []


def test_a_tile_without_an_image_uri_is_named(journal):
    uris = _uris(FOCUS)
    del uris["t01"]
    with pytest.raises(ValueError, match=r"t01.*upload their images first"):
        tile_records_from_journal(journal.tiles(MONTAGE), uris)


def test_records_round_trip_and_a_rerun_replaces_them(journal, store):
    records = tile_records_from_journal(journal.tiles(MONTAGE), _uris(FOCUS), acquisition_id="acq-1")
    at = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert store.replace_montage(MONTAGE, records, uploaded_at=at) == 4
    stored = store.montage_tiles(MONTAGE)
    assert [r.tile_id for r in stored] == ["t00", "t01", "t10", "t11"]  # raster order
    assert [r.uploaded_at for r in stored] == [at] * 4
    assert {r.tile_id: r.matcher for r in stored} == {r.tile_id: r.matcher for r in records}
    assert stored[2].stage_x_nm == 10_000 and stored[2].focus_score == 0.44

    assert store.replace_montage(MONTAGE, records) == 4  # a re-run: same tiles, no duplicates
    assert len(store.montage_tiles(MONTAGE)) == 4
    fewer = [r for r in records if r.tile_id != "t11"]
    store.replace_montage(MONTAGE, fewer)
    assert [r.tile_id for r in store.montage_tiles(MONTAGE)] == ["t00", "t01", "t10"]
    assert store.montage_tiles("other") == []


def test_bad_focus_tiles_and_focus_stats(journal, store):
    records = tile_records_from_journal(journal.tiles(MONTAGE), _uris(FOCUS), acquisition_id="acq-1")
    store.replace_montage(MONTAGE, records)
    bad = store.bad_focus_tiles(0.4, montage_id=MONTAGE)
    assert [(r.tile_id, r.focus_score) for r in bad] == [("t01", 0.62), ("t10", 0.44)]  # worst first
    assert [r.tile_id for r in store.bad_focus_tiles(0.5, acquisition_id="acq-1")] == ["t01"]
    assert store.bad_focus_tiles(0.4, acquisition_id="acq-2") == []

    scores = np.array([v for v in FOCUS.values() if v is not None])
    stats = store.focus_stats(montage_id=MONTAGE)
    assert (stats.tile_count, stats.scored) == (4, 3)
    assert stats.mean == pytest.approx(scores.mean()) and stats.median == pytest.approx(np.median(scores))
    assert stats.stddev == pytest.approx(scores.std(ddof=1))  # sample standard deviation, as TEMdb
    assert (stats.min, stats.max) == (scores.min(), scores.max())

    store.replace_montage(MONTAGE, [r for r in records if r.tile_id in ("t00", "t11")])
    one = store.focus_stats(acquisition_id="acq-1")
    assert (one.scored, one.mean, one.stddev) == (1, 0.31, 0.0)
    store.replace_montage(MONTAGE, [r for r in records if r.tile_id == "t11"])
    none = store.focus_stats(montage_id=MONTAGE)
    assert (none.tile_count, none.scored, none.mean, none.median) == (1, 0, None, None)


def test_records_that_do_not_belong_are_refused(journal, store):
    records = tile_records_from_journal(journal.tiles(MONTAGE), _uris(FOCUS))
    with pytest.raises(ValueError, match="other montages"):
        store.replace_montage("m-2", records)
    with pytest.raises(ValueError, match="repeated"):
        store.replace_montage(MONTAGE, records + records[:1])
    store.replace_montage(MONTAGE, records)
    moved = [replace(records[0], montage_id="m-2")]
    with pytest.raises(ValueError, match=r"t00 is already recorded under montage m-1"):
        store.replace_montage("m-2", moved)
    assert len(store.montage_tiles(MONTAGE)) == 4  # nothing changed
    with pytest.raises(ValueError, match="montage_id or an acquisition_id"):
        store.focus_stats()
