"""Where the specimen lies along z: the slab of a tomogram that holds structure (IMOD's findsection in
spirit), so a tomogram is as thick as the ice and centred on it rather than on the alignment's origin.

The profile is each z-slice's variance (its mean removed). Above and below the specimen a weighted
back-projection holds only the missing wedge's streaks, weaker than the specimen itself: the slab is where
the profile stands above half-way between that floor and its peak. The missing wedge also stretches
features along z, so the slab found is widened only by a margin, not doubled.
"""

from __future__ import annotations

import numpy as np

MARGIN_FRACTION = 0.15  # of the slab found, added on each side
MIN_THICKNESS = 16  # voxels


def z_profile(volume: np.ndarray) -> np.ndarray:
    """Variance of each z-slice of a (nz, ny, nx) volume, its mean removed."""
    v = np.asarray(volume, np.float64)
    return v.reshape(v.shape[0], -1).var(axis=1)


def specimen_slab(profile: np.ndarray) -> tuple[float, float]:
    """(centre, extent) in voxel indices of the profile's slab above half-way from floor to peak."""
    p = np.asarray(profile, np.float64)
    floor, peak = float(np.percentile(p, 10)), float(p.max())
    if peak <= floor:
        return (len(p) - 1) / 2, float(len(p))
    above = np.nonzero(p >= floor + 0.5 * (peak - floor))[0]
    lo, hi = int(np.min(above)), int(np.max(above))
    return (lo + hi) / 2, float(hi - lo + 1)


def thickness_for(extent: float, limit: int) -> int:
    """An even voxel count covering ``extent`` with the margin, between MIN_THICKNESS and ``limit``."""
    n = int(np.ceil(extent * (1 + 2 * MARGIN_FRACTION))) + 2
    return int(min(max(MIN_THICKNESS, n + n % 2), limit - limit % 2))
