"""The compiled 8-bit CLAHE gives OpenCV's output pixel for pixel, whatever the size, grid and clip limit,
with either blend of the tables: eight pixels a step (AVX2) and one by one (every other CPU)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from em_platform.tem import clahe_u8
from em_platform.tem.clahe_avx2 import AVX2
from em_platform.tem.tile_processing import Flatfield, clahe, flatfield_and_clahe

BLENDS = {"one by one": clahe_u8._interpolate, "eight at a time (AVX2)": clahe_u8._interpolate_avx2}


@pytest.fixture(params=list(BLENDS))
def blend(request, monkeypatch):
    """Each blend of the tables in turn, as the one :func:`clahe_u8.clahe_u8` uses."""
    if request.param.endswith("(AVX2)") and not AVX2:
        pytest.skip("numba does not compile for AVX2 here: the tables are read one by one on this CPU")
    monkeypatch.setattr(clahe_u8, "_blend_tables", BLENDS[request.param])
    return request.param


def test_the_cpu_gets_the_vectorised_blend_where_it_has_avx2():
    assert clahe_u8._blend_tables is (clahe_u8._interpolate_avx2 if AVX2 else clahe_u8._interpolate)


def _images(rng: np.random.Generator, h: int, w: int):
    yield "uniform noise", rng.integers(0, 256, (h, w), dtype=np.uint8)
    yield "narrow histogram", np.clip(rng.normal(128, 6, (h, w)), 0, 255).astype(np.uint8)
    yield "flat", np.full((h, w), int(rng.integers(0, 256)), np.uint8)
    yield (
        "saturated ramp",
        np.clip(np.arange(w)[None, :] * 3 - 40 + np.zeros((h, 1)), 0, 255).astype(np.uint8),
    )


@pytest.mark.parametrize("seed", range(6))
def test_matches_opencv_on_random_sizes_grids_and_clip_limits(seed, blend):
    rng = np.random.default_rng(seed)
    for _ in range(8):
        # sizes that divide the grid and sizes that do not (OpenCV pads both axes then), tiles of one pixel,
        # images smaller than the grid, no clip limit (0, negative) and a huge one
        h, w = (int(v) for v in rng.integers(1, 260, 2))
        grid = (int(rng.integers(1, 20)), int(rng.integers(1, 20)))
        clip = float(rng.choice([-1.0, 0.0, 0.3, 1.0, 2.0, 3.7, 40.0]))
        for kind, image in _images(rng, h, w):
            expected = cv2.createCLAHE(clip, grid).apply(image)
            got = clahe(image, clip, grid)
            assert np.array_equal(got, expected), (
                kind,
                image.shape,
                grid,
                clip,
                int((got != expected).sum()),
            )


def test_matches_opencv_on_a_camera_sized_tile_in_place(blend):
    rng = np.random.default_rng(7)
    # EM-like: smooth structure, shot noise and vignetting, 5000² like the Allen cameras (pads to 5008)
    structure = cv2.GaussianBlur(rng.random((5000, 5000), dtype=np.float32), (0, 0), 3)
    structure = (structure - structure.min()) / np.ptp(structure)
    yy, xx = np.mgrid[-1:1:5000j, -1:1:5000j].astype(np.float32)
    tile = 40 + 150 * structure * (1 - 0.3 * (xx**2 + yy**2)) + rng.normal(0, 8, structure.shape)
    tile = np.clip(tile, 0, 255).astype(np.uint8)
    expected = cv2.createCLAHE(2.0, (16, 16)).apply(tile)
    assert clahe(tile, out=tile) is tile
    np.testing.assert_array_equal(tile, expected)


@pytest.mark.parametrize(("shape", "grid"), [((500, 777), (16, 16)), ((64, 48), (8, 4)), ((9, 7), (16, 16))])
def test_flatfield_in_clahes_first_pass_is_the_flatfield_then_clahe(shape, grid, blend):
    rng = np.random.default_rng(sum(shape))
    bright = rng.integers(120, 250, shape).astype(np.float32)
    dark = rng.uniform(0, 40, shape).astype(np.float32)
    bright[0, :3] = dark[0, :3]  # dead pixels: gain 1
    flatfield = Flatfield.from_references(bright, dark)
    raw = rng.integers(0, 256, shape, dtype=np.uint8)
    raw[1, :5] = 255  # saturates after the gain
    expected = cv2.createCLAHE(2.0, grid).apply(flatfield.apply(raw))
    got = flatfield_and_clahe(raw, flatfield, 2.0, grid)
    np.testing.assert_array_equal(got, expected)
    assert got is not raw and np.array_equal(raw[1, :5], [255] * 5)  # the raw tile is left as it was
    np.testing.assert_array_equal(
        flatfield_and_clahe(raw, None, 2.0, grid), cv2.createCLAHE(2.0, grid).apply(raw)
    )
    wide = rng.integers(0, 4096, shape, dtype=np.uint16)  # uint16: the flatfield, then OpenCV's CLAHE
    wide_flatfield = Flatfield.from_references(bright * 16, dark * 16)
    np.testing.assert_array_equal(
        flatfield_and_clahe(wide, wide_flatfield, 2.0, grid),
        cv2.createCLAHE(2.0, grid).apply(wide_flatfield.apply(wide)),
    )
    with pytest.raises(ValueError, match="wrong camera"):
        flatfield_and_clahe(raw[:-1], flatfield, 2.0, grid)
