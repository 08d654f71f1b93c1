"""Counting the grey values of 8-bit images, compiled: a tile's 256-bin histogram and CLAHE's tile histograms.

An increment of a counter is a load and a store; on some x86 cores (seen on a KVM "AMD EPYC", znver1) a
byte load of the next pixel waits behind those stores, and counting took 3 ns a pixel: ``cv2.calcHist`` 77 ms
for a 5000² tile. Reading eight pixels in one 64-bit load, then counting them into four interleaved counters
(neighbouring pixels often share a value, and one counter would make each increment wait for the last),
counts the same tile in 10-14 ms there.

Compiled by numba on first use, cached on disk where it can be (:func:`jit`).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["count_row", "histogram_u8", "jit"]


def jit(function):
    """``numba.njit`` without the GIL, cached on disk where numba finds a writable folder for it (it refuses
    ``cache=True`` when there is none: then compiled anew in each process). Numba checks only the
    cached function's own file for changes: after editing a kernel that another file's function calls
    (``count_row``, :mod:`em_platform.tem.clahe_avx2`), delete ``em_platform/tem/__pycache__/*.nb?``."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(function)


@jit
def count_row(row, counts, segments, segment_w):
    """Add ``row`` (1-D uint8, contiguous) to ``counts`` (4 × segments·256 int32 or int64): pixels
    ``[s·segment_w, (s+1)·segment_w)`` go to segment ``s``'s 256 bins, in four interleaved counters."""
    w = row.shape[0]
    c0, c1, c2, c3 = counts[0], counts[1], counts[2], counts[3]
    # word k holds pixels 8k … 8k+7, its low byte first (numba's platforms are all little-endian)
    words = row[: w - w % 8].view(np.uint64)
    for s in range(segments):
        base = s * 256
        x = s * segment_w
        end = min(x + segment_w, w)
        while x < end and x % 8:
            c0[base + row[x]] += 1
            x += 1
        while x + 8 <= end:
            word = words[x >> 3]
            c0[base + (word & 255)] += 1
            c1[base + ((word >> 8) & 255)] += 1
            c2[base + ((word >> 16) & 255)] += 1
            c3[base + ((word >> 24) & 255)] += 1
            c0[base + ((word >> 32) & 255)] += 1
            c1[base + ((word >> 40) & 255)] += 1
            c2[base + ((word >> 48) & 255)] += 1
            c3[base + (word >> 56)] += 1
            x += 8
        while x < end:
            c0[base + row[x]] += 1
            x += 1


@jit
def _histogram(image, rows):
    """Counted in 32-bit counters (faster), emptied into 64-bit totals every ``rows`` rows."""
    h, w = image.shape
    total = np.zeros(256, np.int64)
    counts = np.zeros((4, 256), np.int32)
    for y in range(h):
        count_row(image[y], counts, 1, w)
        if (y + 1) % rows == 0 or y == h - 1:
            for c in range(4):
                total += counts[c]
            counts[:] = 0
    return total


def histogram_u8(image: np.ndarray) -> np.ndarray:
    """Exact 256-bin counts (int64) of a 2-D uint8 image, of any size."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"histogram_u8 needs a 2-D uint8 image, got {image.dtype} of shape {image.shape}")
    rows = max(1, (2**31 - 1) // max(image.shape[1], 1))  # before a counter could overflow
    return _histogram(np.ascontiguousarray(image), rows)
