"""Seams measured on the pixels the fusion blends: how far apart two neighbours' images still are where they
overlap in the fused montage.

For each neighbour pair, both tiles are resampled into their shared region of the montage exactly as
:func:`~em_platform.stitch.fuse.fuse_montage` places them (full transform, lens correction), and the
offset between the two renderings is measured by phase correlation (OpenCV ``phaseCorrelate``, Hann
window), which finds offsets of any size, then, when it is within a few pixels, refined by a
Lucas–Kanade (Gauss–Newton) fit of the shift over every pixel of the shared region, both renderings
high-passed first (tile gain and vignetting differ between the two): on the narrow overlaps a stage
error leaves (a dozen pixels across), the Hann window keeps only a few columns and phase correlation
alone reads a perfect seam as up to 0.8 px off. A sound montage then shows offsets of a few hundredths
to a tenth of a pixel; a tear, a wrong match or a tile the stage placed shows pixels, whatever the
solver's residuals claim. Pairs whose shared
region is too small, or whose correlation peak is too weak to trust (blank resin), are reported as such
rather than as good.

:func:`measure_source_seams` reads the tiles where the fusion does
(:class:`~em_platform.stitch.fuse.TilePixels`, e.g. the live pipeline's ``processed_tiles.zarr``) in
batches of neighbouring pairs, on a Dask client when given one;
:func:`seams_beyond` is the ``montage`` asset's check (the rule of the stitch report's ``seams``).

Dagster-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from em_platform.lazy_import import LazyModule

cv2 = LazyModule("cv2")

__all__ = ["SEAM_LIMIT_PX", "SeamMeasure", "measure_seams", "measure_source_seams", "seams_beyond"]

SEAM_LIMIT_PX = 1.0  # offset in the fused image beyond which a seam shows
MIN_RESPONSE = 0.05  # phase-correlation peak below this: nothing to measure (flat or blank overlap)
REFINE_WITHIN_PX = 3.0  # phase-correlation offsets up to this are refined (Lucas–Kanade's reach)


@dataclass(frozen=True)
class SeamMeasure:
    tile: Any
    neighbour: Any
    offset_px: float | None  # None: not measurable (too small or featureless)
    response: float
    shared_px: int

    @property
    def measured_px(self) -> float:
        """``offset_px`` of a seam known to be measured (callers filter out the unmeasurable ones first)."""
        assert self.offset_px is not None, f"seam {self.tile!r}–{self.neighbour!r} was not measurable"
        return self.offset_px


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


def _high_pass(image: np.ndarray) -> np.ndarray:
    """Fine structure only: a light smoothing (noise, and gradients Lucas–Kanade can use) minus the local
    mean (tile gain and vignetting), scaled to unit spread."""
    fine = cv2.GaussianBlur(image, (0, 0), 1.0)
    fine = fine - cv2.GaussianBlur(image, (0, 0), 6.0)
    spread = float(fine.std())
    return fine / spread if spread > 0 else fine


def _refine_shift(
    ra: np.ndarray, rb: np.ndarray, start: np.ndarray, iterations: int = 20
) -> np.ndarray | None:
    """The shift ``d`` (x, y) with ``rb(x + d) ≈ ra(x)``, by Gauss–Newton from ``start`` (phase
    correlation's sign: ``rb`` is ``ra`` moved by ``d``); None when it does not settle within reach."""
    a, b = _high_pass(ra), _high_pass(rb)
    h, w = a.shape
    m = int(np.ceil(np.abs(start).max())) + 2  # compare away from the borders the shift moves in
    if h < 2 * m + 5 or w < 2 * m + 5:
        return None
    inner = (slice(m, h - m), slice(m, w - m))
    gx = cv2.Sobel(b, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(b, cv2.CV_32F, 0, 1, ksize=3) / 8
    gy_, gx_ = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.asarray(start, np.float64)
    for _ in range(iterations):
        mx, my = gx_ + np.float32(d[0]), gy_ + np.float32(d[1])
        bs = cv2.remap(b, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[inner]
        jx = cv2.remap(gx, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[inner].ravel()
        jy = cv2.remap(gy, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[inner].ravel()
        r = (a[inner] - bs).ravel()
        jtj = np.array([[jx @ jx, jx @ jy], [jx @ jy, jy @ jy]], np.float64)
        if np.linalg.cond(jtj) > 1e6:
            return None
        step = np.linalg.solve(jtj, np.array([jx @ r, jy @ r], np.float64))
        d = d + step
        if np.abs(d).max() > m - 1:  # left the region compared: not a small shift after all
            return None
        if np.hypot(*step) < 1e-3:
            return d
    return d


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
        offset = None
        if response >= MIN_RESPONSE:
            offset = float(np.hypot(dx, dy))
            if offset <= REFINE_WITHIN_PX:
                refined = _refine_shift(ra, rb, np.array([dx, dy]))
                offset = float(np.hypot(*refined)) if refined is not None else offset
        out.append(SeamMeasure(a, b, offset, float(response), int(size[0] * size[1])))
    return out


def seams_beyond(seams: Iterable[SeamMeasure], limit_px: float = SEAM_LIMIT_PX) -> list[SeamMeasure]:
    """The measured seams wider than ``limit_px``, widest first (unmeasurable ones are not counted)."""
    bad = [s for s in seams if s.offset_px is not None and s.offset_px > limit_px]
    return sorted(bad, key=lambda s: -s.measured_px)


def _measure_batch(pairs, transforms, source, shapes, lens) -> list[SeamMeasure]:
    cache: dict[Any, np.ndarray] = {}

    def read(tile):
        if tile not in cache:
            h, w = shapes[tile]
            cache[tile] = np.asarray(source.read(tile, 0, h, 0, w))
        return cache[tile]

    return measure_seams(pairs, transforms, read, shapes, lens=lens)


def measure_source_seams(
    pairs: Iterable[tuple[str, str]],
    transforms: Mapping[str, np.ndarray],
    source: Any,
    shapes: Mapping[str, tuple[int, int]],
    *,
    lens: Any = None,
    client: Any = None,
    batch: int = 64,
) -> list[SeamMeasure]:
    """:func:`measure_seams` of tiles read from ``source`` (a fusion ``TilePixels``: ``read(tile, y0, y1,
    x0, x1)``, picklable), in batches of ``batch`` pairs in the order given (pass neighbours together:
    each batch reads a tile once), on ``client`` (Dask) when given; results in the order of ``pairs``."""
    pairs = list(pairs)
    batches = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        tiles = {t for pair in chunk for t in pair}
        batches.append(
            (
                chunk,
                {t: np.asarray(transforms[t], np.float64) for t in tiles},
                source,
                {t: tuple(shapes[t]) for t in tiles},
                lens,
            )
        )
    if client is None or len(batches) <= 1:
        return [s for args in batches for s in _measure_batch(*args)]
    futures = [client.submit(_measure_batch, *args, pure=False) for args in batches]
    return [s for part in client.gather(futures) for s in part]
