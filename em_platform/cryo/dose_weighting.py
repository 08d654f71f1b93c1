"""Exposure (dose) weighting of movie frames: Grant & Grigorieff (2015, eLife 4:e06980).

A frequency k (1/Å) survives an exposure N (e/Å²) by exp(−N / (2 N_e(k))) with the critical exposure
N_e(k) = 0.245 k^−1.665 + 2.81 e/Å² (measured at 300 kV; ×0.8 at 200 kV as in unblur). Frames are summed
with these weights and each frequency renormalised by √(n / Σ q_i²), so the low frequencies equal the plain
sum and white noise stays white (the paper's optimal restoration).
"""

from __future__ import annotations

import numpy as np

A, B, C = 0.245, -1.665, 2.81


def critical_exposure(k_per_A: np.ndarray, voltage_kV: float = 300.0) -> np.ndarray:
    """N_e(k) in e/Å² (k = 0 gets an infinite critical exposure: the mean never fades)."""
    k = np.asarray(k_per_A, dtype=np.float64)
    with np.errstate(divide="ignore"):
        ne = A * np.power(k, B, where=k > 0, out=np.full(k.shape, np.inf)) + C
    return ne * (0.8 if voltage_kV < 250 else 1.0)


def frame_exposures(n_frames: int, dose_per_frame: float, pre_exposure: float = 0.0) -> np.ndarray:
    """Exposure at the middle of each frame (e/Å²), after ``pre_exposure`` (earlier tilts of a series)."""
    return pre_exposure + (np.arange(n_frames) + 0.5) * dose_per_frame


def dose_filters(exposures: np.ndarray, k_per_A: np.ndarray, voltage_kV: float = 300.0) -> np.ndarray:
    """Per-frame weights q_i(k) = exp(−N_i / (2 N_e(k))), shape (n_frames, *k.shape)."""
    ne = critical_exposure(k_per_A, voltage_kV)
    return np.exp(-np.asarray(exposures)[:, None, None] / (2.0 * ne[None]))


def restoration_norm(filters: np.ndarray) -> np.ndarray:
    """√(n / Σ q_i²): equal to 1 at k = 0 (no exposure loss there) relative to the plain sum."""
    n = filters.shape[0]
    return np.sqrt(n / np.maximum((filters**2).sum(axis=0), 1e-30))
