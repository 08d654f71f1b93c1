"""``em-platform stitch TILES_DIR --layout LAYOUT.csv --out OUT.zarr`` end to end on a synthetic montage."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import zarr

from em_platform.cli import main
from tests.stitch.test_tile_folder import SIZE, rms_error, write_montage


def read_positions(path) -> dict[str, tuple[float, float]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["tile"]: (float(r["x"]), float(r["y"])) for r in rows}


def multiscale(url) -> tuple[zarr.Array, list[float]]:
    group = zarr.open_group(str(url), mode="r")
    ms = group.attrs["ome"]["multiscales"][0]
    first = ms["datasets"][0]
    scale = next(t["scale"] for t in first["coordinateTransformations"] if t["type"] == "scale")
    return group[first["path"]], scale


def test_stitch_writes_the_fused_zarr_and_the_positions(tmp_path, capsys):
    tiles = tmp_path / "tiles"
    truth = write_montage(tiles, rows=2, columns=3, pixel_size_nm=4.0)
    out = tmp_path / "out" / "montage.zarr"
    assert (
        main(
            ["stitch", str(tiles), "--layout", str(tiles / "layout.csv"), "--out", str(out), "--workers", "2"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "edges matched: 7 of 7 neighbour pairs" in printed
    assert "pixel size:    4 nm (the TIFF resolution tags)" in printed

    assert sorted(p.name for p in out.parent.iterdir()) == [
        "montage.matches.json",
        "montage.positions.csv",
        "montage.report.json",
        "montage.tilespecs.json",
        "montage.zarr",
    ]
    report = json.loads((tmp_path / "out" / "montage.report.json").read_text())
    assert report["passed"] and report["tiles"]["unplaced"] == [] and report["tiles"]["skipped"] == []
    positions = read_positions(tmp_path / "out" / "montage.positions.csv")
    assert list(positions) == list(truth)  # layout order
    assert rms_error(positions, truth) <= 0.3

    level0, scale = multiscale(out)
    assert scale == pytest.approx([4.0, 4.0])
    xy = np.array(list(positions.values()))
    extent = np.rint(xy).max(axis=0) - np.rint(xy).min(axis=0) + SIZE  # (width, height)
    assert level0.shape == pytest.approx((extent[1], extent[0]), abs=1)
    # the top-left tile's corner, away from every overlap, is that tile's pixels
    first = tifffile.imread(tiles / "tile_r0_c0.tif")
    corner = np.rint(np.subtract(positions["tile_r0_c0.tif"], xy.min(axis=0))).astype(int)
    x0, y0 = corner
    assert np.array_equal(level0[y0 + 8 : y0 + 72, x0 + 8 : x0 + 72], first[8:72, 8:72])


def test_pixel_size_option_overrides_the_tags(tmp_path, capsys):
    tiles = tmp_path / "tiles"
    write_montage(tiles, rows=1, columns=2)
    out = tmp_path / "m.zarr"
    args = ["stitch", str(tiles), "--layout", str(tiles / "layout.csv"), "--out", str(out)]
    assert main(args) == 0
    assert "1 nm recorded, give --pixel-size-nm" in capsys.readouterr().out
    assert multiscale(out)[1] == pytest.approx([1.0, 1.0])
    assert main([*args, "--pixel-size-nm", "3.5"]) == 0
    assert multiscale(out)[1] == pytest.approx([3.5, 3.5])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda text: text.replace("tile,row,column,x,y", "tile,row,col,x,y"),
            "line 1: missing column(s) column",
        ),
        (lambda text: text.replace(",0,1,", ",0,0,"), "line 3: duplicate grid cell (row 0, column 0)"),
    ],
)
def test_bad_input_exits_2_with_the_reason_and_writes_nothing(tmp_path, capsys, edit, message):
    tiles = tmp_path / "tiles"
    write_montage(tiles, rows=1, columns=2)
    layout = tiles / "layout.csv"
    layout.write_text(edit(layout.read_text()))
    out = tmp_path / "m.zarr"
    assert main(["stitch", str(tiles), "--layout", str(layout), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("em-platform stitch: ") and message in err and str(layout) in err
    assert list(tmp_path.iterdir()) == [tiles]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--pixel-size-nm", "0"], "--pixel-size-nm must be positive"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--max-shift-px", "-3"], "--max-shift-px must be at least 1"),
    ],
)
def test_bad_options_exit_2(tmp_path, capsys, option, message):
    tiles = tmp_path / "tiles"
    write_montage(tiles, rows=1, columns=2)
    assert (
        main(
            [
                "stitch",
                str(tiles),
                "--layout",
                str(tiles / "layout.csv"),
                "--out",
                str(tmp_path / "m.zarr"),
                *option,
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err


def test_a_failed_fusion_leaves_neither_output_nor_positions(tmp_path, monkeypatch):
    import em_platform.stitch.fuse as fuse

    real = fuse.fuse_montage

    def fail_after_writing(tiles, source, url, **kwargs):
        real(tiles, source, url, **kwargs)  # a complete store under the temporary name …
        raise OSError("disk full")  # … and then the run dies

    monkeypatch.setattr(fuse, "fuse_montage", fail_after_writing)
    tiles = tmp_path / "tiles"
    write_montage(tiles, rows=1, columns=2)
    out = tmp_path / "out" / "m.zarr"
    with pytest.raises(OSError, match="disk full"):
        main(["stitch", str(tiles), "--layout", str(tiles / "layout.csv"), "--out", str(out)])
    assert list(out.parent.iterdir()) == []
