"""Blank tiles: bare resin or film beyond the section's edge, where a tile holds nothing but shot noise.

Such a tile cannot be matched and must not count as a failure to place: it is flagged instead. The test
is the tile's fine structure against its own noise: block-average by 4 (noise falls by 4, structure
stays), take the 4–16 px band (a difference of Gaussians: vignetting and gain are far coarser) and
compare its spread with what the tile's own pixel noise gives in that band. A tile of noise alone
scores 1.0; sectioned tissue 5–13, a patch of faint stain (a fifth of the normal contrast) 4–7.

Dagster-free.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

__all__ = ["BLANK_SCORE", "is_blank", "texture_score"]

BLANK_SCORE = 2.0
_FACTOR = 4


@functools.lru_cache(maxsize=1)
def _band_gain() -> float:
    """How much of unit white noise the band filter passes (on the block-averaged image)."""
    noise = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    return float(_band(noise)[16:-16, 16:-16].std())


def _band(image: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), 1.0) - cv2.GaussianBlur(image, (0, 0), 4.0)


def texture_score(image: np.ndarray) -> float:
    """Fine structure against the tile's own noise (1.0 = noise only)."""
    x = np.asarray(image, np.float32)
    h, w = (x.shape[0] // _FACTOR) * _FACTOR, (x.shape[1] // _FACTOR) * _FACTOR
    if h < 8 * _FACTOR or w < 8 * _FACTOR:
        return float("inf")  # too small to judge: never call it blank
    small = x[:h, :w].reshape(h // _FACTOR, _FACTOR, w // _FACTOR, _FACTOR).mean(axis=(1, 3))
    step = max(1, x.shape[0] // 256)
    d = np.diff(x[::step], axis=1)
    sigma = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2)
    if sigma <= 0:
        return 0.0 if float(small.std()) == 0 else float("inf")
    band = _band(small)[4:-4, 4:-4]
    return float(band.std() / (_band_gain() * sigma / _FACTOR))


def is_blank(image: np.ndarray, threshold: float = BLANK_SCORE) -> bool:
    return texture_score(image) < threshold
