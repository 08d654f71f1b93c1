"""The dose-weighted, drift-corrected sums of a movie (Grant–Grigorieff weights, Fourier-shift alignment).

Whole frames: each frame is normalised (gain, hot pixels) into a reused buffer, transformed once at full
resolution (into a reused spectrum, the sides padded to fast lengths), multiplied by its shift's phase ramp
and accumulated with its dose filter by Horner's scheme (the running sum times the ratio of the filters of
frames two apart: no exponential, and one product, per frame); even and odd frames in two threads, one
accumulator each (memory is two spectra, not one per frame); one inverse transform per sum (all, and the
two halves for Noise2Noise denoising and half-set FSC). The per-frame products run over row blocks of 1 MB
(26 ms a 4k frame instead of 32 over whole arrays). The whole-movie filters are kept for the next movie of
the same shape and doses (:func:`dose_terms`). On this machine a 4k frame's transform is ~75 ms of the
~115 ms the stage spends on it: the floor of the stage.

With local motion, per tile (the patch grid with overlapping margins, blended by a partition of unity) at
the tile centre's global + local shift. Dagster-free.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from em_platform.cryo.dose_weighting import critical_exposure, frame_exposures
from em_platform.cryo.motion_alignment import rfft2_into
from em_platform.cryo.motion_local import grid_edges
from em_platform.lazy_import import LazyModule

sfft = LazyModule("scipy.fft")

ROW_BLOCK_BYTES = (
    1 << 20
)  # spectrum rows per block of the per-frame products (4096²: 26 ms a frame, 32 unblocked)


@functools.lru_cache(maxsize=64)
def tile_terms(shape: tuple[int, int], pixel_A: float, voltage_kV: float):
    """Per shape: 1/(2·N_e(k)) on its half spectrum (q_i = exp(−N_i·h)) and the 1-D frequencies (cycles/px)
    of its phase ramps. Computed once per shape, not per frame (nor per movie of the same shape)."""
    k = np.hypot(np.fft.fftfreq(shape[0], d=pixel_A)[:, None], np.fft.rfftfreq(shape[1], d=pixel_A)[None, :])
    h = (0.5 / critical_exposure(k, voltage_kV)).astype(np.float32)
    h.setflags(write=False)
    return h, np.fft.fftfreq(shape[0]), np.fft.rfftfreq(shape[1])


def shift_ramp(ky: np.ndarray, kx: np.ndarray, dx: float, dy: float) -> np.ndarray:
    return (
        np.exp(2j * np.pi * ky * dy).astype(np.complex64)[:, None]
        * np.exp(2j * np.pi * kx * dx).astype(np.complex64)[None, :]
    )


def accumulate(
    acc: np.ndarray, ft: np.ndarray, ry: np.ndarray, rx: np.ndarray, step: np.ndarray | None
) -> None:
    """acc = acc · step + ft · ry ⊗ rx (Horner's scheme for Σ q_i·ramp_i·F_i, frames taken last to first,
    the dose filters' ratio ``step`` complex so that no product converts a real array); ``ft`` is
    overwritten. Row block by row block, so each block is read from memory once for all its products."""
    rows = max(1, ROW_BLOCK_BYTES // (ft.shape[1] * ft.itemsize))
    for r0 in range(0, ft.shape[0], rows):
        r1 = r0 + rows
        f = ft[r0:r1]
        f *= rx[None, :]
        f *= ry[r0:r1, None]
        a = acc[r0:r1]
        if step is not None:
            a *= step[r0:r1]
        a += f


def _sum_of_squares(e_first: float, dose: float, count: int, h: np.ndarray) -> np.ndarray:
    """Σ q_i² over ``count`` frames two apart from exposure ``e_first``: a geometric series, closed form."""
    a = np.float32(2.0 * e_first) * h
    b = np.float32(4.0 * dose) * h  # the exponent's step between q_i² two frames apart
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(b > 1e-7, np.expm1(-b * count) / np.expm1(-b), np.float32(count))
    return (np.exp(-a) * ratio).astype(np.float32)


@functools.lru_cache(maxsize=1)
def dose_terms(
    shape: tuple[int, int],
    pixel_A: float,
    voltage_kV: float,
    n: int,
    dose_per_frame: float,
    pre_exposure: float,
) -> tuple[np.ndarray, ...]:
    """The whole-frame sum's filters for a movie's shape, optics and doses, for :func:`global_sums`: the
    ratio s = q_{i+2}/q_i of the dose filters of frames two apart (complex64: no product converts a real
    array), and the factors that turn the even and odd streams' Horner sums into the all sum (q_0·N_all,
    q_1·N_all) and into the even and odd sums (q_0·N_even, q_1·N_odd), N the restoration norms
    √(count / Σ q_i²). Kept for the next movie (the last key only: a session's movies share it; a tilt
    series' differ by their pre-exposure), as they cost 0.15 s of exponentials per 4k movie. Computed on
    the rows of non-negative ky only (the filters depend on |k|) and mirrored: half the exponentials."""
    h_all, _, _ = tile_terms(shape, pixel_A, voltage_kV)
    half = shape[0] // 2 + 1  # rows ky ≥ 0; row ny − r has row r's |k|
    h = h_all[:half]
    exposures = frame_exposures(n, dose_per_frame, pre_exposure)
    counts = ((n + 1) // 2, n // 2)
    first = (exposures[0], exposures[min(1, n - 1)])
    q0 = [np.exp(np.float32(-e) * h) for e in first]
    step = np.exp(np.float32(-2.0 * dose_per_frame) * h).astype(np.complex64)
    sq = [_sum_of_squares(e, dose_per_frame, c, h) for e, c in zip(first, counts, strict=True)]
    norms = []
    for total, count in ((sq[0] + sq[1], n), (sq[0], counts[0]), (sq[1], counts[1])):
        np.maximum(total, np.float32(1e-30), out=total)
        np.divide(np.float32(max(count, 1)), total, out=total)
        norms.append(np.sqrt(total, out=total))
    halves = (step, q0[0] * norms[0], q0[1] * norms[0], q0[0] * norms[1], q0[1] * norms[2])
    out = []
    for top in halves:
        whole = np.empty((shape[0], *top.shape[1:]), top.dtype)
        whole[:half] = top
        whole[half:] = top[1 : shape[0] - half + 1][::-1]
        whole.setflags(write=False)
        out.append(whole)
    return tuple(out)


def transform_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The (ny, nx) the whole-frame transforms run at: each side padded to the next length DUCC transforms
    fast (rows: factors up to 11; columns, the real transform's axis: up to 5). A K3's 4092 rows (2²·3·11·31)
    become 4096: the forward transform 15 % and the inverse 40 % faster."""
    return sfft.next_fast_len(shape[0], real=False), sfft.next_fast_len(shape[1], real=True)


def global_sums(
    n: int,
    frame: Callable[[int, np.ndarray], np.ndarray],
    shape: tuple[int, int],
    shifts_px: np.ndarray,
    pixel_A: float,
    dose_per_frame: float,
    pre_exposure: float = 0.0,
    voltage_kV: float = 300.0,
    threads: int = 2,
    fill: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all, even, odd) dose-weighted sums of whole frames shifted by ``shifts_px`` (n, 2) (dx, dy).
    ``frame(i, buffer)`` fills a float32 ``shape`` buffer with normalised frame ``i`` and returns it.

    Each stream (even frames, odd frames) sums last to first by Horner's scheme: Σ_j q_j·R_j·F_j =
    q_first·(R_0·F_0 + s·(R_2·F_2 + s·(…))), s = q_{j+2}/q_j: one product per frame for the dose filter
    instead of two (the filter, and the next filter from it). The inverse transforms run as a complex one
    down the columns, in place, and real ones along the rows (a quarter less than irfft2's copy).

    Frames of a side slow to transform are padded to :func:`transform_shape` with their mean level
    (``fill``: one value per frame; else each frame's own mean), and the sums cut back: only the rows
    and columns a shift carries across the frame's edge see the difference (the level instead of the
    opposite edge's content)."""
    ny, nx = shape
    py, px = transform_shape(shape)
    _, ky, kx = tile_terms((py, px), pixel_A, voltage_kV)
    step, all_even, all_odd, even_norm, odd_norm = dose_terms(
        (py, px), float(pixel_A), float(voltage_kV), n, float(dose_per_frame), float(pre_exposure)
    )
    fft_workers = max(1, threads // 2)
    spectra = [np.empty((py, px // 2 + 1), np.complex64) for _ in range(2)]

    def padded(i: int, buffer: np.ndarray) -> np.ndarray:
        image = frame(i, buffer[:ny, :nx])
        if (py, px) != (ny, nx):
            level = float(fill[i]) if fill is not None else float(image.mean())
            buffer[ny:, :] = level
            buffer[:ny, nx:] = level
        return buffer

    def stream(first: int) -> np.ndarray:
        acc = np.zeros((py, px // 2 + 1), np.complex64)
        buffer = np.empty((py, px), np.float32)
        for j, i in enumerate(range(first + 2 * ((n - 1 - first) // 2), first - 1, -2)):  # last to first
            ft = rfft2_into(padded(i, buffer), spectra[first], fft_workers)
            dx, dy = shifts_px[i]
            ry = np.exp(2j * np.pi * ky * dy).astype(np.complex64)
            rx = np.exp(2j * np.pi * kx * dx).astype(np.complex64)
            accumulate(acc, ft, ry, rx, step if j else None)
        return acc

    def inverse(spectrum: np.ndarray) -> np.ndarray:
        columns = sfft.ifft(spectrum, axis=0, workers=fft_workers, overwrite_x=True)
        image = sfft.irfft(columns, n=px, axis=1, workers=fft_workers, overwrite_x=True)
        return np.ascontiguousarray(image[:ny, :nx], np.float32)

    with ThreadPoolExecutor(min(2, max(1, threads))) as pool:
        even, odd = pool.map(stream, (0, 1)) if n > 1 else (stream(0), None)
        if odd is None:  # one frame: all = even
            even *= even_norm
            image = inverse(even)
            return image, image.copy(), np.zeros((ny, nx), np.float32)
        total = np.multiply(even, all_even, out=spectra[0])  # the streams' buffers, free now
        total += np.multiply(odd, all_odd, out=spectra[1])
        even *= even_norm
        odd *= odd_norm
        out = list(pool.map(inverse, (total, even, odd)))
    return out[0], out[1], out[2]


# ---------------------------------------------------------------------------------------------------
# With local motion: tile by tile


@dataclass(frozen=True)
class Tile:
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


def tiles(shape: tuple[int, int], grid: tuple[int, int]) -> list[Tile]:
    ny, nx = shape
    gx, gy = grid
    ex, ey = grid_edges(nx, gx), grid_edges(ny, gy)
    mx = max(1, int(np.diff(ex).min() // 4)) if gx > 1 else 0
    my = max(1, int(np.diff(ey).min() // 4)) if gy > 1 else 0
    out = []
    for j in range(gy):
        for i in range(gx):
            y0, y1 = max(0, ey[j] - my), min(ny, ey[j + 1] + my)
            x0, x1 = max(0, ex[i] - mx), min(nx, ex[i + 1] + mx)
            wy = _ramp_weights(y0, y1, ey[j], ey[j + 1], my, ny) if gy > 1 else np.ones(y1 - y0, np.float32)
            wx = _ramp_weights(x0, x1, ex[i], ex[i + 1], mx, nx) if gx > 1 else np.ones(x1 - x0, np.float32)
            out.append(Tile(y0, y1, x0, x1, wy, wx, ((ex[i] + ex[i + 1]) / 2, (ey[j] + ey[j + 1]) / 2)))
    return out


def _partial_sums(
    frames: np.ndarray,
    index: np.ndarray,
    tile_list: list[Tile],
    tile_shifts: np.ndarray,
    exposures: np.ndarray,
    pixel_A: float,
    voltage_kV: float,
) -> list[np.ndarray]:
    """Per tile: Fourier sums (all, even, odd) of this chunk of (normalised) frames, shifted and filtered."""
    out = []
    for t, tile in enumerate(tile_list):
        h, ky, kx = tile_terms((tile.y1 - tile.y0, tile.x1 - tile.x0), pixel_A, voltage_kV)
        acc = np.zeros((3, *h.shape), np.complex64)
        for local_i, i in enumerate(index):
            ft = sfft.rfft2(frames[local_i, tile.y0 : tile.y1, tile.x0 : tile.x1])
            dx, dy = tile_shifts[t, i]
            ft *= shift_ramp(ky, kx, dx, dy)
            ft *= np.exp(np.float32(-exposures[i]) * h)
            acc[0] += ft
            acc[1 + (i % 2)] += ft
        out.append(acc)
    return out


def tiled_sums(
    n: int,
    chunk: Callable[[int, int], np.ndarray],
    shape: tuple[int, int],
    shifts_px: np.ndarray,
    pixel_A: float,
    dose_per_frame: float,
    pre_exposure: float = 0.0,
    voltage_kV: float = 300.0,
    local: Callable[[np.ndarray], np.ndarray] | None = None,
    grid: tuple[int, int] = (1, 1),
    frames_per_task: int = 4,
    threads: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all, even, odd) dose-weighted, drift-corrected sums, tile by tile; ``chunk(start, stop)`` gives
    normalised float32 frames. ``local(points_xy) -> (n_points, n_frames, 2)`` adds local shifts at the
    tile centres (``grid`` tiles). Chunks of frames in parallel threads, their partial sums added."""
    ny, nx = shape
    tile_list = tiles((ny, nx), grid if local is not None else (1, 1))
    centres = np.array([t.centre_xy for t in tile_list])
    tile_shifts = np.repeat(shifts_px[None], len(tile_list), axis=0)
    if local is not None:
        tile_shifts = tile_shifts + local(centres)
    exposures = frame_exposures(n, dose_per_frame, pre_exposure)

    def task(start: int) -> list[np.ndarray]:
        stop = min(n, start + frames_per_task)
        return _partial_sums(chunk(start, stop), np.arange(start, stop), tile_list, tile_shifts, exposures,
                             pixel_A, voltage_kV)  # fmt: skip

    sums = None
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for part in pool.map(task, range(0, n, frames_per_task)):
            sums = part if sums is None else [a + b for a, b in zip(sums, part, strict=True)]
    assert sums is not None  # a movie has frames: one task at least
    images = np.zeros((3, ny, nx), np.float32)
    subsets = [np.arange(n), np.arange(0, n, 2), np.arange(1, n, 2)]
    for t, tile in enumerate(tile_list):
        tile_shape = (tile.y1 - tile.y0, tile.x1 - tile.x0)
        h, _, _ = tile_terms(tile_shape, pixel_A, voltage_kV)
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
            img = sfft.irfft2(sums[t][s] * norm, s=tile_shape)
            images[s, tile.y0 : tile.y1, tile.x0 : tile.x1] += img * w
    return images[0], images[1], images[2]
