"""Beam-induced motion correction of one movie (MotionCor2's scheme on the CPU, fast enough for a live session).

1. Hot pixels (:mod:`em_platform.cryo.hot_pixels`) found in the first frames' sum and replaced in every
   frame; gain applied (normalised frame = raw counts × gain reference, SerialEM's convention).
2. Full-frame drift on frames binned in real space to at most ``estimation_size``: each frame
   cross-correlated with the sum of all the others (leave-one-out, so its own noise does not pull it to
   zero) under a B-factor low-pass; sub-pixel peaks; repeated until no shift changes by more than 0.01 px.
   The trajectory follows physics (:mod:`em_platform.cryo.trajectory`): an early exponential jump plus slow
   drift when that fits the measured shifts within their noise, else as little smoothing as the noise
   needs (a cubic in time, the earlier prior, left 0.7–2.4 px on real movies whose first frames jump).
3. Local motion only where the data show it: patch drift of the globally aligned frames (a grid of patches,
   5 × 5 by default, none under ``min_patch_px``) fitted by MotionCor2's smooth model (quadratic in x, y
   times cubic in time), applied only when the model explains significantly more than the patches' own
   measurement noise (an F-like test at ``local_significance``) and moves some place by more than
   ``local_threshold_px``. A rigid movie gets a rigid correction.
4. The dose-weighted sum (Grant–Grigorieff): each frame transformed once at full resolution, shifted by a
   Fourier phase ramp, weighted and accumulated in Fourier space (even and odd frames in two threads, each
   with one accumulator: memory is two spectra, not one per frame); one inverse transform per sum. With
   local motion, per tile (the patch grid with overlapping margins, blended by a partition of unity) at the
   tile centre's global + local shift. Even and odd frame sums are kept for Noise2Noise-style denoising and
   half-set FSC.

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

from em_platform.cryo.dose_weighting import critical_exposure, frame_exposures
from em_platform.cryo.hot_pixels import HotPixels, find_hot_pixels
from em_platform.cryo.trajectory import Trajectory, fit_trajectory
from em_platform.lazy_import import LazyModule

sfft = LazyModule("scipy.fft")

DOSE_MOTIONSTATS_CUTOFF = 4.0  # e/Å²: cryoem-services splits early / late motion here


@dataclass(frozen=True)
class MotionSettings:
    patches: tuple[int, int] = (5, 5)  # (x, y) patch grid; (1, 1) = full-frame only
    estimation_size: int = (
        1024  # frames are binned (real space, whole pixels) to at most this for the estimation
    )
    bfactor_global_A2: float = 500.0
    bfactor_patch_A2: float = 1000.0
    max_iterations: int = 8
    tolerance_px: float = 0.01
    trajectory: str = "physical"  # "physical" (jump + drift, else GCV smoothing), "smooth", "none"
    local_motion: str = "auto"  # "auto": only when significant; "on": always; "off": never
    local_significance: float = 1e-3  # the test's false-alarm probability on a rigid movie
    local_threshold_px: float = 0.1  # and the model must move some place by at least this (RMS)
    max_shift_fraction: float = 0.08  # peaks searched within this fraction of the frame size
    frames_per_task: int = 4
    min_patch_px: int = 512  # full-resolution px: fewer patches on a smaller frame (MotionCor2's are ~800)
    hot_pixel_sigma: float = 12.0  # Poisson σ above the neighbourhood; 0 = no hot-pixel search
    hot_pixel_frames: int = 16  # the first frames summed to find them
    threads: int = 0  # 0 = one per core
    cache_mib: int = 2048  # a movie up to this size is read once and kept (raw) for the sum
    patch_iterations: int = 2  # the patches start from the global alignment: a few rounds settle them
    patch_group: int = 2  # frames summed per patch measurement (MotionCor2's -Group)
    gain_reference: str = ""  # a path (relative to the mdoc's folder) that overrides the session's rule
    gain_rotation: int = 0  # MotionCor2's -RotGain: × 90° counter-clockwise (y up)
    gain_flip: int = 0  # MotionCor2's -FlipGain: 1 upside down, 2 left-right (after the rotation)


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
    trajectory: str = "none",
) -> Trajectory:
    """Iterative leave-one-out alignment of a (n, ny, nx) stack: the drift (dx, dy) in its px, as the
    ``trajectory`` model (:func:`~em_platform.cryo.trajectory.fit_trajectory`) makes of the measured peaks.

    The correlations are B-factor filtered, so they are computed on the band the filter keeps (a coarser
    grid of lags, the peak found there and scaled back), a few frames per threaded transform.
    """
    n, ny, nx = frames.shape
    my, mx = _kept_band(ny, pixel_A, bfactor_A2), _kept_band(nx, pixel_A, bfactor_A2)
    rows = np.r_[0 : my // 2, ny - my // 2 : ny]
    spectra = sfft.rfft2(
        np.asarray(frames, np.float32) - frames.mean(axis=(1, 2), keepdims=True, dtype=np.float32),
        workers=WORKERS,
    )
    ft = spectra if (my, mx) == (ny, nx) else np.ascontiguousarray(spectra[:, rows, : mx // 2 + 1])
    del spectra
    ky = np.fft.fftfreq(ny)[rows]  # cycles per full-grid px
    kx = np.fft.rfftfreq(nx)[: mx // 2 + 1]
    filt = np.exp(-bfactor_A2 * ((ky[:, None] / pixel_A) ** 2 + (kx[None, :] / pixel_A) ** 2) / 4.0)
    filt = filt.astype(np.float32)
    # cc_i = frame_i ⋆ (total − aligned_i) = F_i·conj(total) − |F_i|²·conj(ramp_i): the own-frame term
    # needs no transform of its own, and nothing of the stack's size is built per round
    weighted = ft * filt
    power = (ft.real**2 + ft.imag**2) * filt
    scale = (ny / my, nx / mx)  # full-grid px per lag of the coarse correlation
    fitted = Trajectory(np.zeros((n, 2)), "measured", 0.0)
    max_shift = max(4.0, settings.max_shift_fraction * min(ny, nx) * (1 if ny > 256 else 2))
    for _ in range(settings.max_iterations):
        shifts = fitted.shifts
        ramp_y = np.exp(2j * np.pi * ky[None, :] * shifts[:, 1, None]).astype(np.complex64)
        ramp_x = np.exp(2j * np.pi * kx[None, :] * shifts[:, 0, None]).astype(np.complex64)
        total = np.zeros(ft.shape[1:], np.complex64)
        for i in range(n):
            total += ft[i] * ramp_y[i][:, None] * ramp_x[i][None, :]
        total = np.conj(total)
        measured = np.zeros_like(shifts)
        for start in range(0, n, 8):  # a few frames per transform: threads, bounded memory
            stop = min(n, start + 8)
            spec = weighted[start:stop] * total[None] - power[start:stop] * np.conj(
                ramp_y[start:stop, :, None] * ramp_x[start:stop, None, :]
            )
            cc = sfft.irfft2(spec, s=(my, mx), workers=WORKERS)
            for i in range(start, stop):
                dy, dx = peak_near_zero(cc[i - start], max_shift / min(scale))
                measured[i] = (dx * scale[1], dy * scale[0])
        new = fit_trajectory(measured, trajectory)
        change = np.abs(new.shifts - shifts).max()
        fitted = new
        if change < settings.tolerance_px:
            break
    return fitted


def patch_grid(settings: MotionSettings, shape: tuple[int, int]) -> tuple[int, int]:
    """The (x, y) patch grid a frame of ``shape`` supports: the requested one, but no patch under
    ``min_patch_px``. A small patch of a low-dose frame holds too few counts for its shift to be more than
    noise (5 × 5 patches of a 512² tilt image at 1.5 e/px per frame 'measured' 4 px of local motion where
    there was none, and applying that blurred away the Thon rings)."""
    gx, gy = settings.patches
    ny, nx = shape
    return (max(1, min(gx, nx // settings.min_patch_px)), max(1, min(gy, ny // settings.min_patch_px)))


def _time_basis(n: int, times: np.ndarray | None = None) -> np.ndarray:
    """(t, t², t³) at ``times`` (frame indices, default every frame), centred over the movie's frames."""
    frames = np.arange(n, dtype=np.float64)
    times = frames if times is None else np.asarray(times, np.float64)

    def cubic(x: np.ndarray) -> np.ndarray:
        t = x / max(n - 1, 1)
        return np.stack([t, t**2, t**3], axis=1)

    return cubic(times) - cubic(frames).mean(axis=0)


def _space_basis(xy: np.ndarray) -> np.ndarray:
    x, y = xy[:, 0], xy[:, 1]
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)


def fit_local_model(
    centres: np.ndarray,
    residuals: np.ndarray,
    shape: tuple[int, int],
    times: np.ndarray | None = None,
    n_frames: int | None = None,
) -> np.ndarray:
    """Least-squares coefficients (18, 2) of MotionCor2's smooth deformation model from patch residuals
    (p, t, 2) measured at ``times`` (frame indices of a movie of ``n_frames``; default: every frame)."""
    n_frames = n_frames or residuals.shape[1]
    xy = centres / np.array([shape[1], shape[0]]) * 2 - 1
    design = np.einsum("pa,tb->ptab", _space_basis(xy), _time_basis(n_frames, times)).reshape(-1, 18)
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
    aligned: np.ndarray, pixel_A: float, settings: MotionSettings, group: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residual drift per patch of the globally aligned stack, frames summed ``group`` at a time (twice the
    counts per patch, half the transforms): centres (p, 2), shifts (p, g, 2) and each group's mean frame
    index (g,)."""
    n, ny, nx = aligned.shape
    g = n // group
    times = np.arange(g * group, dtype=np.float64).reshape(g, group).mean(axis=1)
    if group > 1:
        aligned = aligned[: g * group].reshape(g, group, ny, nx).sum(axis=1)
    gx, gy = settings.patches
    ex, ey = _grid_edges(nx, gx), _grid_edges(ny, gy)
    patch_settings = replace(settings, max_iterations=settings.patch_iterations)
    centres, shifts = [], []
    for j in range(gy):
        for i in range(gx):
            cy, cx = (ey[j] + ey[j + 1]) / 2, (ex[i] + ex[i + 1]) / 2
            hy = max(16, int((ey[j + 1] - ey[j]) * 0.75))
            hx = max(16, int((ex[i + 1] - ex[i]) * 0.75))
            y0, x0 = int(max(0, min(ny - 2 * hy, cy - hy))), int(max(0, min(nx - 2 * hx, cx - hx)))
            patch = aligned[:, y0 : y0 + 2 * hy, x0 : x0 + 2 * hx]
            centres.append((cx, cy))
            shifts.append(align_frames(patch, pixel_A, settings.bfactor_patch_A2, patch_settings).shifts)
    return np.array(centres), np.stack(shifts), times


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
# The whole movie, pass by pass


def _threads(settings: MotionSettings) -> int:
    return settings.threads or WORKERS


class MovieReader:
    """A movie's frames read once: raw chunks (their own integer type) kept in memory while the whole movie
    fits ``cache_mib`` (a 4096² × 40 uint16 movie: 1.3 GiB), so the sum does not read (or decompress) it a
    second time; a larger movie is read again, chunk by chunk, and memory stays bounded."""

    def __init__(self, frames, cache_mib: int):
        self.frames = frames
        self.n = frames.shape[0]
        itemsize = np.dtype(getattr(frames, "dtype", np.float32)).itemsize
        self.keep = self.n * frames.shape[1] * frames.shape[2] * itemsize <= cache_mib * 2**20
        self._chunks: dict[tuple[int, int], np.ndarray] = {}

    def raw(self, start: int, stop: int) -> np.ndarray:
        got = self._chunks.get((start, stop))
        if got is None:
            got = np.asarray(self.frames[start:stop])
            if self.keep:
                self._chunks[(start, stop)] = got
        return got

    def frame(self, i: int, step: int) -> np.ndarray:
        """Raw frame ``i`` from the chunk of ``step`` frames that holds it."""
        start = i - i % step
        return self.raw(start, min(self.n, start + step))[i - start]


def find_movie_hot_pixels(
    reader: MovieReader, gain: np.ndarray | None, settings: MotionSettings
) -> HotPixels:
    """Hot pixels from the sum of the first ``hot_pixel_frames`` raw frames (hot_pixels module)."""
    step = settings.frames_per_task
    n = min(reader.n, max(step, settings.hot_pixel_frames - settings.hot_pixel_frames % step or step))
    if settings.hot_pixel_sigma <= 0:
        return find_hot_pixels(np.zeros((0, 0)), n, 0)
    total = np.zeros(reader.frames.shape[1:], np.float32)
    for start in range(0, n, step):
        total += reader.raw(start, min(reader.n, start + step)).sum(axis=0, dtype=np.float32)
    return find_hot_pixels(total, n, settings.hot_pixel_sigma, gain)


def _bin(chunk: np.ndarray, b: int) -> np.ndarray:
    """Whole-pixel b × b means (a ragged border dropped): the estimation frames (OpenCV's area resampling:
    the same means, 15× faster than numpy's strided reduction)."""
    import cv2

    n, ny, nx = chunk.shape
    my, mx = ny // b, nx // b
    if b == 1:
        return chunk
    return np.stack(
        [cv2.resize(f[: my * b, : mx * b], (mx, my), interpolation=cv2.INTER_AREA) for f in chunk]
    )


def estimation_frames(
    reader: MovieReader, gain, hot: HotPixels, binning: int, settings: MotionSettings
) -> np.ndarray:
    """Every frame, corrected and binned by ``binning`` (n, ny // b, nx // b), read in parallel chunks."""
    from concurrent.futures import ThreadPoolExecutor

    n, step = reader.n, settings.frames_per_task
    with ThreadPoolExecutor(_threads(settings)) as pool:
        parts = pool.map(
            lambda s: _bin(hot.normalised(reader.raw(s, min(n, s + step)), gain), binning), range(0, n, step)
        )
        return np.concatenate(list(parts))


def _local_test(residuals: np.ndarray, model: np.ndarray, settings: MotionSettings) -> tuple[bool, dict]:
    """Is the local model more than the patches' measurement noise? (apply it?, the figures).

    Under no local motion the patch residuals are noise of σ (per patch trajectory, from its second
    differences); the model's explained sum of squares over σ² is then χ² with as many degrees of freedom
    as the model has (36). It is applied when that exceeds the ``local_significance`` quantile and the
    model moves some place by at least ``local_threshold_px`` RMS."""
    from scipy.special import chdtri  # χ² quantile (scipy.stats costs seconds to import)

    from em_platform.cryo.trajectory import shift_noise

    sigma = float(np.sqrt(np.mean([shift_noise(r) ** 2 for r in residuals])))
    explained = float((residuals**2).sum() - ((residuals - model) ** 2).sum())
    statistic = explained / max(sigma, 1e-6) ** 2
    critical = float(chdtri(36, settings.local_significance))
    rms = float(np.sqrt((model**2).sum(axis=2).mean()))
    significant = statistic > critical and rms > settings.local_threshold_px
    if settings.local_motion == "on":
        significant = True
    elif settings.local_motion == "off":
        significant = False
    return significant, {
        "local_motion_rms_px": rms,
        "local_noise_px": sigma,
        "local_chi2": round(statistic, 2),
        "local_chi2_critical": round(critical, 2),
    }


def _stream_sum(reader, first, gain, hot, shifts, e_first, step_dose, h, ky, kx, settings) -> np.ndarray:
    """Σ over frames ``first, first + 2, …`` of rfft(frame) × shift ramp × dose filter, one accumulator; the
    filter of each next frame is the last one's times exp(−2·dose·h) (no exponential per frame)."""
    ny, nx = reader.frames.shape[1:]
    acc = np.zeros((ny, nx // 2 + 1), np.complex64)
    q = np.exp(np.float32(-e_first) * h)
    step = np.exp(np.float32(-2.0 * step_dose) * h)
    workers = max(1, _threads(settings) // 2)
    for i in range(first, reader.n, 2):
        frame = hot.normalised(reader.frame(i, settings.frames_per_task), gain)
        ft = sfft.rfft2(frame, workers=workers, overwrite_x=True)
        dx, dy = shifts[i]
        ft *= np.exp(2j * np.pi * ky * dy).astype(np.complex64)[:, None]
        ft *= np.exp(2j * np.pi * kx * dx).astype(np.complex64)[None, :]
        ft *= q
        acc += ft
        q *= step
    return acc


def _sum_of_squares(e_first: float, dose: float, count: int, h: np.ndarray) -> np.ndarray:
    """Σ q_i² over ``count`` frames two apart from exposure ``e_first``: a geometric series, closed form."""
    a = np.float32(2.0 * e_first) * h
    b = np.float32(4.0 * dose) * h  # the exponent's step between q_i² two frames apart
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(b > 1e-7, np.expm1(-b * count) / np.expm1(-b), np.float32(count))
    return (np.exp(-a) * ratio).astype(np.float32)


def global_dose_weighted_sums(
    reader: MovieReader,
    gain: np.ndarray | None,
    hot: HotPixels,
    shifts_px: np.ndarray,
    pixel_A: float,
    dose_per_frame: float,
    pre_exposure: float = 0.0,
    voltage_kV: float = 300.0,
    settings: MotionSettings = MotionSettings(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all, even, odd) dose-weighted sums of whole frames shifted by ``shifts_px``: even and odd frames
    streamed in two threads, one Fourier accumulator each (all = even + odd)."""
    from concurrent.futures import ThreadPoolExecutor

    n = reader.n
    ny, nx = reader.frames.shape[1:]
    h, ky, kx = _tile_terms((ny, nx), pixel_A, voltage_kV)
    exposures = frame_exposures(n, dose_per_frame, pre_exposure)
    with ThreadPoolExecutor(2) as pool:
        even, odd = pool.map(
            lambda first: _stream_sum(
                reader, first, gain, hot, shifts_px, exposures[min(first, n - 1)], dose_per_frame, h, ky, kx,
                settings,
            ),
            (0, 1),
        )  # fmt: skip
    sq_even = _sum_of_squares(exposures[0], dose_per_frame, len(range(0, n, 2)), h)
    sq_odd = _sum_of_squares(exposures[min(1, n - 1)], dose_per_frame, len(range(1, n, 2)), h)
    out = []
    for spectrum, sq, count in (
        (even + odd, sq_even + sq_odd, n),
        (even, sq_even, (n + 1) // 2),
        (odd, sq_odd, n // 2),
    ):
        if not count:
            out.append(np.zeros((ny, nx), np.float32))
            continue
        spectrum *= np.sqrt(np.float32(count) / np.maximum(sq, np.float32(1e-30)))
        out.append(
            sfft.irfft2(spectrum, s=(ny, nx), workers=_threads(settings), overwrite_x=True).astype(np.float32)
        )
    return out[0], out[1], out[2]


def correct_movie(
    frames,
    pixel_A: float,
    dose_per_frame: float,
    gain: np.ndarray | None = None,
    pre_exposure: float = 0.0,
    voltage_kV: float = 300.0,
    settings: MotionSettings = MotionSettings(),
) -> MotionResult:
    """Motion-correct one movie (n_frames, ny, nx), numpy, memory map or dask (read chunk by chunk)."""
    if frames.ndim != 3 or frames.shape[0] < 1:
        raise ValueError(f"a movie must be (n_frames, ny, nx), got shape {frames.shape}")
    n, ny, nx = frames.shape
    if gain is not None and tuple(gain.shape) != (ny, nx):
        raise ValueError(f"gain reference shape {tuple(gain.shape)} does not match the frames' {(ny, nx)}")
    reader = MovieReader(frames, settings.cache_mib)
    hot = find_movie_hot_pixels(reader, gain, settings)
    binning = max(1, math.ceil(max(ny, nx) / settings.estimation_size))
    est = estimation_frames(reader, gain, hot, binning, settings)
    est_pixel = pixel_A * binning
    fitted = (
        align_frames(est, est_pixel, settings.bfactor_global_A2, settings, settings.trajectory)
        if n > 1
        else Trajectory(np.zeros((1, 2)), "measured", 0.0)
    )
    shifts_est = fitted.shifts
    shifts = shifts_est * binning

    local, centres, residuals, local_figures = None, np.zeros((0, 2)), np.zeros((0, n, 2)), {}
    patches = patch_grid(settings, (ny, nx))
    settings = replace(settings, patches=patches)
    if patches != (1, 1) and n >= 4 and settings.local_motion != "off":
        aligned = sfft.irfft2(sfft.rfft2(est) * _phase_ramp(est.shape[1:], shifts_est), s=est.shape[1:])
        group = settings.patch_group if n >= 4 * settings.patch_group else 1
        centres_est, residuals_est, times = patch_residuals(aligned, est_pixel, settings, group)
        del aligned
        coef_est = fit_local_model(centres_est, residuals_est, est.shape[1:], times, n)
        xy = centres_est / np.array([est.shape[2], est.shape[1]]) * 2 - 1
        design = np.einsum("pa,tb->ptab", _space_basis(xy), _time_basis(n, times)).reshape(-1, 18)
        model_est = (design @ coef_est).reshape(residuals_est.shape)
        apply, local_figures = _local_test(residuals_est, model_est, settings)
        local_figures = {k: v * binning if k.endswith("_px") else v for k, v in local_figures.items()}
        coef = coef_est * binning
        centres, residuals = centres_est * binning, residuals_est * binning
        if apply:

            def local(points: np.ndarray, coef=coef) -> np.ndarray:
                return local_shifts(coef, points, n, (ny, nx))

    del est
    if local is None:
        micrograph, even, odd = global_dose_weighted_sums(
            reader, gain, hot, shifts, pixel_A, dose_per_frame, pre_exposure, voltage_kV, settings
        )
    else:
        micrograph, even, odd = dose_weighted_sums(
            _HotPixelFrames(reader, hot),
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
    local_rms = float(local_figures.get("local_motion_rms_px", 0.0))
    return MotionResult(
        micrograph=micrograph,
        even=even,
        odd=odd,
        shifts_px=shifts,
        patch_centres_px=centres,
        patch_shifts_px=residuals,
        local_model_rms_px=local_rms,
        local_applied=local is not None,
        binning=float(binning),
        metrics=motion_metrics(shifts, dose_per_frame, pixel_A)
        | {
            "local_motion_rms_px": local_rms,
            "patches_used": int(len(centres)),
            "n_frames": n,
            "drift_rms_px": float(math.sqrt((shifts**2).sum(axis=1).mean())),
            "hot_pixels": len(hot),
            **fitted.summary(),
            **{k: v for k, v in local_figures.items() if k != "local_motion_rms_px"},
        },
    )


class _HotPixelFrames:
    """A movie whose slices come back with the hot pixels replaced (for the tiled, local-motion sum)."""

    def __init__(self, reader: MovieReader, hot: HotPixels):
        self.reader, self.hot, self.shape, self.ndim = reader, hot, reader.frames.shape, 3

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(self.reader.n)
        return self.hot.normalised(np.asarray(self.reader.frames[start:stop]), None)
