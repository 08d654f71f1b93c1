"""Beam-induced motion correction of one movie (MotionCor2's scheme on the CPU).

1. Gain applied (normalised frame = raw counts × gain reference, SerialEM's convention).
2. Full-frame drift: frames Fourier-binned to at most ``estimation_size``; each frame cross-correlated with
   the sum of all the others (leave-one-out, so its own noise does not pull it to zero) under a B-factor
   low-pass; sub-pixel peaks by upsampled DFT; repeated until no shift changes by more than 0.01 px.
3. Patch drift: the globally aligned frames cut into a grid of patches (5 × 5, cryoem-services' default),
   each aligned the same way; the residual shifts are fitted by MotionCor2's smooth model (quadratic in x, y
   times cubic in time, 18 terms per axis), so a noisy patch cannot distort the result.
4. The dose-weighted sum (Grant–Grigorieff) at full resolution, frames streamed in chunks by Dask: each frame
   shifted by a Fourier phase ramp; with local motion, per tile (the patch grid with overlapping margins,
   blended by a partition of unity) at the tile centre's global + local shift. Even and odd frame sums are
   kept for Noise2Noise-style denoising and half-set FSC.

Shifts are where a frame's content sits relative to the reference (the simulator's ``drift_px`` sense),
as (dx, dy) in full-resolution pixels, mean zero over the frames.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import dask
import numpy as np
import scipy.fft as sfft

from em_platform.cryo.dose_weighting import critical_exposure, frame_exposures

DOSE_MOTIONSTATS_CUTOFF = 4.0  # e/Å²: cryoem-services splits early / late motion here


@dataclass(frozen=True)
class MotionSettings:
    patches: tuple[int, int] = (5, 5)  # (x, y) patch grid; (1, 1) = full-frame only
    estimation_size: int = 1024  # frames are Fourier-binned to at most this for the estimation
    bfactor_global_A2: float = 500.0
    bfactor_patch_A2: float = 1000.0
    max_iterations: int = 8
    tolerance_px: float = 0.01
    local_threshold_px: float = 0.2  # apply the local model only if its RMS exceeds this
    max_shift_fraction: float = 0.08  # peaks searched within this fraction of the frame size
    frames_per_task: int = 4
    min_patch_px: int = 512  # full-resolution px: fewer patches on a smaller frame (MotionCor2's are ~800)
    trajectory_degree: int | None = (
        3  # global drift as a smooth curve in time (Unblur's prior); None: per frame
    )


@dataclass
class MotionResult:
    micrograph: np.ndarray  # dose-weighted sum, float32 (ny, nx)
    even: np.ndarray  # dose-weighted sums of even / odd frames (independent noise)
    odd: np.ndarray
    shifts_px: np.ndarray  # (n_frames, 2) global drift (dx, dy), full-resolution px, mean zero
    patch_centres_px: np.ndarray  # (n_patches, 2) (x, y)
    patch_shifts_px: np.ndarray  # (n_patches, n_frames, 2) measured local residuals
    local_model_rms_px: float
    local_applied: bool
    binning: float
    metrics: dict = field(default_factory=dict)


def motion_metrics(shifts_px: np.ndarray, dose_per_frame: float, pixel_A: float) -> dict:
    """cryoem-services' numbers: total, early (< 4 e/Å²) and late motion, average motion per frame."""
    steps = np.hypot(*np.diff(shifts_px, axis=0).T) if len(shifts_px) > 1 else np.zeros(0)
    cutoff = round(DOSE_MOTIONSTATS_CUTOFF / dose_per_frame) if dose_per_frame > 0 else len(shifts_px)
    index = np.arange(1, len(shifts_px))
    total = float(steps.sum())
    early = float(steps[index < cutoff].sum())
    return {
        "total_motion_px": total,
        "early_motion_px": early,
        "late_motion_px": total - early,
        "average_motion_per_frame_px": total / max(len(shifts_px), 1),
        "total_motion_A": total * pixel_A,
        "cutoff_frame": int(cutoff),
    }


# ---------------------------------------------------------------------------------------------------
# Estimation


def fourier_bin(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Downsample by cropping the Fourier transform to ``size`` (no aliasing; exact for band-limited data).

    Single precision throughout (scipy.fft keeps float32): counts need no more, and it halves the time."""
    ny, nx = image.shape
    my, mx = size
    if (my, mx) == (ny, nx):
        return np.asarray(image, np.float32)
    f = sfft.rfft2(np.asarray(image, np.float32))
    out = np.zeros((my, mx // 2 + 1), np.complex64)
    h = my // 2
    out[:h] = f[:h, : mx // 2 + 1]
    out[-h:] = f[-h:, : mx // 2 + 1]
    return sfft.irfft2(out, s=(my, mx)) * np.float32((my * mx) / (ny * nx))


def _phase_ramp(shape: tuple[int, int], shifts: np.ndarray) -> np.ndarray:
    """exp(+2πi k·d) on the half (rfft) spectrum for each (dx, dy) in ``shifts``: moves content by −d
    (undoes the drift). Separable: two 1-D exponentials per shift, one product per pixel."""
    ky = np.fft.fftfreq(shape[0])[None, :, None]
    kx = np.fft.rfftfreq(shape[1])[None, None, :]
    return np.exp(2j * np.pi * kx * shifts[:, 0, None, None]).astype(np.complex64) * np.exp(
        2j * np.pi * ky * shifts[:, 1, None, None]
    ).astype(np.complex64)


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
    iy, ix = np.unravel_index(int(np.argmax(inner)), inner.shape)
    iy, ix = iy + 1, ix + 1  # its neighbours are inside the window
    out = []
    for axis, i in ((0, iy), (1, ix)):
        vals = (window[i - 1 : i + 2, ix] if axis == 0 else window[iy, i - 1 : i + 2]).astype(np.float64)
        out.append(i - (m + 1) + _parabola_offset(vals))
    return out[0], out[1]


def _parabola_offset(vals: np.ndarray) -> float:
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
        pos = i + _parabola_offset(np.asarray(vals, np.float64))
        out.append(pos - n if pos > n / 2 else pos)
    return out[0], out[1]


def _bfilter(shape: tuple[int, int], pixel_A: float, bfactor_A2: float) -> np.ndarray:
    """exp(−B k²/4) on the half (rfft) spectrum of ``shape``."""
    ky = np.fft.fftfreq(shape[0], d=pixel_A)[:, None]
    kx = np.fft.rfftfreq(shape[1], d=pixel_A)[None, :]
    return np.exp(-bfactor_A2 * (kx * kx + ky * ky) / 4.0).astype(np.float32)


def smooth_trajectory(shifts: np.ndarray, degree: int | None) -> np.ndarray:
    """The (n, 2) drift as a polynomial of ``degree`` in time, fitted robustly (Tukey's biweight).

    Beam-induced drift is smooth in time, while a low-dose frame's correlation peak is noisy (a 512² frame
    at 1.5 e/px: ~0.5 px per frame, and now and then a 2 px outlier); the curve through all frames is
    better than any one of them. Short movies (n ≤ degree + 2) are returned as they are.
    """
    n = len(shifts)
    if degree is None or n <= degree + 2:
        return shifts
    basis = np.vander(np.linspace(-1.0, 1.0, n), degree + 1)
    weights = np.ones(n)
    fit = shifts
    for _ in range(6):
        root = np.sqrt(weights)[:, None]
        coef, *_ = np.linalg.lstsq(basis * root, shifts * root, rcond=None)
        fit = basis @ coef
        r = np.hypot(*(shifts - fit).T)
        scale = 4.685 * max(1.4826 * float(np.median(r)), 1e-3)
        weights = (1 - np.clip(r / scale, 0, 1) ** 2) ** 2
    return fit - fit.mean(axis=0)


FILTER_FLOOR = 1e-3  # frequencies the B-factor filter weighs below this are left out of the correlation
WORKERS = os.cpu_count() or 1  # scipy.fft threads for batched transforms


def _kept_band(n: int, pixel_A: float, bfactor_A2: float) -> int:
    """How many frequencies (an even count ≤ n) along an axis of ``n`` px the B-factor filter keeps."""
    if bfactor_A2 <= 0:
        return n
    k_cut = math.sqrt(4.0 * math.log(1.0 / FILTER_FLOOR) / bfactor_A2)  # 1/Å
    m = 2 * math.ceil(k_cut * pixel_A * n) + 2  # 2·k_cut/k_Nyquist·n/2, rounded up to even, with a margin
    return n if m >= n or n % 2 else max(16, m)


def align_frames(
    frames: np.ndarray,
    pixel_A: float,
    bfactor_A2: float,
    settings: MotionSettings,
    smooth_degree: int | None = None,
) -> np.ndarray:
    """Iterative leave-one-out alignment of a (n, ny, nx) stack; returns (n, 2) drift (dx, dy) in its px.

    With ``smooth_degree`` each iteration's shifts are replaced by :func:`smooth_trajectory`'s curve.
    The correlations are B-factor filtered, so they are computed on the band the filter keeps (a coarser
    grid of lags, the peak found there and scaled back) and for all frames in one threaded transform.
    """
    n, ny, nx = frames.shape
    my, mx = _kept_band(ny, pixel_A, bfactor_A2), _kept_band(nx, pixel_A, bfactor_A2)
    rows = np.r_[0 : my // 2, ny - my // 2 : ny]
    spectra = sfft.rfft2(
        np.asarray(frames, np.float32) - frames.mean(axis=(1, 2), keepdims=True, dtype=np.float32),
        workers=WORKERS,
    )
    ft = np.ascontiguousarray(spectra[:, rows, : mx // 2 + 1])
    del spectra
    ky = np.fft.fftfreq(ny)[rows]  # cycles per full-grid px
    kx = np.fft.rfftfreq(nx)[: mx // 2 + 1]
    filt = np.exp(-bfactor_A2 * ((ky[:, None] / pixel_A) ** 2 + (kx[None, :] / pixel_A) ** 2) / 4.0)
    filt = filt.astype(np.float32)
    scale = (ny / my, nx / mx)  # full-grid px per lag of the coarse correlation
    shifts = np.zeros((n, 2))
    max_shift = max(4.0, settings.max_shift_fraction * min(ny, nx) * (1 if ny > 256 else 2))
    for _ in range(settings.max_iterations):
        ramp = np.exp(2j * np.pi * ky[None, :, None] * shifts[:, 1, None, None]).astype(
            np.complex64
        ) * np.exp(2j * np.pi * kx[None, None, :] * shifts[:, 0, None, None]).astype(np.complex64)
        aligned = ft * ramp
        total = aligned.sum(axis=0)
        # cc_i(r) = Σ_x frame_i(x + r)·ref_i(x), ref_i = the others: its peak is where frame i's content sits
        cc = sfft.irfft2(ft * np.conj(total[None] - aligned) * filt, s=(my, mx), workers=WORKERS)
        new = np.zeros_like(shifts)
        for i in range(n):
            dy, dx = peak_near_zero(cc[i], max_shift / min(scale))
            new[i] = (dx * scale[1], dy * scale[0])
        new = smooth_trajectory(new - new.mean(axis=0), smooth_degree)
        change = np.abs(new - shifts).max()
        shifts = new
        if change < settings.tolerance_px:
            break
    return shifts


def patch_grid(settings: MotionSettings, shape: tuple[int, int]) -> tuple[int, int]:
    """The (x, y) patch grid a frame of ``shape`` supports: the requested one, but no patch under
    ``min_patch_px``. A small patch of a low-dose frame holds too few counts for its shift to be more than
    noise (5 × 5 patches of a 512² tilt image at 1.5 e/px per frame 'measured' 4 px of local motion where
    there was none, and applying that blurred away the Thon rings)."""
    gx, gy = settings.patches
    ny, nx = shape
    return (max(1, min(gx, nx // settings.min_patch_px)), max(1, min(gy, ny // settings.min_patch_px)))


def _time_basis(n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    g = np.stack([t, t**2, t**3], axis=1)
    return g - g.mean(axis=0)


def _space_basis(xy: np.ndarray) -> np.ndarray:
    x, y = xy[:, 0], xy[:, 1]
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)


def fit_local_model(centres: np.ndarray, residuals: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Least-squares coefficients (18, 2) of MotionCor2's smooth deformation model."""
    n_frames = residuals.shape[1]
    xy = centres / np.array([shape[1], shape[0]]) * 2 - 1
    design = np.einsum("pa,tb->ptab", _space_basis(xy), _time_basis(n_frames)).reshape(-1, 18)
    coef, *_ = np.linalg.lstsq(design, residuals.reshape(-1, 2), rcond=None)
    return coef


def local_shifts(
    coef: np.ndarray, points_xy: np.ndarray, n_frames: int, shape: tuple[int, int]
) -> np.ndarray:
    """The model's local shifts (n_points, n_frames, 2) at ``points_xy`` (x, y) in px of ``shape``."""
    xy = points_xy / np.array([shape[1], shape[0]]) * 2 - 1
    design = np.einsum("pa,tb->ptab", _space_basis(xy), _time_basis(n_frames)).reshape(-1, 18)
    return (design @ coef).reshape(len(points_xy), n_frames, 2)


def _grid_edges(n: int, cells: int) -> np.ndarray:
    return np.linspace(0, n, cells + 1).round().astype(int)


def patch_residuals(
    aligned: np.ndarray, pixel_A: float, settings: MotionSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Residual drift per patch of the globally aligned stack: centres (p, 2) and shifts (p, n, 2)."""
    n, ny, nx = aligned.shape
    gx, gy = settings.patches
    ex, ey = _grid_edges(nx, gx), _grid_edges(ny, gy)
    centres, shifts = [], []
    for j in range(gy):
        for i in range(gx):
            cy, cx = (ey[j] + ey[j + 1]) / 2, (ex[i] + ex[i + 1]) / 2
            hy = max(16, int((ey[j + 1] - ey[j]) * 0.75))
            hx = max(16, int((ex[i + 1] - ex[i]) * 0.75))
            y0, x0 = int(max(0, min(ny - 2 * hy, cy - hy))), int(max(0, min(nx - 2 * hx, cx - hx)))
            patch = aligned[:, y0 : y0 + 2 * hy, x0 : x0 + 2 * hx]
            centres.append((cx, cy))
            shifts.append(align_frames(patch, pixel_A, settings.bfactor_patch_A2, settings))
    return np.array(centres), np.stack(shifts)


# ---------------------------------------------------------------------------------------------------
# The dose-weighted sum


@dataclass(frozen=True)
class _Tile:
    y0: int
    y1: int
    x0: int
    x1: int
    wy: np.ndarray
    wx: np.ndarray
    centre_xy: tuple[float, float]


def _ramp_weights(lo: int, hi: int, a: int, b: int, margin: int, n: int) -> np.ndarray:
    """1 inside the cell [a, b), linear ramps over ±margin at inner cell edges (a partition of unity)."""
    x = np.arange(lo, hi) + 0.5
    left = np.ones_like(x) if a == 0 else np.clip((x - (a - margin)) / (2 * margin), 0, 1)
    right = np.ones_like(x) if b == n else np.clip(((b + margin) - x) / (2 * margin), 0, 1)
    return (left * right).astype(np.float32)


def _tiles(shape: tuple[int, int], grid: tuple[int, int]) -> list[_Tile]:
    ny, nx = shape
    gx, gy = grid
    ex, ey = _grid_edges(nx, gx), _grid_edges(ny, gy)
    mx = max(1, int(np.diff(ex).min() // 4)) if gx > 1 else 0
    my = max(1, int(np.diff(ey).min() // 4)) if gy > 1 else 0
    tiles = []
    for j in range(gy):
        for i in range(gx):
            y0, y1 = max(0, ey[j] - my), min(ny, ey[j + 1] + my)
            x0, x1 = max(0, ex[i] - mx), min(nx, ex[i + 1] + mx)
            tiles.append(
                _Tile(
                    y0,
                    y1,
                    x0,
                    x1,
                    _ramp_weights(y0, y1, ey[j], ey[j + 1], my, ny)
                    if gy > 1
                    else np.ones(y1 - y0, np.float32),
                    _ramp_weights(x0, x1, ex[i], ex[i + 1], mx, nx)
                    if gx > 1
                    else np.ones(x1 - x0, np.float32),
                    ((ex[i] + ex[i + 1]) / 2, (ey[j] + ey[j + 1]) / 2),
                )
            )
    return tiles


@functools.lru_cache(maxsize=64)
def _tile_terms(shape: tuple[int, int], pixel_A: float, voltage_kV: float):
    """Per tile shape: 1/(2·N_e(k)) on its half spectrum (q_i = exp(−N_i·h)) and the 1-D frequencies
    (cycles/px) of its phase ramps. Computed once per shape, not per frame."""
    k = np.hypot(np.fft.fftfreq(shape[0], d=pixel_A)[:, None], np.fft.rfftfreq(shape[1], d=pixel_A)[None, :])
    h = (0.5 / critical_exposure(k, voltage_kV)).astype(np.float32)
    return h, np.fft.fftfreq(shape[0]), np.fft.rfftfreq(shape[1])


def _shift_ramp(ky: np.ndarray, kx: np.ndarray, dx: float, dy: float) -> np.ndarray:
    return (
        np.exp(2j * np.pi * ky * dy).astype(np.complex64)[:, None]
        * np.exp(2j * np.pi * kx * dx).astype(np.complex64)[None, :]
    )


def _partial_sums(
    frames: np.ndarray,
    index: np.ndarray,
    gain: np.ndarray | None,
    tiles: list[_Tile],
    tile_shifts: np.ndarray,
    exposures: np.ndarray,
    pixel_A: float,
    voltage_kV: float,
) -> list[np.ndarray]:
    """Per tile: Fourier sums (all, even, odd) of this chunk of frames, shifted and dose-filtered."""
    out = []
    frames = np.asarray(frames, np.float32)
    if gain is not None:
        frames = frames * gain
    for t, tile in enumerate(tiles):
        h, ky, kx = _tile_terms((tile.y1 - tile.y0, tile.x1 - tile.x0), pixel_A, voltage_kV)
        acc = np.zeros((3, *h.shape), np.complex64)
        for local_i, i in enumerate(index):
            ft = sfft.rfft2(frames[local_i, tile.y0 : tile.y1, tile.x0 : tile.x1])
            dx, dy = tile_shifts[t, i]
            ft *= _shift_ramp(ky, kx, dx, dy)
            ft *= np.exp(np.float32(-exposures[i]) * h)
            acc[0] += ft
            acc[1 + (i % 2)] += ft
        out.append(acc)
    return out


def _add(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    return [x + y for x, y in zip(a, b, strict=True)]


def dose_weighted_sums(
    frames,
    gain: np.ndarray | None,
    shifts_px: np.ndarray,
    pixel_A: float,
    dose_per_frame: float,
    pre_exposure: float = 0.0,
    voltage_kV: float = 300.0,
    local: Callable[[np.ndarray], np.ndarray] | None = None,
    grid: tuple[int, int] = (1, 1),
    frames_per_task: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all, even, odd) dose-weighted, drift-corrected sums; frames (n, ny, nx) numpy or dask, streamed.

    ``local(points_xy) -> (n_points, n_frames, 2)`` adds local shifts at tile centres (``grid`` tiles).
    """
    n, ny, nx = frames.shape
    tiles = _tiles((ny, nx), grid if local is not None else (1, 1))
    centres = np.array([t.centre_xy for t in tiles])
    tile_shifts = np.repeat(shifts_px[None], len(tiles), axis=0)
    if local is not None:
        tile_shifts = tile_shifts + local(centres)
    exposures = frame_exposures(n, dose_per_frame, pre_exposure)
    parts = []
    for start in range(0, n, frames_per_task):
        idx = np.arange(start, min(n, start + frames_per_task))
        chunk = frames[start : idx[-1] + 1]
        parts.append(
            dask.delayed(_partial_sums, pure=False)(
                chunk, idx, gain, tiles, tile_shifts, exposures, pixel_A, voltage_kV
            )
        )
    while len(parts) > 1:  # pairwise tree: few partial sums alive at once
        parts = [
            dask.delayed(_add, pure=False)(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
            for i in range(0, len(parts), 2)
        ]
    (sums,) = dask.compute(parts[0], scheduler="threads")
    images = np.zeros((3, ny, nx), np.float32)
    subsets = [np.arange(n), np.arange(0, n, 2), np.arange(1, n, 2)]
    for t, tile in enumerate(tiles):
        shape = (tile.y1 - tile.y0, tile.x1 - tile.x0)
        h, _, _ = _tile_terms(shape, pixel_A, voltage_kV)
        w = tile.wy[:, None] * tile.wx[None, :]
        sq = np.zeros((3, *h.shape), np.float32)  # Σ q_i² per subset, frame by frame (bounded memory)
        for i in range(n):
            q2 = np.exp(np.float32(-2.0 * exposures[i]) * h)
            sq[0] += q2
            sq[1 + (i % 2)] += q2
        for s, subset in enumerate(subsets):
            if len(subset) == 0:
                continue
            norm = np.sqrt(np.float32(len(subset)) / np.maximum(sq[s], np.float32(1e-30)))
            img = sfft.irfft2(sums[t][s] * norm, s=shape)
            images[s, tile.y0 : tile.y1, tile.x0 : tile.x1] += img * w
    return images[0], images[1], images[2]


# ---------------------------------------------------------------------------------------------------
# The whole movie


def correct_movie(
    frames,
    pixel_A: float,
    dose_per_frame: float,
    gain: np.ndarray | None = None,
    pre_exposure: float = 0.0,
    voltage_kV: float = 300.0,
    settings: MotionSettings = MotionSettings(),
) -> MotionResult:
    """Motion-correct one movie (n_frames, ny, nx), numpy or dask (read frame chunk by frame chunk)."""
    if frames.ndim != 3 or frames.shape[0] < 1:
        raise ValueError(f"a movie must be (n_frames, ny, nx), got shape {frames.shape}")
    n, ny, nx = frames.shape
    if gain is not None and tuple(gain.shape) != (ny, nx):
        raise ValueError(f"gain reference shape {tuple(gain.shape)} does not match the frames' {(ny, nx)}")
    scale = min(1.0, settings.estimation_size / max(ny, nx))
    est_shape = (max(2, int(round(ny * scale / 2)) * 2), max(2, int(round(nx * scale / 2)) * 2))
    binning = ny / est_shape[0]

    def small(chunk: np.ndarray) -> np.ndarray:
        chunk = np.asarray(chunk, np.float32)
        if gain is not None:
            chunk = chunk * gain
        return np.stack([fourier_bin(f, est_shape) for f in chunk])

    tasks = [
        dask.delayed(small)(frames[s : s + settings.frames_per_task])
        for s in range(0, n, settings.frames_per_task)
    ]
    est = np.concatenate(dask.compute(*tasks, scheduler="threads"))
    est_pixel = pixel_A * binning
    shifts_est = (
        align_frames(est, est_pixel, settings.bfactor_global_A2, settings, settings.trajectory_degree)
        if n > 1
        else np.zeros((1, 2))
    )
    shifts = shifts_est * binning

    local, centres, residuals, local_rms = None, np.zeros((0, 2)), np.zeros((0, n, 2)), 0.0
    patches = patch_grid(settings, (ny, nx))
    settings = replace(settings, patches=patches)
    if patches != (1, 1) and n >= 4:
        aligned = sfft.irfft2(sfft.rfft2(est) * _phase_ramp(est.shape[1:], shifts_est), s=est.shape[1:])
        centres_est, residuals_est = patch_residuals(aligned, est_pixel, settings)
        coef = fit_local_model(centres_est, residuals_est, est.shape[1:]) * binning
        centres, residuals = centres_est * binning, residuals_est * binning
        model = local_shifts(coef, centres, n, (ny, nx))
        local_rms = float(np.sqrt((model**2).sum(axis=2).mean()))
        if local_rms > settings.local_threshold_px:

            def local(points: np.ndarray, coef=coef) -> np.ndarray:
                return local_shifts(coef, points, n, (ny, nx))

    micrograph, even, odd = dose_weighted_sums(
        frames,
        gain,
        shifts,
        pixel_A,
        dose_per_frame,
        pre_exposure,
        voltage_kV,
        local=local,
        grid=settings.patches,
        frames_per_task=settings.frames_per_task,
    )
    return MotionResult(
        micrograph=micrograph,
        even=even,
        odd=odd,
        shifts_px=shifts,
        patch_centres_px=centres,
        patch_shifts_px=residuals,
        local_model_rms_px=local_rms,
        local_applied=local is not None,
        binning=binning,
        metrics=motion_metrics(shifts, dose_per_frame, pixel_A)
        | {
            "local_motion_rms_px": local_rms,
            "patches_used": int(len(centres)),
            "n_frames": n,
            "drift_rms_px": float(math.sqrt((shifts**2).sum(axis=1).mean())),
        },
    )
