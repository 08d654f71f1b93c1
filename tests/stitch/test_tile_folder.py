"""Stitching a folder of TIFF tiles from a layout CSV: synthetic montages with known true positions."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

from em_platform.simulation.specimen import Specimen
from em_platform.stitch.tile_folder import (
    TileFolderError,
    match_tile_folder,
    neighbour_pairs,
    open_tile_folder,
    positions_path,
    solve_tile_folder,
    write_positions,
)

SIZE = 512
OVERLAP = 64  # 12.5 %: default search ±21 px


def write_montage(
    folder: Path,
    rows: int = 3,
    columns: int = 4,
    *,
    step: tuple[int, int] | None = None,
    jitter: float = 8.0,
    layout_error: float = 0.0,
    stagger: float = 0.0,
    dtype=np.uint16,
    seed: int = 0,
    blank: tuple[int, int] | None = None,
    pixel_size_nm: float | None = None,
) -> dict[str, tuple[float, float]]:
    """Tiles cut from one specimen at true positions = grid + jitter (sub-pixel), with shot noise, and a
    layout CSV of the nominal grid (plus ``layout_error``); row r is shifted right by r·``stagger``;
    ``pixel_size_nm`` goes into the resolution tags. Returns the true top-left corners by file name."""
    rng = np.random.default_rng(seed)
    specimen = Specimen(seed)
    sx, sy = step or (SIZE - OVERLAP, SIZE - OVERLAP)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    scale = 3000.0 if dtype == np.uint16 else 200.0
    with (folder / "layout.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tile", "row", "column", "x", "y"])
        for r in range(rows):
            for c in range(columns):
                name = f"tile_r{r}_c{c}.tif"
                nominal = np.array([c * sx + r * stagger, r * sy])
                true = nominal + rng.uniform(-jitter, jitter, 2)
                truth[name] = (float(true[0]), float(true[1]))
                signal = specimen.render(true[0] + 1000, true[1] + 1000, SIZE, SIZE) * scale
                if (r, c) == blank:
                    signal[:] = scale / 2
                pixels = rng.poisson(np.maximum(signal, 0)).clip(0, np.iinfo(dtype).max).astype(dtype)
                resolution = {}
                if pixel_size_nm:
                    resolution = {"resolution": (1e7 / pixel_size_nm,) * 2, "resolutionunit": "CENTIMETER"}
                tifffile.imwrite(folder / name, pixels, **resolution)
                layout = nominal + rng.uniform(-layout_error, layout_error, 2)
                w.writerow([name, r, c, f"{layout[0]:.2f}", f"{layout[1]:.2f}"])
    return truth


def rms_error(positions, truth) -> float:
    """RMS position error after removing the common translation (no match can observe it)."""
    diff = np.array([np.subtract(positions[t], truth[t]) for t in truth])
    diff -= diff.mean(axis=0)
    return float(np.sqrt((diff**2).sum(axis=1).mean()))


def stitch(folder: Path, **kwargs):
    tiles = open_tile_folder(folder, folder / "layout.csv")
    report = match_tile_folder(tiles, workers=2, **kwargs)
    return tiles, report, solve_tile_folder(tiles, report)


# ----------------------------------------------------------------------------------------------------
# Accuracy


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
def test_positions_recovered_to_a_third_of_a_pixel(tmp_path, dtype):
    truth = write_montage(tmp_path, dtype=dtype)
    tiles, report, layout = stitch(tmp_path)
    assert tiles.dtype == dtype and len(tiles.tiles) == 12
    assert report.pairs == 3 * 3 + 2 * 4 and not report.unmatched
    assert not layout.rejected and not layout.disconnected
    nominal_error = rms_error(tiles.stage(), truth)
    assert nominal_error > 5  # the layout alone is far off …
    assert rms_error(layout.positions, truth) <= 0.3  # … the stitch is not


def test_irregular_layout_uses_each_pairs_own_overlap(tmp_path):
    """Uneven steps (60 px and 150 px of overlap), staggered rows and a layout a few px off the truth:
    each pair's nominal overlap and expected offset come from the layout positions (the default search,
    ±20 px at 60 px of overlap, covers the pair errors of up to 2 × (3 + 2) px)."""
    truth = write_montage(
        tmp_path, rows=3, columns=3, step=(452, 362), stagger=37.0, jitter=3.0, layout_error=2.0
    )
    tiles, report, layout = stitch(tmp_path)
    pairs = neighbour_pairs(tiles.tiles)
    assert all(abs(p.overlap_px - 60) <= 4 for p in pairs if p.position == "left")  # ± 2 layout errors
    assert all(abs(p.overlap_px - 150) <= 4 for p in pairs if p.position == "top")
    along = [p.expected[0] for p in pairs if p.position == "top"]
    assert np.allclose(along, 37.0, atol=2 * 2.0)  # the stagger, seen as an along-edge offset
    assert not report.unmatched and not layout.rejected
    assert rms_error(layout.positions, truth) <= 0.3


def test_a_blank_tile_is_reported_and_left_at_its_layout_position(tmp_path):
    truth = write_montage(tmp_path, rows=2, columns=3, blank=(0, 1))
    tiles, report, layout = stitch(tmp_path)
    blank = "tile_r0_c1.tif"
    assert {(p.tile.tile, p.neighbour.tile) for p, _ in report.unmatched} == {
        (blank, "tile_r0_c0.tif"),
        ("tile_r0_c2.tif", blank),
        ("tile_r1_c1.tif", blank),
    }
    assert all(reason == "no overlap found in the pixels" for _, reason in report.unmatched)
    assert layout.disconnected == [blank]
    assert layout.positions[blank] == pytest.approx(tiles.stage()[blank], abs=0.5)
    others = {t: p for t, p in truth.items() if t != blank}
    assert rms_error(layout.positions, others) <= 0.3


@pytest.mark.parametrize(
    ("step", "overlap", "reason"),
    [(SIZE - 10, 10, "too narrow to match"), (0, SIZE, "more than a tile minus the search range")],
)
def test_a_layout_that_leaves_nothing_to_match_is_reported(tmp_path, step, overlap, reason):
    write_montage(tmp_path, rows=1, columns=2, step=(step, 0), jitter=0.0)
    _, report, layout = stitch(tmp_path)
    assert not report.edges
    [(pair, why)] = report.unmatched
    assert pair.overlap_px == overlap and reason in why
    assert len(layout.disconnected) == 1


def test_search_range_is_the_callers_and_bounds_what_is_found(tmp_path):
    """Jitter of ±12 px puts pairs up to 24 px from where the layout says: a ±30 px search finds them
    all, a ±2 px one does not."""
    write_montage(tmp_path, rows=2, columns=2, jitter=12.0, seed=3)
    tiles = open_tile_folder(tmp_path, tmp_path / "layout.csv")
    wide = match_tile_folder(tiles, workers=1, max_shift_px=30)
    narrow = match_tile_folder(tiles, workers=1, max_shift_px=2, stage_error_px=1.0)
    assert len(wide.edges) == 4
    assert len(narrow.edges) < 4
    with pytest.raises(TileFolderError, match="at least 1 px"):
        match_tile_folder(tiles, max_shift_px=0)


# ----------------------------------------------------------------------------------------------------
# Bad layouts and tiles: the error names the file, the line and the problem


def _layout(folder: Path, text: str) -> Path:
    for name in ("a.tif", "b.tif"):
        tifffile.imwrite(folder / name, np.zeros((64, 64), np.uint8))
    path = folder / "layout.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tile,row,column,x\na.tif,0,0,0\n", r"line 1: missing column\(s\) y"),
        (
            "tile,row,column,x,y\na.tif,0,0,0,0\nb.tif,0,0,60,0\n",
            r"line 3: duplicate grid cell \(row 0, column 0\), already tile 'a.tif' on line 2",
        ),
        ("tile,row,column,x,y\na.tif,0,0,0,0\nb.tif,0,1,sixty,0\n", r"line 3: x is 'sixty', not a number"),
        ("tile,row,column,x,y\na.tif,0,0.5,0,0\n", r"line 2: column is '0.5', not a whole number"),
        ("tile,row,column,x,y\na.tif,-1,0,0,0\n", r"line 2: row is -1; grid indices start at 0"),
        ("tile,row,column,x,y\na.tif,0,0,nan,0\n", r"line 2: x is 'nan'; positions must be finite"),
        (
            "tile,row,column,x,y\na.tif,0,0,0,0\na.tif,0,1,60,0\n",
            r"line 3: tile 'a.tif' is listed twice \(first on line 2\)",
        ),
        ("tile,row,column,x,y\na.tif,0,0,0\n", r"line 2: 4 fields, the header has 5"),
        ("tile,row,column,x,y\n\n", r"lists no tiles"),
        ("", r"empty; the first line must be tile,row,column,x,y"),
        ("tile,row,column,x,y\n../a.tif,0,0,0,0\n", r"line 2: tile '../a.tif' is not a file name in"),
        ("tile,row,column,x,y\nc.tif,0,0,0,0\n", r"none of its 1 tiles is a readable TIFF .*no file"),
    ],
)
def test_bad_layouts_are_explained(tmp_path, text, expected):
    path = _layout(tmp_path, text)
    with pytest.raises(TileFolderError, match=expected) as info:
        open_tile_folder(tmp_path, path)
    assert str(path) in str(info.value)


def test_columns_in_any_order_extra_columns_blank_lines_and_a_bom_are_fine(tmp_path):
    path = _layout(tmp_path, "")
    path.write_text(
        "\ufeffY,x,note,tile,column,row\n0,0,first,a.tif,0,0\n\n5,60.5,,b.tif,1,0\n", encoding="utf-8"
    )
    tiles = open_tile_folder(tmp_path, path)
    assert [(t.tile, t.row, t.column, t.x, t.y, t.line) for t in tiles.tiles] == [
        ("a.tif", 0, 0, 0.0, 0.0, 2),
        ("b.tif", 0, 1, 60.5, 5.0, 4),
    ]
    assert (tiles.tiles[0].height, tiles.tiles[0].width) == (64, 64)


def test_missing_layout_and_folder_are_explained(tmp_path):
    with pytest.raises(TileFolderError, match="not a folder of tiles"):
        open_tile_folder(tmp_path / "nowhere", tmp_path / "layout.csv")
    with pytest.raises(TileFolderError, match="cannot read the layout CSV"):
        open_tile_folder(tmp_path, tmp_path / "layout.csv")


def test_missing_and_unreadable_tiles_are_skipped_and_named(tmp_path):
    """A layout row whose file is missing, not a TIFF or not 2-D is skipped with its reason; the rest
    is stitched. Tiles of different dtypes cannot be fused together: that stays an error."""
    path = _layout(tmp_path, "tile,row,column,x,y\na.tif,0,0,0,0\nb.tif,0,1,60,0\nc.tif,0,2,120,0\n")
    (tmp_path / "b.tif").write_bytes(b"not a tiff at all")
    tiles = open_tile_folder(tmp_path, path)
    assert [t.tile for t in tiles.tiles] == ["a.tif"]
    why = {s.tile: (s.line, s.reason) for s in tiles.skipped}
    assert why["b.tif"][0] == 3 and re.search(r"line 3: .*b\.tif is not a readable TIFF", why["b.tif"][1])
    assert why["c.tif"][0] == 4 and "no file" in why["c.tif"][1]
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((3, 64, 64), np.uint8))
    (reason,) = [s.reason for s in open_tile_folder(tmp_path, path).skipped if s.tile == "b.tif"]
    assert "holds an image of shape (3, 64, 64); tiles must be 2-D" in reason
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((64, 64), np.uint16))
    with pytest.raises(TileFolderError, match="share one dtype.*a.tif is uint8, b.tif is uint16"):
        open_tile_folder(tmp_path, path)


def test_truncated_pixel_data_is_reported_when_matching_and_the_rest_goes_on(tmp_path):
    write_montage(tmp_path, rows=1, columns=2, jitter=0.0)
    victim = tmp_path / "tile_r0_c1.tif"
    data = victim.read_bytes()
    tiles = open_tile_folder(tmp_path, tmp_path / "layout.csv")  # the header is intact …
    victim.write_bytes(data[: len(data) // 2])  # … the pixels are not
    report = match_tile_folder(tiles, workers=2)
    [(pair, why)] = report.unmatched
    assert pair.tile.tile == "tile_r0_c1.tif" and re.search(r"tile_r0_c1\.tif: cannot read its pixels", why)


# ----------------------------------------------------------------------------------------------------
# Pixel size from resolution tags, and the positions table


def test_pixel_size_from_resolution_tags(tmp_path):
    path = _layout(tmp_path, "tile,row,column,x,y\na.tif,0,0,0,0\n")
    assert open_tile_folder(tmp_path, path).pixel_size_nm is None  # tifffile writes no physical unit
    tifffile.imwrite(
        tmp_path / "a.tif",
        np.zeros((64, 64), np.uint8),
        resolution=(1e7 / 4, 1e7 / 4),
        resolutionunit="CENTIMETER",
    )
    assert open_tile_folder(tmp_path, path).pixel_size_nm == pytest.approx(4.0, rel=1e-6)
    tifffile.imwrite(
        tmp_path / "a.tif",
        np.zeros((64, 64), np.uint8),
        imagej=True,
        resolution=(1 / 3.9, 1 / 3.9),
        metadata={"unit": "nm"},
    )
    assert open_tile_folder(tmp_path, path).pixel_size_nm == pytest.approx(3.9, rel=1e-6)
    tifffile.imwrite(
        tmp_path / "a.tif", np.zeros((64, 64), np.uint8), resolution=(300, 300), resolutionunit="INCH"
    )
    assert open_tile_folder(tmp_path, path).pixel_size_nm is None  # a print resolution, not optics


def test_positions_are_written_atomically_beside_the_zarr(tmp_path):
    assert positions_path(tmp_path / "m.zarr") == tmp_path / "m.positions.csv"
    assert positions_path(tmp_path / "m") == tmp_path / "m.positions.csv"
    target = positions_path(tmp_path / "out" / "m.zarr")
    target.parent.mkdir()
    target.write_text("old")
    write_positions(target, {"a.tif": (0.0, 1.25), "b.tif": (460.5, -0.0004)})
    with target.open() as f:
        assert list(csv.reader(f)) == [
            ["tile", "x", "y"],
            ["a.tif", "0.000", "1.250"],
            ["b.tif", "460.500", "-0.000"],
        ]
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary left behind
