"""OpenCV's 8-bit CLAHE, pixel for pixel, in under a third of its CPU: the largest stage of the live tile chain.

OpenCV (``cv2.createCLAHE(...).apply``, docs/seed-systems.md §1.2) builds one 256-entry lookup table
per contextual tile (histogram, clip at ``clip_limit · tile area / 256``, redistribute, cumulate) and maps
every pixel through the bilinear blend of its four nearest tiles' tables. Its blend loop reads four
``uint8`` table entries per pixel and converts each to float: 3.3 ns a pixel on a znver4 core,
82 of the ~190 ms of CPU a 5000² tile costs (issue 38). Here the tables are float32 rows and the blend does
the same float32 operations in the same order, eight pixels a step where the CPU has AVX2
(:mod:`em_platform.tem.clahe_avx2`: one gather of the four entries packed in a word), one by one
elsewhere; so every output pixel is OpenCV's (tested against ``cv2`` on noise, EM-like tiles, odd sizes,
grids and clip limits, both blends); the tile histograms are counted eight pixels a load
(:mod:`em_platform.tem.byte_counts`). 5000² uint8, one thread, on a znver3 core: 34 ms against OpenCV's
116 (the blend one by one: 63).

Given a flatfield's gain and offset, the correction is made in the histograms' pass, row by row: the
200 MB of float32 gain and offset a 5000² tile reads stream in while the counting runs (21.5 ms for
both against 15 + 12.5 apart), and each pixel is :meth:`~em_platform.tem.tile_processing.Flatfield.apply`'s.

Compiled by numba on first use (about 1.5 s, cached on disk where the package folder or numba's cache
folder is writable; :func:`em_platform.tem.tile_tasks.warm_up` pays it before the first tile).
"""

from __future__ import annotations

import numpy as np

from em_platform.tem.byte_counts import count_row, jit
from em_platform.tem.clahe_avx2 import AVX2, blend8, pack_band

__all__ = ["clahe_u8"]

_BINS = 256


def clahe_u8(
    image: np.ndarray,
    clip_limit: float,
    grid: tuple[int, int],
    out: np.ndarray,
    *,
    flatfield: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """``cv2.createCLAHE(clip_limit, grid).apply(image)`` into ``out`` (may be ``image``): a C-contiguous
    2-D uint8 ``image``, ``grid`` as (columns, rows) of contextual tiles. With ``flatfield`` (C-contiguous
    float32 gain and offset of the image's shape) the image is corrected first, ``rint(image · gain +
    offset)`` saturated to uint8, into ``out``."""
    tiles_x, tiles_y = grid
    h, w = image.shape
    if w % tiles_x == 0 and h % tiles_y == 0:
        tile_w, tile_h = w // tiles_x, h // tiles_y
    else:  # OpenCV pads (reflect-101, for the tables only) by tiles − size % tiles on *both* axes
        tile_w, tile_h = (w + tiles_x - w % tiles_x) // tiles_x, (h + tiles_y - h % tiles_y) // tiles_y
    area = tile_w * tile_h
    clip = max(int(clip_limit * area / _BINS), 1) if clip_limit > 0 else 0
    if flatfield is None:
        histograms = _tile_histograms(image, tiles_x, tiles_y, tile_w, tile_h)
    else:
        histograms = _corrected_tile_histograms(image, *flatfield, out, tiles_x, tiles_y, tile_w, tile_h)
        image = out
    tables = _lookup_tables(histograms, clip, np.float32(_BINS - 1) / np.float32(area))
    _blend_tables(image, out, tables.reshape(tiles_y, tiles_x * _BINS), tiles_x, tiles_y, tile_w, tile_h)
    return out


@jit
def _reflect101(p, n):
    """OpenCV's ``borderInterpolate`` for ``BORDER_REFLECT_101`` (…, 2, 1 | 0, 1, …, n−1 | n−2, …)."""
    if n == 1:
        return 0
    while p < 0 or p >= n:
        p = -p if p < 0 else 2 * (n - 1) - p
    return p


@jit
def _count_row(row, counts, tiles_x, tile_w):
    """Add an image row to its tile row's counters (:func:`~em_platform.tem.byte_counts.count_row`), the
    padded columns included."""
    w = row.shape[0]
    count_row(row, counts, tiles_x, tile_w)
    for xe in range(w, tiles_x * tile_w):  # the padded columns
        counts[0, (xe // tile_w) * 256 + row[_reflect101(xe, w)]] += 1


@jit
def _tile_histograms(src, tiles_x, tiles_y, tile_w, tile_h):
    """(tiles_y · tiles_x, 256) counts of each contextual tile of the reflect-101 padded image."""
    h = src.shape[0]
    counts = np.zeros((tiles_y, 4, tiles_x * 256), np.int32)
    for ye in range(tiles_y * tile_h):
        _count_row(src[_reflect101(ye, h)], counts[ye // tile_h], tiles_x, tile_w)
    total = counts[:, 0] + counts[:, 1] + counts[:, 2] + counts[:, 3]
    return total.reshape(tiles_y * tiles_x, 256)


@jit
def _corrected_tile_histograms(raw, gain, offset, out, tiles_x, tiles_y, tile_w, tile_h):
    """:func:`_tile_histograms` of the flatfield-corrected image, written into ``out`` on the way: the
    float32 product and sum of OpenCV's ``multiply`` and ``add``, rounded half to even and saturated."""
    h, w = raw.shape
    counts = np.zeros((tiles_y, 4, tiles_x * 256), np.int32)
    low, high = np.float32(0), np.float32(255)
    for y in range(h):
        r, g, o, d = raw[y], gain[y], offset[y], out[y]
        for x in range(w):  # vectorised by LLVM: the row is corrected first, then counted from L1
            d[x] = np.uint8(min(max(np.rint(np.float32(r[x]) * g[x] + o[x]), low), high))
        _count_row(d, counts[y // tile_h], tiles_x, tile_w)
    for ye in range(h, tiles_y * tile_h):  # the padded rows, from the corrected rows they mirror
        _count_row(out[_reflect101(ye, h)], counts[ye // tile_h], tiles_x, tile_w)
    total = counts[:, 0] + counts[:, 1] + counts[:, 2] + counts[:, 3]
    return total.reshape(tiles_y * tiles_x, 256)


@jit
def _lookup_tables(histograms, clip, scale):
    """Each tile's table as OpenCV's ``CLAHE_CalcLut_Body`` makes it, as float32 (exact: values 0…255)."""
    n = histograms.shape[0]
    tables = np.empty((n, 256), np.float32)
    hist = np.empty(256, np.int64)
    for k in range(n):
        hist[:] = histograms[k]
        if clip > 0:
            clipped = 0
            for i in range(256):
                if hist[i] > clip:
                    clipped += hist[i] - clip
                    hist[i] = clip
            batch = clipped // 256
            residual = clipped - batch * 256
            hist += batch
            if residual:
                step = max(256 // residual, 1)
                i = 0
                while i < 256 and residual > 0:
                    hist[i] += 1
                    i += step
                    residual -= 1
        total = 0
        for i in range(256):
            total += hist[i]
            # int · float in float32, rounded half to even and saturated as cv::saturate_cast<uchar>
            v = np.rint(np.float32(total) * scale)
            tables[k, i] = min(max(v, np.float32(0)), np.float32(255))
    return tables


@jit
def _column_weights(w, tiles_x, tile_w):
    """Per column: the left and right tile tables' offsets (· 256), their pair's index · 256 (for
    :func:`~em_platform.tem.clahe_avx2.pack_band`) and the blend weights ``xa``, ``1 − xa``, as OpenCV
    computes them."""
    inv_w = np.float32(1.0) / np.float32(tile_w)
    left = np.empty(w, np.int32)
    right = np.empty(w, np.int32)
    pair = np.empty(w, np.int32)
    xa = np.empty(w, np.float32)
    xa1 = np.empty(w, np.float32)
    for x in range(w):
        txf = np.float32(x) * inv_w - np.float32(0.5)
        tx = int(np.floor(txf))
        xa[x] = txf - np.float32(tx)
        xa1[x] = np.float32(1.0) - xa[x]
        left[x] = max(tx, 0) * 256
        right[x] = min(tx + 1, tiles_x - 1) * 256
        pair[x] = (tx + 1) * 256
    return left, right, pair, xa, xa1


@jit
def _row_weights(y, tiles_y, tile_h):
    """The row's upper and lower tile rows and its blend weights ``ya``, ``1 − ya``, as OpenCV's."""
    tyf = np.float32(y) * (np.float32(1.0) / np.float32(tile_h)) - np.float32(0.5)
    ty = int(np.floor(tyf))
    ya = tyf - np.float32(ty)
    return max(ty, 0), min(ty + 1, tiles_y - 1), ya, np.float32(1.0) - ya


@jit
def _blend_pixels(row, dst, above, below, left, right, xa, xa1, ya, ya1, start, end):
    """Pixels ``start … end − 1`` of a row, four table reads each: OpenCV's float32 products and sums
    in its order."""
    for x in range(start, end):
        v = np.int32(row[x])
        i1 = left[x] + v
        i2 = right[x] + v
        res = (above[i1] * xa1[x] + above[i2] * xa[x]) * ya1 + (below[i1] * xa1[x] + below[i2] * xa[x]) * ya
        dst[x] = np.uint8(np.int32(np.rint(res)))  # a blend of 0…255: never outside, no saturation


@jit
def _interpolate(src, out, tables, tiles_x, tiles_y, tile_w, tile_h):
    """OpenCV's ``CLAHE_Interpolation_Body``, every pixel's four table entries read one by one."""
    h, w = src.shape
    left, right, _, xa, xa1 = _column_weights(w, tiles_x, tile_w)
    for y in range(h):
        upper, lower, ya, ya1 = _row_weights(y, tiles_y, tile_h)
        _blend_pixels(src[y], out[y], tables[upper], tables[lower], left, right, xa, xa1, ya, ya1, 0, w)


@jit
def _interpolate_avx2(src, out, tables, tiles_x, tiles_y, tile_w, tile_h):
    """:func:`_interpolate`, eight pixels a step from packed tables (:mod:`~em_platform.tem.clahe_avx2`)."""
    h, w = src.shape
    left, right, pair, xa, xa1 = _column_weights(w, tiles_x, tile_w)
    packed = np.empty((tiles_x + 1) * 256, np.uint32)
    packed_for = -1
    whole = w - w % 8
    for y in range(h):
        upper, lower, ya, ya1 = _row_weights(y, tiles_y, tile_h)
        if upper * tiles_y + lower != packed_for:
            pack_band(tables[upper], tables[lower], packed, tiles_x)
            packed_for = upper * tiles_y + lower
        row, dst = src[y], out[y]
        for x in range(0, whole, 8):
            # an intrinsic called from jitted code: numba types the call, its Python __call__ stub does not fit
            blend8(row, pair, xa, xa1, packed, ya, ya1, dst, x)  # type: ignore[call-arg]
        _blend_pixels(row, dst, tables[upper], tables[lower], left, right, xa, xa1, ya, ya1, whole, w)


_blend_tables = _interpolate_avx2 if AVX2 else _interpolate
