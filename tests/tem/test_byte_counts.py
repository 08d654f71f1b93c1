"""The compiled grey-value counts are exact: every pixel once, in its own segment, whatever the width."""

from __future__ import annotations

import numpy as np
import pytest

from em_platform.tem import byte_counts


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (17, 1001), (64, 4096), (2, 9)])
def test_histogram_is_numpys_count_at_any_width(shape):
    rng = np.random.default_rng(shape[1])
    for image in (
        rng.integers(0, 256, shape, dtype=np.uint8),
        np.clip(rng.normal(200, 40, shape), 0, 255).astype(np.uint8),  # runs of equal and saturated values
        np.full(shape, 255, np.uint8),
    ):
        expected = np.bincount(image.ravel(), minlength=256)
        got = byte_counts.histogram_u8(image)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected)


def test_histogram_of_a_strided_view_counts_the_view():
    image = np.random.default_rng(1).integers(0, 256, (40, 90), dtype=np.uint8)
    view = image[3:, 5:77:2]  # neither contiguous nor starting on a word
    np.testing.assert_array_equal(byte_counts.histogram_u8(view), np.bincount(view.ravel(), minlength=256))


def test_histogram_empties_its_32_bit_counters_in_time():
    """A 2**31-pixel image is too large for a test: the counters are emptied every 3 rows here instead."""
    image = np.random.default_rng(2).integers(0, 256, (10, 33), dtype=np.uint8)
    np.testing.assert_array_equal(byte_counts._histogram(image, 3), np.bincount(image.ravel(), minlength=256))


def test_histogram_refuses_what_is_not_a_2d_uint8_image():
    with pytest.raises(ValueError, match="2-D uint8"):
        byte_counts.histogram_u8(np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError, match="2-D uint8"):
        byte_counts.histogram_u8(np.zeros(16, np.uint8))


@pytest.mark.parametrize(("width", "segment_w"), [(5000, 625), (37, 5), (64, 8), (23, 23), (10, 3)])
def test_row_segments_count_only_their_own_pixels(width, segment_w):
    row = np.random.default_rng(width).integers(0, 256, width, dtype=np.uint8)
    segments = -(-width // segment_w)
    counts = np.zeros((4, segments * 256), np.int32)
    byte_counts.count_row(row, counts, segments, segment_w)
    byte_counts.count_row(row, counts, segments, segment_w)  # counts add up
    total = counts.sum(axis=0).reshape(segments, 256)
    for s in range(segments):
        part = row[s * segment_w : (s + 1) * segment_w]
        np.testing.assert_array_equal(total[s], 2 * np.bincount(part, minlength=256))


def test_compiles_without_a_disk_cache_where_numba_can_write_none(monkeypatch):
    njit = byte_counts.numba.njit

    def no_cache_folder(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return njit(*args, **kwargs)

    monkeypatch.setattr(byte_counts.numba, "njit", no_cache_folder)

    def double(x):
        return 2 * x

    compiled = byte_counts.jit(double)
    assert compiled(21) == 42
    assert type(compiled._cache).__name__ == "NullCache"  # compiled in memory only
