"""A small PNG a person can look at: the middle section of an image's coarsest pyramid level."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from em_platform.lazy_import import LazyModule

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    import imagecodecs
else:
    imagecodecs = LazyModule("imagecodecs")


def middle_plane(array, axes: tuple[str, ...]) -> np.ndarray:
    """The central z section (first time point and channel) of an array with NGFF axes, as numpy."""
    index = tuple(
        array.shape[i] // 2 if a == "z" else 0 if a in ("t", "c") else slice(None) for i, a in enumerate(axes)
    )
    return np.asarray(array[index])


def to_uint8(plane: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Contrast-stretch between percentiles, as display software does for EM data."""
    plane = np.asarray(plane, dtype=np.float32)
    finite = plane[np.isfinite(plane)]
    if finite.size == 0:
        return np.zeros(plane.shape, np.uint8)
    lo, hi = np.percentile(finite, [low, high])
    if hi <= lo:
        return np.zeros(plane.shape, np.uint8)
    scaled = np.clip((np.nan_to_num(plane, nan=lo) - lo) / (hi - lo), 0, 1)
    return np.round(scaled * 255).astype(np.uint8)


def thumbnail_png(array, axes: tuple[str, ...], max_side: int = 256) -> bytes:
    """PNG bytes of the middle plane, strided down so its longer side is at most ``max_side``."""
    plane = middle_plane(array, axes)
    step = max(1, -(-max(plane.shape) // max_side))
    return bytes(imagecodecs.png_encode(to_uint8(plane[::step, ::step])))
