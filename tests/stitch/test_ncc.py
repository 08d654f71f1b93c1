"""The FFT correlation is OpenCV's TM_CCOEFF_NORMED: same values to float32 round-off, same peaks, same
treatment of flat windows."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from em_platform.stitch.ncc import ncc


def _em_like(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    smooth = cv2.GaussianBlur(rng.random(shape, dtype=np.float32), (0, 0), 2) * 255
    return (smooth + rng.normal(0, 20, shape)).astype(np.float32)


@pytest.mark.parametrize(
    ("search", "template"),
    [
        ((448, 448), (384, 384)),
        ((200, 300), (150, 211)),
        ((97, 101), (64, 64)),
        ((40, 50), (8, 9)),
        ((64, 64), (64, 64)),
    ],
)
def test_values_and_peak_are_opencvs(search, template):
    rng = np.random.default_rng(sum(search) + sum(template))
    image = _em_like(rng, (search[0] + 50, search[1] + 50))
    s = np.ascontiguousarray(image[: search[0], : search[1]])
    y, x = (search[0] - template[0]) // 3, (search[1] - template[1]) // 2
    t = np.ascontiguousarray(s[y : y + template[0], x : x + template[1]]) + rng.normal(0, 5, template).astype(
        np.float32
    )
    expected = cv2.matchTemplate(s, t, cv2.TM_CCOEFF_NORMED)
    got = ncc(s, t)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=3e-5)  # float32 transforms: round-off ~1e-5
    assert np.unravel_index(got.argmax(), got.shape) == (y, x)


def test_uint8_strips_with_flat_windows_are_zero_there_as_in_opencv():
    rng = np.random.default_rng(3)
    s = _em_like(rng, (300, 300)).clip(0, 255).astype(np.uint8).astype(np.float32)
    s[:, :120] = 17  # a blank stretch: windows wholly inside it have no variance
    t = np.ascontiguousarray(s[100:200, 150:250])
    expected = cv2.matchTemplate(s, t, cv2.TM_CCOEFF_NORMED)
    got = ncc(s, t)
    assert (got[:, :20] == 0).all()
    np.testing.assert_allclose(got, np.nan_to_num(expected), atol=3e-5)


@pytest.mark.parametrize(("search", "template"), [((448, 448), (384, 384)), ((120, 90), (64, 40))])
def test_grey_values_as_uint8_give_the_float32_values_and_opencvs(search, template):
    """uint8 goes through OpenCV's integer integral images: exact sums, so the values are those of the same
    grey values as float32 (flat windows included) and OpenCV's on the uint8 images."""
    rng = np.random.default_rng(sum(search))
    s = _em_like(rng, search).clip(0, 255).astype(np.uint8)
    s[: search[0] // 2, : template[1] // 2 + 5] = 200  # a saturated corner: some flat windows
    t = np.ascontiguousarray(s[7 : 7 + template[0], 9 : 9 + template[1]])
    got = ncc(s, t)
    np.testing.assert_array_equal(got, ncc(s.astype(np.float32), t.astype(np.float32)))
    np.testing.assert_allclose(got, cv2.matchTemplate(s, t, cv2.TM_CCOEFF_NORMED), atol=3e-5)
    assert np.unravel_index(got.argmax(), got.shape) == (7, 9)


def test_a_template_larger_than_the_search_window_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        ncc(np.zeros((10, 10), np.float32), np.zeros((11, 5), np.float32))
