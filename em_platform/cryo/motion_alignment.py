"""Frame alignment for motion correction: leave-one-out correlation peaks, refined in a window per frame.

Each frame is correlated with the sum of all the others (its own noise must not pull it to zero shift)
under a B-factor low-pass, on the band of frequencies the filter keeps. The first round computes whole
correlation maps (the shifts are unknown: a jump can be tens of pixels); after it every frame's peak is
known to a pixel, so later rounds evaluate the correlation only on a 3 × 3 grid of lags centred on the
frame's last peak, by a matrix DFT of the band (two small matrix products per frame) instead of an inverse
transform of the whole map. That round costs a third of a full one, and the Gaussian three-point fit is
taken where it is least biased, at the centre of its samples. Rounds before the last run on a coarser band
(``COARSE_BAND``): they only settle the reference; the last ones use the whole band for precision.

Shifts are where a frame's content sits relative to the reference, (dx, dy) in the frames' pixels.
Dagster-free.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from em_platform.cryo.trajectory import Trajectory, fit_trajectory
from em_platform.lazy_import import LazyModule

sfft = LazyModule("scipy.fft")

# frequencies the B-factor filter weighs below this are left out of the correlation: below 1 % they add
# nothing measurable (the bench's 2048² movies: the same drift errors to 1e-4 px at 1e-3, 1e-2 and 3e-2),
# and at 2 Å/px the band is then 790² instead of 966²
FILTER_FLOOR = 1e-2
WORKERS = os.cpu_count() or 1  # threads for transforms and per-frame work
COARSE_BAND = 384  # rounds before the last run on at most this many frequencies per axis
COARSE_DONE_PX = 0.05  # ... until no shift changes by more than this (frame px); then the whole band
BLOCK = 8  # frames per block of the windowed rounds (bounded temporaries, one block per thread)


def kept_band(n: int, pixel_A: float, bfactor_A2: float) -> int:
    """How many frequencies (an even count ≤ n) along an axis of ``n`` px the B-factor filter keeps."""
    if bfactor_A2 <= 0:
        return n
    k_cut = math.sqrt(4.0 * math.log(1.0 / FILTER_FLOOR) / bfactor_A2)  # 1/Å
    m = 2 * math.ceil(k_cut * pixel_A * n) + 2  # 2·k_cut/k_Nyquist·n/2, rounded up to even, with a margin
    return n if m >= n or n % 2 else max(16, m)


# ---------------------------------------------------------------------------------------------------
# Peaks of correlation maps


def parabola_offset(vals: np.ndarray) -> float:
    """Sub-sample offset of a peak from its three top samples (Gaussian fit when all are positive)."""
    frac = 0.0
    if np.all(vals > 0):
        a, b, c = np.log(vals)
        den = a - 2 * b + c
        frac = 0.5 * (a - c) / den if den < 0 else 0.0
    elif vals[0] != vals[2]:
        den = vals[0] - 2 * vals[1] + vals[2]
        frac = 0.5 * (vals[0] - vals[2]) / den if den < 0 else 0.0
    return float(np.clip(frac, -0.5, 0.5))


def correlation_peak(cc: np.ndarray) -> tuple[float, float]:
    """Sub-pixel (dy, dx) of the maximum of a circular correlation map (Gaussian 3-point fit per axis).

    The maps here are B-factor filtered, so the peak is a smooth bump several pixels wide and the
    log-parabola through its three top samples finds its centre to a few hundredths of a pixel.
    """
    iy, ix = np.unravel_index(int(np.argmax(cc)), cc.shape)
    out = []
    for axis, i in ((0, iy), (1, ix)):
        n = cc.shape[axis]
        idx = [(i - 1) % n, i, (i + 1) % n]
        vals = cc[idx, ix] if axis == 0 else cc[iy, idx]
        pos = i + parabola_offset(np.asarray(vals, np.float64))
        out.append(pos - n if pos > n / 2 else pos)
    return out[0], out[1]


def limit_search(cc: np.ndarray, max_shift: float) -> np.ndarray:
    """The correlation map with every lag beyond ``max_shift`` (either axis) set to its minimum."""
    yy = np.abs(np.fft.fftfreq(cc.shape[0]) * cc.shape[0])[:, None]
    xx = np.abs(np.fft.fftfreq(cc.shape[1]) * cc.shape[1])[None, :]
    return np.where((yy > max_shift) | (xx > max_shift), cc.min(), cc)


def peak_near_zero(cc: np.ndarray, max_shift: float) -> tuple[float, float]:
    """:func:`correlation_peak` of a circular correlation map with lags beyond ``max_shift`` ignored,
    found in the (2m+3)² window around zero lag only (the map of a 4k frame is 16 M values; the window a
    few thousand)."""
    m = int(math.ceil(max_shift))
    ny, nx = cc.shape
    if 2 * m + 3 >= min(ny, nx):
        return correlation_peak(limit_search(cc, max_shift))
    rows = np.arange(-m - 1, m + 2) % ny
    cols = np.arange(-m - 1, m + 2) % nx
    window = cc[np.ix_(rows, cols)]
    inner = window[1:-1, 1:-1]
    # the inner part's peak in window indices: its neighbours are inside the window
    iy, ix = (int(v) + 1 for v in np.unravel_index(int(np.argmax(inner)), inner.shape))
    out = []
    for axis, i in ((0, iy), (1, ix)):
        vals = (window[i - 1 : i + 2, ix] if axis == 0 else window[iy, i - 1 : i + 2]).astype(np.float64)
        out.append(i - (m + 1) + parabola_offset(vals))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------
# The band-limited spectra of a stack


@dataclass
class BandSpectra:
    """Each frame's spectrum (mean removed) on the band a B-factor filter keeps: ``ft`` (n, by, bx // 2 + 1)
    complex64, with the frequencies ``ky`` (by,) and ``kx`` (bx // 2 + 1,) in cycles per frame px."""

    ft: np.ndarray
    ky: np.ndarray
    kx: np.ndarray
    shape: tuple[int, int]  # the frames' (ny, nx)
    band: tuple[int, int]  # (by, bx): the grid the band's inverse transform lives on

    def crop(self, band: tuple[int, int]) -> BandSpectra:
        """The same spectra on a smaller (even) band (by, bx), or these when it is not smaller."""
        by, bx = min(band[0], self.band[0]), min(band[1], self.band[1])
        by, bx = by - by % 2, bx - bx % 2
        if (by, bx) == self.band or by < 16 or bx < 16:
            return self
        h = by // 2
        return BandSpectra(
            crop_rows(self.ft, h, bx // 2 + 1),
            np.r_[self.ky[:h], self.ky[len(self.ky) - h :]],
            self.kx[: bx // 2 + 1],
            self.shape,
            (by, bx),
        )


def crop_rows(spectra: np.ndarray, half: int, columns: int) -> np.ndarray:
    """The first and last ``half`` rows and first ``columns`` columns of (…, rows, cols) spectra, copied by
    slices (an index array on the middle axis takes numpy's slow gather: 10× the time)."""
    out = np.empty((*spectra.shape[:-2], 2 * half, columns), spectra.dtype)
    out[..., :half, :] = spectra[..., :half, :columns]
    out[..., half:, :] = spectra[..., spectra.shape[-2] - half :, :columns]
    return out


def rfft2_into(image: np.ndarray, out: np.ndarray, workers: int) -> np.ndarray:
    """scipy.fft.rfft2 of float32 image(s) (…, ny, nx) into ``out`` (complex64, reused: a new 4k spectrum is
    16 000 page faults, 12 % of the transform) through scipy's own DUCC binding; plain rfft2 where that is
    not there (it is private, so guarded)."""
    global _r2c
    if _r2c is None:
        try:
            from scipy.fft._duccfft.pyduccfft import r2c  # scipy ≥ 1.17's backend

            _r2c = r2c
        except ImportError:
            _r2c = False
    if _r2c:
        try:
            return _r2c(image, (image.ndim - 2, image.ndim - 1), True, 0, out, workers)
        except (TypeError, ValueError):
            _r2c = False
    return sfft.rfft2(image, workers=workers)


_r2c: Any = None


def band_spectra(
    frames: np.ndarray, pixel_A: float, bfactor_A2: float, workers: int = WORKERS
) -> BandSpectra:
    """:class:`BandSpectra` of a real (n, ny, nx) stack, transformed a few frames at a time into one reused
    buffer (the whole spectra of a 40-frame 1024² stack are 170 MB; the band can be much less)."""
    n, ny, nx = frames.shape
    by, bx = kept_band(ny, pixel_A, bfactor_A2), kept_band(nx, pixel_A, bfactor_A2)
    rows = np.r_[0 : by // 2, ny - by // 2 : ny] if by < ny else np.arange(ny)
    h, cols = by // 2, bx // 2 + 1
    ft = np.empty((n, by, cols), np.complex64)
    buffer = np.empty((min(n, BLOCK), ny, nx // 2 + 1), np.complex64)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        chunk = np.asarray(frames[start:stop], np.float32)
        spec = rfft2_into(chunk, buffer[: stop - start], workers)
        spec[:, 0, 0] = 0  # the mean: its (huge) power would only add a constant to every correlation
        if by < ny:
            ft[start:stop, :h] = spec[:, :h, :cols]
            ft[start:stop, h:] = spec[:, ny - h :, :cols]
        else:
            ft[start:stop] = spec[:, :, :cols]
    ky = np.fft.fftfreq(ny)[rows]
    kx = np.fft.rfftfreq(nx)[:cols]
    return BandSpectra(ft, ky, kx, (ny, nx), (by, bx))


def _ramps(ky: np.ndarray, kx: np.ndarray, shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exp(+2πi k·d) as its y (n, by) and x (n, bx) factors: multiplying a spectrum moves its content by −d."""
    ry = np.exp(2j * np.pi * ky[None, :] * shifts[:, 1, None]).astype(np.complex64)
    rx = np.exp(2j * np.pi * kx[None, :] * shifts[:, 0, None]).astype(np.complex64)
    return ry, rx


def aligned_sum(ft: np.ndarray, ry: np.ndarray, rx: np.ndarray, frames: range | None = None) -> np.ndarray:
    """Σ_j ft_j · ry_j ⊗ rx_j (the frames undone by their shifts, summed), one buffer reused."""
    total = np.zeros(ft.shape[1:], np.complex64)
    tmp = np.empty_like(total)
    for j in frames if frames is not None else range(len(ft)):
        np.multiply(ft[j], rx[j][None, :], out=tmp)
        tmp *= ry[j][:, None]
        total += tmp
    return total


# ---------------------------------------------------------------------------------------------------
# One round of leave-one-out peaks


def _filter(spectra: BandSpectra, pixel_A: float, bfactor_A2: float) -> np.ndarray:
    k2 = (spectra.ky[:, None] / pixel_A) ** 2 + (spectra.kx[None, :] / pixel_A) ** 2
    return np.exp(-bfactor_A2 * k2 / 4.0).astype(np.float32)


def _full_round(spectra: BandSpectra, filt: np.ndarray, max_shift: float, workers: int) -> np.ndarray:
    """Peaks (n, 2) of every frame's whole correlation map with the sum of the others (no shifts yet)."""
    ft = spectra.ft
    n = len(ft)
    conj_total = np.conj(ft.sum(axis=0))
    by, bx = spectra.band
    scale = (spectra.shape[0] / by, spectra.shape[1] / bx)  # frame px per lag of the band's grid
    measured = np.zeros((n, 2))
    for start in range(0, n, BLOCK):
        block = ft[start : start + BLOCK]
        spec = (block * conj_total - (block.real**2 + block.imag**2)) * filt
        cc = sfft.irfft2(spec, s=(by, bx), workers=workers)
        for i in range(len(block)):
            dy, dx = peak_near_zero(cc[i], max_shift / min(scale))
            measured[start + i] = (dx * scale[1], dy * scale[0])
    return measured


OFFSETS = np.array([-1.0, 0.0, 1.0])  # the window's lags around its centre, frame px


def _window_block(
    ft: np.ndarray,
    power: np.ndarray,
    weighted_conj_total: np.ndarray,
    ky: np.ndarray,
    kx_weighted: tuple[np.ndarray, np.ndarray],
    centres: np.ndarray,
    shifts: np.ndarray,
) -> np.ndarray:
    """Leave-one-out correlation (b, 3, 3) of a block of frames at the lags ``centres`` + OFFSETS² (y, x),
    by a matrix DFT of the band: cc_i(l) = Re Σ_k filt·(F_i·conj(T) − |F_i|²·conj(ramp_i))·e^{2πik·l}, the
    first term as F_i · (filt·conj T), the second as the real ``power`` (filt·|F_i|²) times exponentials
    at the lags l − d_i (no product of the band per frame for it)."""
    kx, wx = kx_weighted
    two_pi_i = 2j * np.pi
    lx = centres[:, 0, None] + OFFSETS[None, :]
    ly = centres[:, 1, None] + OFFSETS[None, :]
    ex = (wx[None, :, None] * np.exp(two_pi_i * kx[None, :, None] * lx[:, None, :])).astype(np.complex64)
    ey = np.exp(two_pi_i * ky[None, None, :] * ly[:, :, None]).astype(np.complex64)
    cross = ey @ ((ft * weighted_conj_total) @ ex)  # (b, 3, 3)
    lx2, ly2 = lx - shifts[:, 0, None], ly - shifts[:, 1, None]
    ex2 = wx[None, :, None] * np.exp(two_pi_i * kx[None, :, None] * lx2[:, None, :])
    ey2 = np.exp(two_pi_i * ky[None, None, :] * ly2[:, :, None]).astype(np.complex64)
    own_x = power @ np.concatenate([ex2.real, ex2.imag], axis=2).astype(np.float32)  # (b, by, 6)
    own = ey2 @ (own_x[..., :3] + 1j * own_x[..., 3:]).astype(np.complex64)
    return (cross - own).real


def _window_round(
    spectra: BandSpectra,
    power: np.ndarray,
    filt: np.ndarray,
    shifts: np.ndarray,
    centres: np.ndarray,
    pool: ThreadPoolExecutor | None,
) -> np.ndarray:
    """Each frame's peak (n, 2) refined from its correlation on the 3 × 3 lags around ``centres``."""
    ft, n = spectra.ft, len(spectra.ft)
    ry, rx = _ramps(spectra.ky, spectra.kx, shifts)
    blocks = [range(s, min(n, s + BLOCK)) for s in range(0, n, BLOCK)]
    run: Callable = pool.map if pool is not None else map
    weighted_conj_total = np.conj(sum(run(lambda b: aligned_sum(ft, ry, rx, b), blocks))) * filt
    wx = np.where((spectra.kx == 0) | (spectra.kx == 0.5), 1.0, 2.0)  # the half spectrum's Hermitian weight
    kxw = (spectra.kx, wx)

    def block(b: range) -> np.ndarray:
        sl = slice(b.start, b.stop)
        return _window_block(ft[sl], power[sl], weighted_conj_total, spectra.ky, kxw, centres[sl], shifts[sl])

    cc = np.concatenate(list(run(block, blocks))).astype(np.float64)
    out = centres.copy()
    for i in range(n):
        out[i, 1] += _step(cc[i, :, 1])
        out[i, 0] += _step(cc[i, 1, :])
    return out


def _step(vals: np.ndarray) -> float:
    """How far the peak lies from the window's centre sample (frame px): the vertex of the (log-)parabola
    through the three samples, up to one sample either way; one sample toward the higher side when they
    curve upward. (Moving a whole sample whenever a neighbour is the higher made a peak half-way between
    two samples flip from one to the other, round after round.)"""
    v = np.log(vals) if np.all(vals > 0) else vals
    den = v[0] - 2 * v[1] + v[2]
    if den < 0:
        return float(np.clip(0.5 * (v[0] - v[2]) / den, -1.0, 1.0)) * OFFSETS[2]
    return float(np.sign(v[2] - v[0])) * OFFSETS[2]


def _power(spectra: BandSpectra, filt: np.ndarray) -> np.ndarray:
    """filt·|F_i|² (n, by, bx) float32: each frame's own term, the same in every round."""
    power = np.empty(spectra.ft.shape, np.float32)
    for start in range(0, len(power), BLOCK):
        block = spectra.ft[start : start + BLOCK]
        np.multiply(block.real, block.real, out=power[start : start + BLOCK])
        power[start : start + BLOCK] += block.imag * block.imag
        power[start : start + BLOCK] *= filt
    return power


# ---------------------------------------------------------------------------------------------------
# The iteration


def align_spectra(
    spectra: BandSpectra,
    pixel_A: float,
    bfactor_A2: float,
    *,
    max_iterations: int = 8,
    tolerance_px: float = 0.01,
    max_shift_fraction: float = 0.08,
    trajectory: str = "none",
    coarse_band: int | None = COARSE_BAND,
    workers: int = WORKERS,
) -> Trajectory:
    """Iterative leave-one-out alignment: the drift (dx, dy) in frame px, as the ``trajectory`` model
    (:func:`~em_platform.cryo.trajectory.fit_trajectory`) makes of the measured peaks.

    Round one: whole correlation maps against the plain sum. Then windowed rounds (module docstring),
    first on ``coarse_band`` (None: none) until the shifts settle to ``COARSE_DONE_PX``, then on the whole
    band until they settle to ``tolerance_px`` (or once, when the coarse rounds settled: see the loop);
    ``max_iterations`` rounds in all, the last one (at least) on the whole band."""
    n = len(spectra.ft)
    if n < 2:
        return Trajectory(np.zeros((n, 2)), "measured", 0.0)
    ny, nx = spectra.shape
    max_shift = max(4.0, max_shift_fraction * min(ny, nx) * (1 if ny > 256 else 2))
    fine_filter = _filter(spectra, pixel_A, bfactor_A2)
    coarse = spectra.crop((coarse_band, coarse_band)) if coarse_band else spectra
    coarse_filter = _filter(coarse, pixel_A, bfactor_A2) if coarse is not spectra else fine_filter
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        measured = _full_round(coarse, coarse_filter, max_shift, workers)
        fitted = fit_trajectory(measured, trajectory)
        if max_iterations > 1:
            fine_power = _power(spectra, fine_filter)
            coarse_power = fine_power if coarse is spectra else _power(coarse, coarse_filter)
        fine = coarse is spectra
        settled = False  # the coarse rounds settled the reference
        for round_ in range(1, max_iterations):
            fine = fine or round_ == max_iterations - 1
            band, power, filt = (
                (spectra, fine_power, fine_filter) if fine else (coarse, coarse_power, coarse_filter)
            )
            measured = _window_round(band, power, filt, fitted.shifts, measured, pool)
            new = fit_trajectory(measured, trajectory)
            change = float(np.abs(new.shifts - fitted.shifts).max())
            fitted = new
            # the first whole-band round after settled coarse ones moves the shifts by the change of band
            # (0.01-0.02 px), against a reference already settled: another round moved them 1e-4 to 1e-3 px
            # on the bench's movies (2048² to K3), so it is not run
            if fine and (change < tolerance_px or (settled and change < COARSE_DONE_PX)):
                break
            if not fine and change < COARSE_DONE_PX:
                fine = settled = True
    finally:
        if pool is not None:
            pool.shutdown()
    return fitted
