"""Hot (and dead-bright) detector pixels: found in the movie's frame sum, replaced before anything else.

A hot pixel reads high in every frame at the same place. Summed into the micrograph it is a bright dot; in
the drift estimate it is worse: a fixed pattern correlates best at zero shift and pulls every frame's
shift toward it. As MotionCor2 and RELION's motioncorr do, pixels whose summed counts lie far above a
Poisson expectation from their neighbourhood are flagged and, in every frame, replaced by their
neighbourhood's mean count. Dagster-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["HotPixels", "find_hot_pixels"]

DEFAULT_SIGMA = 12.0  # Poisson standard deviations above the local level: ~1e-33 false alarms per pixel
MIN_RATIO = 3.0  # and at least this many times the local level (gain variation alone never reaches it)


@dataclass(frozen=True)
class HotPixels:
    rows: np.ndarray
    cols: np.ndarray
    fill: np.ndarray  # per flagged pixel: the count per frame its neighbourhood has (float32)

    def __len__(self) -> int:
        return len(self.rows)

    def normalised(self, raw: np.ndarray, gain: np.ndarray | None) -> np.ndarray:
        """Raw counts (n, ny, nx) → float32 × ``gain`` with the flagged pixels at their expected level, in
        one pass over the frames (the conversion is the multiplication)."""
        out = np.multiply(raw, gain, dtype=np.float32) if gain is not None else raw.astype(np.float32)
        if len(self):
            fill = self.fill * gain[self.rows, self.cols] if gain is not None else self.fill
            out[..., self.rows, self.cols] = fill
        return out

    def apply(self, frames: np.ndarray, *, inplace: bool = False) -> np.ndarray:
        """``frames`` (n, ny, nx) or (ny, nx) as float32 with the flagged pixels replaced: a copy, or, with
        ``inplace``, the float32 array itself when it is one (the caller's own buffer)."""
        out = np.asarray(frames, np.float32) if inplace else np.array(frames, np.float32)
        if len(self):
            out[..., self.rows, self.cols] = self.fill
        return out


def find_hot_pixels(
    frame_sum: np.ndarray, n_frames: int, sigma: float = DEFAULT_SIGMA, gain: np.ndarray | None = None
) -> HotPixels:
    """Flag pixels of ``frame_sum`` (raw counts over ``n_frames``) far above their 5 × 5 neighbourhood's mean
    (the pixel itself left out: a 4k sum's median filter would cost seconds, this mean milliseconds).

    With a ``gain`` reference the expectation is per pixel (raw ≈ level / gain); ``sigma`` ≤ 0 flags none.
    """
    from scipy.ndimage import uniform_filter

    s = np.asarray(frame_sum, np.float32)
    if sigma <= 0 or s.size == 0:
        empty = np.zeros(0, np.int64)
        return HotPixels(empty, empty, np.zeros(0, np.float32))
    normalised = s * gain if gain is not None else s
    level = (uniform_filter(normalised, size=5, mode="reflect") * 25 - normalised) / 24
    expected = level / gain if gain is not None else level
    expected = np.maximum(expected, 1.0 / max(n_frames, 1))
    hot = (s > expected + sigma * np.sqrt(expected)) & (s > MIN_RATIO * expected)
    rows, cols = np.nonzero(hot)
    return HotPixels(rows, cols, (expected[rows, cols] / max(n_frames, 1)).astype(np.float32))
