"""Seams measured on the pixels the fusion blends: how far apart two neighbours' images still are where they
overlap in the fused montage.

For each neighbour pair, both tiles are resampled into their shared region of the montage exactly as
:func:`~em_platform.stitch.fuse.fuse_montage` places them (full transform, lens correction), and the
offset between the two renderings is measured by phase correlation (OpenCV ``phaseCorrelate``, Hann
window, sub-pixel). A sound montage shows offsets of a few hundredths of a pixel; a tear, a wrong match
or a tile the stage placed shows pixels, whatever the solver's residuals claim. Pairs whose shared
region is too small, or whose correlation peak is too weak to trust (blank resin), are reported as such
rather than as good.

Dagster-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = ["SEAM_LIMIT_PX", "SeamMeasure", "measure_seams"]

SEAM_LIMIT_PX = 1.0  # offset in the fused image beyond which a seam shows
MIN_RESPONSE = 0.05  # phase-correlation peak below this: nothing to measure (flat or blank overlap)


@dataclass(frozen=True)
class SeamMeasure:
    tile: Any
    neighbour: Any
    offset_px: float | None  # None: not measurable (too small or featureless)
    response: float
    shared_px: int


def _render(image: np.ndarray, matrix: np.ndarray, lens: Any, box: tuple[int, int, int, int]) -> np.ndarray:
    """``image`` resampled into montage box (x0, y0, x1, y1) by tile→montage ``matrix`` (after ``lens``)."""
    x0, y0, x1, y1 = box
    gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    a_inv = np.linalg.inv(matrix[:, :2])
    ux = a_inv[0, 0] * (gx - matrix[0, 2]) + a_inv[0, 1] * (gy - matrix[1, 2])
    uy = a_inv[1, 0] * (gx - matrix[0, 2]) + a_inv[1, 1] * (gy - matrix[1, 2])
    if lens is not None:
        xy = lens.distort(np.column_stack([ux.ravel(), uy.ravel()]))
        ux, uy = xy[:, 0].reshape(ux.shape), xy[:, 1].reshape(uy.shape)
    return cv2.remap(
        image.astype(np.float32), ux.astype(np.float32), uy.astype(np.float32), cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_REPLICATE,
    )  # fmt: skip


def measure_seams(
    pairs: Iterable[tuple[Any, Any]],
    transforms: Mapping[Any, np.ndarray],
    read: Any,
    shapes: Mapping[Any, tuple[int, int]],
    *,
    lens: Any = None,
    margin_px: int = 4,
    min_shared_px: int = 12,
) -> list[SeamMeasure]:
    """Measure every pair's seam. ``read(tile)`` returns the tile's pixels; ``shapes`` are (height, width).
    Each tile is read once per pair it is in (callers with thousands of tiles pass a caching reader)."""
    if lens is not None and lens.is_identity():
        lens = None
    out = []
    for a, b in pairs:
        boxes = []
        for t in (a, b):
            m = np.asarray(transforms[t], np.float64)
            h, w = shapes[t]
            corners = (
                np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], np.float64) @ m[:, :2].T + m[:, 2]
            )
            boxes.append((corners.min(axis=0), corners.max(axis=0)))
        lo = np.ceil(np.maximum(boxes[0][0], boxes[1][0]) + margin_px).astype(int)
        hi = np.floor(np.minimum(boxes[0][1], boxes[1][1]) - margin_px).astype(int)
        size = hi - lo
        if (size < min_shared_px).any():
            out.append(SeamMeasure(a, b, None, 0.0, int(max(0, size[0]) * max(0, size[1]))))
            continue
        box = (int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))
        ra = _render(read(a), np.asarray(transforms[a], np.float64), lens, box)
        rb = _render(read(b), np.asarray(transforms[b], np.float64), lens, box)
        window = cv2.createHanningWindow((ra.shape[1], ra.shape[0]), cv2.CV_32F)
        (dx, dy), response = cv2.phaseCorrelate(ra - ra.mean(), rb - rb.mean(), window)
        offset = float(np.hypot(dx, dy)) if response >= MIN_RESPONSE else None
        out.append(SeamMeasure(a, b, offset, float(response), int(size[0] * size[1])))
    return out
