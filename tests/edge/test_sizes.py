"""Sizes from the microscope are bounded at the edge: a montage's rows, columns and planned tiles, and the
stage positions of its tiles (EM_MONTAGE_MAX_GRID, EM_STAGE_MAX_NM). Past a bound a message is refused naming
the field, the value and the bound, dead-lettered by the listener, and never journaled, so nothing sized by it
(focus map, missing-tile listing, fused canvas) is ever allocated; the other montages go on."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from em_platform.edge import MONTAGE_MAX_GRID, STAGE_MAX_NM, MontageBounds
from em_platform.settings import ConfigError, load_settings
from em_platform.tem.journal import Journal
from tests.support.polling import wait_until


def _tile(montage_id: str, tile_id: str, row: int = 0, column: int = 0, **extra) -> dict:
    return {
        "tile_id": tile_id,
        "montage_id": montage_id,
        "row": row,
        "column": column,
        "overlap": 51,
        "stage_position": (column * 1843, row * 1843),
        "path": f"/storage/raw/{montage_id}/{tile_id}.tiff",
        **extra,
    }


def _complete(montage_id: str, tiles: dict[str, tuple[int, int, tuple[int, int]]]) -> dict:
    """A montage.complete naming ``tiles``: tile id -> (column, row, stage position)."""
    return {
        "montage_id": montage_id,
        "tiles": {
            tid: {"raster_index": i, "stage_position": stage, "raster_position": (c, r)}
            for i, (tid, (c, r, stage)) in enumerate(tiles.items())
        },
        "acquisition_id": "acq-1",
        "start_time": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
        "pixel_size": 4.0,
        "rotation_angle": 0.0,
        "aperture_centroid": (0, 0),
    }


def _count(journal: Journal, table: str) -> int:
    with journal.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


# What the issue found, one message each: (topic, payload, field, what the reason names).
HOSTILE = [
    ("tile.raw", _tile("m-big", "t-row", row=100_000), "row", "at most 256 rows"),
    ("tile.raw", _tile("m-big", "t-col", column=100_000), "column", "at most 256 columns"),
    ("tile.raw", _tile("m-big", "t-neg", row=-1), "row", "outside 0 to 255"),
    ("tile.raw", _tile("m-big", "t-far", stage_position=(10**12, 0)), "stage_position", f"{STAGE_MAX_NM} nm"),
    (
        "montage.status",
        {"montage_id": "m-big", "state": "in_progress", "current_tile": 1, "total_tiles": 10**12},
        "total_tiles",
        "at most 256 × 256 tiles",
    ),
    (
        "montage.complete",
        _complete("m-big", {"t-1": (0, 100_000, (0, 0))}),
        "tiles.t-1.raster_position",
        "at most 256 rows",
    ),
    (
        "montage.complete",
        _complete("m-big", {"t-1": (0, 0, (0, -(10**11)))}),
        "tiles.t-1.stage_position",
        "EM_STAGE_MAX_NM",
    ),
]


@pytest.mark.parametrize("topic, payload, field, bound", HOSTILE, ids=[h[2] + "-" + h[0] for h in HOSTILE])
def test_the_journal_refuses_sizes_past_the_montage_bounds_before_writing(
    tmp_path, topic, payload, field, bound
):
    journal = Journal(f"sqlite:///{tmp_path / 'j.sqlite'}", montage_bounds=MontageBounds())
    try:
        with pytest.raises(ValueError) as exc:  # edge.Refused
            journal.record(topic, payload)
        assert exc.value.field == field
        assert bound in str(exc.value) and field in str(exc.value)
        assert _count(journal, "acq_messages") == 0 and journal.montage("m-big") is None
        # the next montage is journaled as before
        assert journal.record("tile.raw", _tile("m-ok", "t-ok", row=255, column=255)) is True
        assert [t.tile_id for t in journal.tiles("m-ok")] == ["t-ok"]
    finally:
        journal.dispose()


def test_the_largest_montage_the_bounds_allow_is_journaled(tmp_path):
    journal = Journal(f"sqlite:///{tmp_path / 'j.sqlite'}", montage_bounds=MontageBounds())
    try:
        side = MONTAGE_MAX_GRID
        status = {"montage_id": "m", "state": "started", "current_tile": 0, "total_tiles": side * side}
        assert journal.record("montage.status", status)
        far = (STAGE_MAX_NM, -STAGE_MAX_NM)
        assert journal.record("tile.raw", _tile("m", "t", row=side - 1, column=side - 1, stage_position=far))
        assert journal.record("montage.complete", _complete("m", {"t": (side - 1, side - 1, far)}))
        assert journal.montage("m").total_tiles == side * side
    finally:
        journal.dispose()


def test_reference_frames_lie_on_no_raster_and_pass_at_row_and_column_minus_one(tmp_path):
    """pyTEM sends brightfield, darkfield and lens-correction frames at row = column = -1; a montage tile
    there, or a reference frame below it, is still refused."""
    journal = Journal(f"sqlite:///{tmp_path / 'j.sqlite'}", montage_bounds=MontageBounds())
    try:
        for i, flag in enumerate(("brightfield", "darkfield", "lens_correction")):
            frame = _tile("m", f"ref-{i}", row=-1, column=-1, stage_position=None, **{flag: True})
            assert journal.record("tile.raw", frame)
        with pytest.raises(ValueError, match=r"row '-2' refused: outside -1 to 255"):
            journal.record("tile.raw", _tile("m", "ref-x", row=-2, column=-1, brightfield=True))
        with pytest.raises(ValueError, match=r"column '-1' refused: outside 0 to 255"):
            journal.record("tile.raw", _tile("m", "t-x", row=0, column=-1))
        assert len(journal.tiles("m")) == 3
    finally:
        journal.dispose()


def test_the_bounds_are_operator_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("EM_MONTAGE_MAX_GRID", "8")
    monkeypatch.setenv("EM_STAGE_MAX_NM", "5000")
    assert (load_settings().montage_max_grid, load_settings().stage_max_nm) == (8, 5000)
    journal = Journal(f"sqlite:///{tmp_path / 'j.sqlite'}")  # None: the bounds from the environment
    try:
        with pytest.raises(ValueError, match=r"row '8' refused: outside 0 to 7.*EM_MONTAGE_MAX_GRID"):
            journal.record("tile.raw", _tile("m", "t-8", row=8))
        with pytest.raises(ValueError, match=r"farther than 5000 nm .*EM_STAGE_MAX_NM"):
            journal.record("tile.raw", _tile("m", "t-far", stage_position=(5001, 0)))
        assert journal.record("tile.raw", _tile("m", "t-7", row=7, column=2, stage_position=(-5000, 5000)))
    finally:
        journal.dispose()
    for bad in ("0", "-3", "lots", "2.5"):
        monkeypatch.setenv("EM_MONTAGE_MAX_GRID", bad)
        with pytest.raises(ConfigError, match="EM_MONTAGE_MAX_GRID"):
            load_settings()


def test_the_listener_dead_letters_oversized_messages_and_journals_the_rest(
    stomp_broker, start_listener, tmp_path
):
    """Through the real broker, as the microscope (or a buggy one) sends them: each refused message is kept as
    a dead letter naming its field and bound, acknowledged, and the montage after them is journaled."""
    journal = Journal(f"sqlite:///{tmp_path / 'j.sqlite'}", montage_bounds=MontageBounds())
    try:
        lt = start_listener(journal)
        scope = stomp_broker.pigeon()
        for topic, payload, _, _ in HOSTILE:
            scope.send(topic, **payload)
        scope.send("tile.raw", **_tile("m-ok", "t-ok", row=3, column=4))
        wait_until(lambda: journal.tiles("m-ok"), 10, "the good tile after the oversized ones")
        stats = lt.finish()
        assert (stats.rejected, stats.journaled) == (len(HOSTILE), 1)
        with journal.engine.connect() as conn:
            letters = conn.execute(
                sa.text("SELECT source, topic, field, reason FROM dead_letters ORDER BY id")
            ).all()
        assert [(s, t, f) for s, t, f, _ in letters] == [("broker", t, f) for t, _, f, _ in HOSTILE]
        for (_, _, _, reason), (_, _, _, bound) in zip(letters, HOSTILE, strict=True):
            assert bound in reason
        assert journal.montage("m-big") is None and _count(journal, "acq_messages") == 1
    finally:
        journal.dispose()
