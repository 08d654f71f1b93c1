"""Fourier shell correlation between two volumes (or images), and the resolution where it crosses a threshold.

0.5 is the usual threshold against a noise-free reference (the simulator's phantom); 0.143 the half-set
criterion (Rosenthal & Henderson 2003). Shells are 1/(max side · voxel) wide, so a thin tomogram
(nz ≪ nx) still gets fine shells.
"""

from __future__ import annotations

import numpy as np


def fsc_curve(a: np.ndarray, b: np.ndarray, voxel_A: float) -> tuple[np.ndarray, np.ndarray]:
    """(shell frequencies in 1/Å, FSC per shell) up to Nyquist."""
    if a.shape != b.shape:
        raise ValueError(f"FSC needs equal shapes, got {a.shape} and {b.shape}")
    fa = np.fft.rfftn(np.asarray(a, np.float64) - np.mean(a))
    fb = np.fft.rfftn(np.asarray(b, np.float64) - np.mean(b))
    grids = [np.fft.fftfreq(n) for n in a.shape[:-1]] + [np.fft.rfftfreq(a.shape[-1])]
    k = np.sqrt(sum(g**2 for g in np.meshgrid(*grids, indexing="ij", sparse=True)))
    width = 1.0 / max(a.shape)
    shell = np.rint(k / width).astype(np.int64).ravel()
    nshell = int(round(0.5 / width)) + 1
    keep = shell < nshell
    shell = shell[keep]

    def tally(v: np.ndarray) -> np.ndarray:
        return np.bincount(shell, weights=v.ravel()[keep], minlength=nshell)

    num = tally((fa * np.conj(fb)).real)
    den = np.sqrt(tally(np.abs(fa) ** 2) * tally(np.abs(fb) ** 2))
    curve = np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)
    freqs = np.arange(nshell) * width / voxel_A
    return freqs[1:], curve[1:]


def resolution_at(freqs: np.ndarray, curve: np.ndarray, threshold: float) -> float:
    """Resolution (Å) where the curve first falls below ``threshold`` (linear interpolation between shells).

    If it never falls below, the Nyquist resolution; if it starts below, infinity.
    """
    below = np.nonzero(curve < threshold)[0]
    if len(below) == 0:
        return float(1.0 / freqs[-1])
    i = int(below[0])
    if i == 0:
        return float("inf")
    f0, f1, c0, c1 = freqs[i - 1], freqs[i], curve[i - 1], curve[i]
    f = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0) if c0 != c1 else f1
    return float(1.0 / f)


def register_translation(
    moving: np.ndarray, reference: np.ndarray, max_shift: float | None = None
) -> np.ndarray:
    """Integer-voxel translation that best overlays ``moving`` on ``reference`` (circular cross-correlation)."""
    cc = np.fft.irfftn(
        np.fft.rfftn(reference - reference.mean()) * np.conj(np.fft.rfftn(moving - moving.mean())),
        s=reference.shape,
    )
    if max_shift is not None:
        for axis, n in enumerate(cc.shape):
            d = np.abs(np.fft.fftfreq(n) * n)
            shape = [1] * cc.ndim
            shape[axis] = n
            cc = np.where((d > max_shift).reshape(shape), -np.inf, cc)
    peak = np.array(np.unravel_index(int(np.argmax(cc)), cc.shape))
    n = np.array(cc.shape)
    return np.where(peak > n // 2, peak - n, peak)


def shift_integer(volume: np.ndarray, shift) -> np.ndarray:
    return np.roll(volume, tuple(int(s) for s in shift), axis=tuple(range(volume.ndim)))
