"""Local (patch) motion: measured on the globally aligned frames, modelled, applied only where significant.

The frames are aligned and summed in groups in Fourier space, on the band the patch B-factor keeps (the
global alignment's spectra, undone by the global shifts: exact, and no frame is transformed again), then
cut into a grid of overlapping patches, each aligned like a whole movie (a full correlation round, then
windowed rounds), patches in parallel. MotionCor2's smooth model (quadratic in x, y times cubic in time) is
fitted to the patch residuals and kept only when it explains significantly more than their measurement
noise (:func:`local_test`). Dagster-free.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from em_platform.cryo.motion_alignment import (
    WORKERS,
    BandSpectra,
    _ramps,
    align_spectra,
    aligned_sum,
    band_spectra,
    kept_band,
    sfft,
)

N_COEFFICIENTS = 18  # 6 spatial (1, x, y, x², xy, y²) × 3 temporal (t, t², t³) terms per axis


def patch_grid(patches: tuple[int, int], min_patch_px: int, shape: tuple[int, int]) -> tuple[int, int]:
    """The (x, y) patch grid a frame of ``shape`` supports: ``patches``, but no patch under ``min_patch_px``.
    A small patch of a low-dose frame holds too few counts for its shift to be more than noise (5 × 5
    patches of a 512² tilt image at 1.5 e/px per frame 'measured' 4 px of local motion where there was
    none, and applying that blurred away the Thon rings)."""
    gx, gy = patches
    ny, nx = shape
    return (max(1, min(gx, nx // min_patch_px)), max(1, min(gy, ny // min_patch_px)))


def time_basis(n: int, times: np.ndarray | None = None) -> np.ndarray:
    """(t, t², t³) at ``times`` (frame indices, default every frame), centred over the movie's frames."""
    frames = np.arange(n, dtype=np.float64)
    times = frames if times is None else np.asarray(times, np.float64)

    def cubic(x: np.ndarray) -> np.ndarray:
        t = x / max(n - 1, 1)
        return np.stack([t, t**2, t**3], axis=1)

    return cubic(times) - cubic(frames).mean(axis=0)


def space_basis(xy: np.ndarray) -> np.ndarray:
    x, y = xy[:, 0], xy[:, 1]
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)


def _design(centres: np.ndarray, shape: tuple[int, int], n_frames: int, times=None) -> np.ndarray:
    xy = centres / np.array([shape[1], shape[0]]) * 2 - 1
    return np.einsum("pa,tb->ptab", space_basis(xy), time_basis(n_frames, times)).reshape(-1, N_COEFFICIENTS)


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
    coef, *_ = np.linalg.lstsq(_design(centres, shape, n_frames, times), residuals.reshape(-1, 2), rcond=None)
    return coef


def local_shifts(
    coef: np.ndarray, points_xy: np.ndarray, n_frames: int, shape: tuple[int, int]
) -> np.ndarray:
    """The model's local shifts (n_points, n_frames, 2) at ``points_xy`` (x, y) in px of ``shape``."""
    return (_design(points_xy, shape, n_frames) @ coef).reshape(len(points_xy), n_frames, 2)


def model_at(
    coef: np.ndarray, centres: np.ndarray, shape: tuple[int, int], times, n_frames: int
) -> np.ndarray:
    """The model at the patch centres and measurement times, shaped like the residuals (p, t, 2)."""
    return (_design(centres, shape, n_frames, times) @ coef).reshape(len(centres), len(times), 2)


def grid_edges(n: int, cells: int) -> np.ndarray:
    return np.linspace(0, n, cells + 1).round().astype(int)


def aligned_groups(
    spectra: BandSpectra, shifts: np.ndarray, group: int, band: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frames undone by their ``shifts`` (frame px), summed ``group`` at a time, in real space on the
    grid of ``band`` (the spectra cropped to it): (groups (g, by, bx) float32, each group's mean frame
    index (g,), frame px per px of that grid along (x, y))."""
    part = spectra.crop(band)
    n = len(part.ft)
    g = n // group
    ry, rx = _ramps(part.ky, part.kx, shifts)
    sums = np.empty((g, *part.ft.shape[1:]), np.complex64)
    for i in range(g):
        sums[i] = aligned_sum(part.ft, ry, rx, range(i * group, (i + 1) * group))
    frames = sfft.irfft2(sums, s=part.band, workers=WORKERS).astype(np.float32, copy=False)
    times = np.arange(g * group, dtype=np.float64).reshape(g, group).mean(axis=1)
    return frames, times, np.array([part.shape[1] / part.band[1], part.shape[0] / part.band[0]])


def patch_residuals(
    aligned: np.ndarray,
    pixel_A: float,
    grid: tuple[int, int],
    bfactor_A2: float,
    iterations: int,
    workers: int = WORKERS,
) -> tuple[np.ndarray, np.ndarray]:
    """Residual drift per patch of a globally aligned stack (t, ny, nx): centres (p, 2) and shifts (p, t, 2)
    in its px. Patches are 1.5 cells wide (they overlap), aligned in parallel, one thread each."""
    _, ny, nx = aligned.shape
    gx, gy = grid
    ex, ey = grid_edges(nx, gx), grid_edges(ny, gy)
    boxes = []
    for j in range(gy):
        for i in range(gx):
            cy, cx = (ey[j] + ey[j + 1]) / 2, (ex[i] + ex[i + 1]) / 2
            hy = max(16, int((ey[j + 1] - ey[j]) * 0.75))
            hx = max(16, int((ex[i + 1] - ex[i]) * 0.75))
            y0, x0 = int(max(0, min(ny - 2 * hy, cy - hy))), int(max(0, min(nx - 2 * hx, cx - hx)))
            boxes.append(((cx, cy), (y0, x0, 2 * hy, 2 * hx)))

    def measure(box) -> np.ndarray:
        y0, x0, h, w = box[1]
        spectra = band_spectra(aligned[:, y0 : y0 + h, x0 : x0 + w], pixel_A, bfactor_A2, workers=1)
        coarse = max(32, max(spectra.band) // 2)  # the first round's whole maps: residuals are small
        return align_spectra(spectra, pixel_A, bfactor_A2, max_iterations=iterations, coarse_band=coarse,
                             workers=1).shifts  # fmt: skip

    with ThreadPoolExecutor(max(1, workers)) as pool:
        shifts = list(pool.map(measure, boxes))
    return np.array([b[0] for b in boxes]), np.stack(shifts)


def patch_band(spectra: BandSpectra, pixel_A: float, bfactor_A2: float) -> tuple[int, int]:
    """The band (by, bx) of the spectra's frames that a patch B-factor keeps, the same fraction of each
    axis (the patches' grid keeps square pixels)."""
    ny, nx = spectra.shape
    fraction = max(kept_band(ny, pixel_A, bfactor_A2) / ny, kept_band(nx, pixel_A, bfactor_A2) / nx)
    return int(2 * math.ceil(fraction * ny / 2)), int(2 * math.ceil(fraction * nx / 2))


def local_test(
    residuals: np.ndarray, model: np.ndarray, significance: float, threshold_px: float, mode: str
) -> tuple[bool, dict]:
    """Is the local model more than the patches' measurement noise? (apply it?, the figures).

    Under no local motion the patch residuals are noise of σ (per patch trajectory, from its second
    differences); the model's explained sum of squares over σ² is then χ² with as many degrees of freedom
    as the model has (36). It is applied when that exceeds the ``significance`` quantile and the model
    moves some place by at least ``threshold_px`` RMS; ``mode`` "on" / "off" overrides the test."""
    from scipy.special import chdtri  # χ² quantile (scipy.stats costs seconds to import)

    from em_platform.cryo.trajectory import shift_noise

    sigma = float(np.sqrt(np.mean([shift_noise(r) ** 2 for r in residuals])))
    explained = float((residuals**2).sum() - ((residuals - model) ** 2).sum())
    statistic = explained / max(sigma, 1e-6) ** 2
    critical = float(chdtri(2 * N_COEFFICIENTS, significance))
    rms = float(np.sqrt((model**2).sum(axis=2).mean()))
    significant = statistic > critical and rms > threshold_px
    if mode == "on":
        significant = True
    elif mode == "off":
        significant = False
    return significant, {
        "local_motion_rms_px": rms,
        "local_noise_px": sigma,
        "local_chi2": round(statistic, 2),
        "local_chi2_critical": round(critical, 2),
    }
