"""Montage previews (em_platform.stitch.previews): minimap, focus map, markdown for Dagster metadata."""

from __future__ import annotations

import base64

import imagecodecs
import numpy as np
import pytest
import zarr

from em_platform.imaging.ome_zarr import write_ome_zarr
from em_platform.stitch.previews import (
    MISSING_TILE_RGB,
    NO_TISSUE_RGB,
    focus_map_png,
    minimap_png,
    png_markdown,
)

NM2 = ("nanometer", "nanometer")


def halves_with_a_hole(shape):
    """Left half dark, right half bright (with texture), and a hole of zeros in the top-left corner."""
    rng = np.random.default_rng(0)
    image = np.empty(shape, np.uint8)
    half = shape[1] // 2
    image[:, :half] = rng.integers(40, 60, (shape[0], half))
    image[:, half:] = rng.integers(190, 210, (shape[0], shape[1] - half))
    image[: shape[0] // 4, : shape[1] // 4] = 0
    return image


def test_minimap_is_max_side_long_and_shows_the_image(tmp_path):
    url = str(tmp_path / "m.zarr")
    info = write_ome_zarr(halves_with_a_hole((600, 1000)), url, axes="yx", scale=(4, 4), units=NM2)
    assert [lv.shape for lv in info.levels] == [(600, 1000), (300, 500), (150, 250)]
    for fused in (url, info):
        png = minimap_png(fused, max_side=300)
        mini = imagecodecs.png_decode(png)
        assert mini.shape == (180, 300) and mini.dtype == np.uint8
    hole = mini[: 180 // 4 - 2, : 300 // 4 - 2]
    dark = mini[180 // 2 :, 10 : 300 // 2 - 10]
    bright = mini[:, 300 // 2 + 10 :]
    assert np.all(hole == 0)
    assert dark.max() < bright.min()
    assert bright.max() == 255 and np.median(dark) < 30  # stretched over the tiles' pixels, not the hole


def test_minimap_reads_the_coarsest_level_that_is_big_enough(tmp_path, monkeypatch):
    url = str(tmp_path / "m.zarr")
    write_ome_zarr(halves_with_a_hole((600, 1000)), url, axes="yx", scale=(4, 4), units=NM2)
    group = zarr.open_group(url, mode="r+")
    group["1"][...] = 0  # mark level 1 (300 x 500): a minimap made from it is all black
    group["1"][:, :250] = 30
    assert imagecodecs.png_decode(minimap_png(url, max_side=500)).shape == (300, 500)
    mini = imagecodecs.png_decode(minimap_png(url, max_side=400))
    assert mini.shape == (240, 400) and np.all(mini[:, 210:] == 0)  # from level 1, the marked level
    small = imagecodecs.png_decode(minimap_png(url, max_side=2000))  # larger than the image: level 0
    assert small.shape == (600, 1000) and small[300:, 800:].min() > 0


def test_minimap_refuses_what_is_not_an_ome_zarr_image(tmp_path):
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 4), dtype="u1")
    with pytest.raises(ValueError, match="plain.zarr is not a multiscale OME-Zarr image"):
        minimap_png(str(tmp_path / "plain.zarr"))
    with pytest.raises(ValueError, match="absent.zarr is not a multiscale OME-Zarr image"):
        minimap_png(str(tmp_path / "absent.zarr"))
    with pytest.raises(ValueError, match="max_side"):
        minimap_png(str(tmp_path / "plain.zarr"), max_side=0)


def test_focus_map_cells_colours_and_missing_tiles():
    grid = {(0, 0): 0.1, (0, 1): 0.5, (0, 2): 0.95, (1, 0): None, (1, 2): 0.3}  # (1, 1) never reported
    image = imagecodecs.png_decode(focus_map_png(grid, rows=2, cols=3, cell_px=8))
    assert image.shape == (16, 24, 3) and image.dtype == np.uint8
    cells = image[::8, ::8]
    assert np.all(image == np.repeat(np.repeat(cells, 8, axis=0), 8, axis=1))  # flat squares
    assert tuple(cells[1, 0]) == MISSING_TILE_RGB and tuple(cells[1, 1]) == MISSING_TILE_RGB
    sharp, middling, blurred = cells[0, 0].astype(int), cells[0, 1].astype(int), cells[0, 2].astype(int)
    assert sharp[1] > sharp[0] and blurred[0] > blurred[1]  # green for sharp, red for blurred
    assert middling[0] > sharp[0] and middling[1] > blurred[1]
    reported = [tuple(c) for c in cells.reshape(-1, 3)[[0, 1, 2, 5]]]
    assert MISSING_TILE_RGB not in reported and len(set(reported)) == 4


def test_a_tile_with_nothing_to_focus_on_is_not_painted_blurred():
    """Issue 26: a blank (beam off) or no-tissue tile scores ~1 (nothing sharp in it) and was painted the red
    the legend calls blurred; it has its own colour, unlike any point of the score's scale."""
    grid = {(0, 0): 0.98, (0, 1): 0.98, (0, 2): 0.1}
    cells = imagecodecs.png_decode(focus_map_png(grid, 1, 3, cell_px=1, no_tissue=[(0, 1)]))[0]
    assert tuple(cells[1]) == NO_TISSUE_RGB and tuple(cells[0]) != NO_TISSUE_RGB
    scale = imagecodecs.png_decode(focus_map_png({(0, c): c / 99 for c in range(100)}, 1, 100, cell_px=1))[
        0
    ].astype(int)
    assert np.abs(scale - np.array(NO_TISSUE_RGB)).sum(axis=1).min() > 100  # no score looks like it
    assert NO_TISSUE_RGB != MISSING_TILE_RGB
    with pytest.raises(ValueError, match=r"no-tissue tile \(row 3, column 0\) lies outside"):
        focus_map_png(grid, 1, 3, no_tissue=[(3, 0)])


def test_focus_map_score_range_spreads_the_colours():
    grid = {(0, 0): 0.4, (0, 1): 0.6}
    full = imagecodecs.png_decode(focus_map_png(grid, 1, 2, cell_px=1)).astype(int)
    narrow = imagecodecs.png_decode(focus_map_png(grid, 1, 2, cell_px=1, score_range=(0.4, 0.6))).astype(int)
    assert np.abs(narrow[0, 0] - narrow[0, 1]).sum() > np.abs(full[0, 0] - full[0, 1]).sum()
    top = imagecodecs.png_decode(focus_map_png({(0, 0): 1.0}, 1, 1, cell_px=1))
    assert tuple(narrow[0, 1]) == tuple(top[0, 0])  # the top of the range takes the end colour


@pytest.mark.parametrize(
    ("grid", "kwargs", "message"),
    [
        ({(0, 0): 23.2}, {}, r"focus score 23.2 of tile \(row 0, column 0\) is not in \[0, 1\]"),
        ({(0, 0): float("nan")}, {}, "not in"),
        ({(2, 0): 0.5}, {}, r"\(row 2, column 0\) lies outside the 2x2 grid"),
        ({}, {"cell_px": 0}, "cell_px must be"),
        ({}, {"score_range": (0.6, 0.4)}, "score_range"),
    ],
)
def test_focus_map_bad_input(grid, kwargs, message):
    with pytest.raises(ValueError, match=message):
        focus_map_png(grid, 2, 2, **kwargs)


def test_png_markdown_is_an_inline_data_uri():
    png = focus_map_png({(0, 0): 0.5}, 1, 1)
    md = png_markdown(png, alt="focus [map]\nmontage 7")
    prefix = "![focus (map) montage 7](data:image/png;base64,"
    assert md.startswith(prefix) and md.endswith(")")
    assert base64.b64decode(md[len(prefix) : -1]) == png
