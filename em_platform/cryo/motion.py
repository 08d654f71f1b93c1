"""Beam-induced motion correction of one movie (MotionCor2's scheme on the CPU, fast enough for a live session).

1. **Read** (:class:`MovieReader`): the raw frames (their own integer type) used where they are when in
   memory or memory-mapped (an uncompressed MRC: the stage touches its pages, bringing the file into the
   page cache), else read (and decompressed) once into memory, chunks in parallel threads, while the
   movie fits ``cache_mib`` (a 4096² × 40 uint16 movie: 1.3 GiB); a larger one is read chunk by chunk in
   each pass and memory stays bounded.
2. **Gain and defects**: hot pixels (:mod:`em_platform.cryo.hot_pixels`) found in the first frames' sum;
   every frame normalised (raw counts × gain reference, SerialEM's convention, hot pixels at their
   neighbourhood's level) and binned in real space to at most ``estimation_size``² pixels for the
   estimation, in one pass (the binned sides cut to lengths the FFT likes).
3. **Alignment** (:mod:`em_platform.cryo.motion_alignment`): each binned frame against the sum of all the
   others under a B-factor low-pass, on the band the filter keeps: whole correlation maps once, then
   windowed matrix-DFT rounds until no shift changes by more than 0.01 px. The trajectory follows physics
   (:mod:`em_platform.cryo.trajectory`): an early exponential jump plus slow drift when that fits the
   measured shifts within their noise, else as little smoothing as the noise needs.
4. **Patches** (:mod:`em_platform.cryo.motion_local`): local motion only where the data show it: patch
   drift of the globally aligned frames fitted by MotionCor2's smooth model, applied only when it explains
   significantly more than the patches' own measurement noise and moves some place by more than
   ``local_threshold_px``. A rigid movie gets a rigid correction.
5. **Sum and dose weighting** (:mod:`em_platform.cryo.motion_sum`): Grant–Grigorieff weights, each frame
   transformed once at full resolution and shifted by a Fourier phase ramp; even and odd frame sums kept
   for Noise2Noise denoising and half-set FSC. With local motion, per tile.

:class:`MotionResult` ``timings`` holds each stage's wall and CPU seconds (CPU of all threads), so a
movie's fixed costs are visible next to those that grow with its size. Shifts are where a frame's content
sits relative to the reference (the simulator's ``drift_px`` sense), as (dx, dy) in full-resolution
pixels, mean zero over the frames.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from em_platform.cryo.blas_threads import single_threaded_blas
from em_platform.cryo.hot_pixels import HotPixels, find_hot_pixels
from em_platform.cryo.motion_alignment import (
    WORKERS,
    align_spectra,
    band_spectra,
    correlation_peak,
    limit_search,
    peak_near_zero,
)
from em_platform.cryo.motion_local import (
    aligned_groups,
    fit_local_model,
    local_shifts,
    local_test,
    model_at,
    patch_band,
    patch_residuals,
)
from em_platform.cryo.motion_local import patch_grid as _patch_grid
from em_platform.cryo.motion_sum import global_sums, tiled_sums
from em_platform.cryo.trajectory import Trajectory
from em_platform.lazy_import import LazyModule

sfft = LazyModule("scipy.fft")

__all__ = [
    "MotionResult",
    "MotionSettings",
    "align_frames",
    "correct_movie",
    "correlation_peak",
    "dose_weighted_sums",
    "fit_local_model",
    "fourier_bin",
    "limit_search",
    "local_shifts",
    "motion_metrics",
    "patch_grid",
    "peak_near_zero",
]

DOSE_MOTIONSTATS_CUTOFF = 4.0  # e/Å²: cryoem-services splits early / late motion here
STAGES = ("read", "gain_defects", "alignment", "patches", "sum")


@dataclass(frozen=True)
class MotionSettings:
    patches: tuple[int, int] = (5, 5)  # (x, y) patch grid; (1, 1) = full-frame only
    # frames are binned (real space, whole pixels) to at most this squared for the estimation: a square
    # frame to this side, a K3's 5760 × 4092 by 5 (1152 × 818), not by 6 by its long side (the drift error
    # 0.040 / 0.033 px instead of 0.052 / 0.045 on the bench's K3 movies)
    estimation_size: int = 1024
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
    timings: dict = field(default_factory=dict)  # {"wall_s": {stage: s}, "cpu_s": {stage: s}}


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


def patch_grid(settings: MotionSettings, shape: tuple[int, int]) -> tuple[int, int]:
    """The (x, y) patch grid a frame of ``shape`` supports (:func:`em_platform.cryo.motion_local.patch_grid`)."""
    return _patch_grid(settings.patches, settings.min_patch_px, shape)


def align_frames(
    frames: np.ndarray, pixel_A: float, bfactor_A2: float, settings: MotionSettings, trajectory: str = "none"
) -> Trajectory:
    """Iterative leave-one-out alignment of a real (n, ny, nx) stack: the drift (dx, dy) in its px
    (:func:`em_platform.cryo.motion_alignment.align_spectra`)."""
    return align_spectra(
        band_spectra(frames, pixel_A, bfactor_A2),
        pixel_A,
        bfactor_A2,
        max_iterations=settings.max_iterations,
        tolerance_px=settings.tolerance_px,
        max_shift_fraction=settings.max_shift_fraction,
        trajectory=trajectory,
    )


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
    """(all, even, odd) dose-weighted, drift-corrected sums of frames (n, ny, nx), numpy or dask, tile by
    tile (:func:`em_platform.cryo.motion_sum.tiled_sums`); ``local(points_xy)`` adds local shifts."""
    n, ny, nx = frames.shape

    def chunk(start: int, stop: int) -> np.ndarray:
        raw = np.asarray(frames[start:stop])
        return np.multiply(raw, gain, dtype=np.float32) if gain is not None else raw.astype(np.float32)

    return tiled_sums(n, chunk, (ny, nx), shifts_px, pixel_A, dose_per_frame, pre_exposure, voltage_kV,
                      local, grid, frames_per_task, WORKERS)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Reading and normalising


class MovieReader:
    """A movie's raw frames, read as cheaply as their source allows.

    * In memory (numpy), or mapped (numpy memmap, or the dask array sessions make of an uncompressed MRC,
      a plain window on a file): used in place. The read stage touches every page once (the file into the
      page cache now, from disk if it was not there); every later pass reads the mapping, and nothing of
      the movie's size is allocated: on this VM fresh memory costs ~0.6 ms of CPU per MB to fault in
      (the 1.3 GB copy of a 4096² × 40 movie took more CPU than its alignment).
    * Anything else (a dask array of compressed TIFF): read (and decompressed) once, chunk-aligned, chunks
      in parallel, into memory while it fits ``cache_mib``; a larger one chunk by chunk in each pass, and
      ``read_thread_s`` counts that reading inside the other stages.
    """

    def __init__(self, frames, cache_mib: int):
        self.n, self.ny, self.nx = frames.shape
        mapped = _mapped_array(frames)
        self.frames = mapped if mapped is not None else frames
        itemsize = np.dtype(getattr(frames, "dtype", np.float32)).itemsize
        self.array: np.ndarray | None = self.frames if isinstance(self.frames, np.ndarray) else None
        self.keep = self.array is not None or self.n * self.ny * self.nx * itemsize <= cache_mib * 2**20
        self.read_thread_s = 0.0
        self._lock = threading.Lock()

    def _fetch(self, start: int, stop: int) -> np.ndarray:
        t = time.perf_counter()
        part = self.frames[start:stop]
        compute = getattr(part, "compute", None)  # a dask array: read here, in this thread, not in a pool
        out = np.asarray(compute(scheduler="synchronous") if compute is not None else part)
        with self._lock:
            self.read_thread_s += time.perf_counter() - t
        return out

    def read_all(self, pool: ThreadPoolExecutor) -> None:
        """The read stage: a mapped movie's pages touched, one value per page, in parallel; another read
        into memory when it fits (its own chunks, so no chunk is read twice or joined); else nothing."""
        if isinstance(self.array, np.memmap):
            if not self.array.flags.c_contiguous:
                return  # (a reshape would copy it)
            flat = self.array.reshape(self.n, -1)
            stride = max(1, 4096 // self.array.itemsize)
            list(pool.map(lambda i: int(flat[i, ::stride].sum()), range(self.n)))
            return
        if self.array is not None or not self.keep:
            return
        cache = np.empty((self.n, self.ny, self.nx), np.dtype(self.frames.dtype))
        chunks = getattr(self.frames, "chunks", None)
        sizes = chunks[0] if chunks else (4,) * math.ceil(self.n / 4)
        starts = np.cumsum((0, *sizes))[:-1]

        def read(start: int, size: int) -> None:
            cache[start : start + size] = self._fetch(start, start + size)

        list(pool.map(read, starts, sizes))
        self.array = cache

    def raw(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop] if self.array is not None else self._fetch(start, stop)


def _mapped_array(frames) -> np.ndarray | None:
    """The movie as a numpy array when it is one, or a memory map when it is only a dask window on one
    (em_platform.formats.lazy's, as sessions read an uncompressed MRC); else None."""
    if isinstance(frames, np.ndarray):
        return frames
    from em_platform.formats.lazy import MemmapSlicer

    layers = getattr(getattr(frames, "dask", None), "layers", None)
    name = getattr(frames, "name", "")
    if layers is None or set(layers) != {name, "original-" + name}:
        return None
    source = frames.dask.get("original-" + name)
    if (
        not isinstance(source, MemmapSlicer)
        or source.shape != tuple(frames.shape)
        or source.dtype != frames.dtype
    ):
        return None
    return np.memmap(source.path, mode="r", dtype=source.dtype, offset=source.offset, shape=source.shape,
                     order=source.order)  # fmt: skip


def estimation_binning(shape: tuple[int, int], size: int) -> int:
    """The whole-pixel binning that leaves at most ``size``² pixels of a frame of ``shape`` (ny, nx) for the
    estimation (its pixel count, not its long side: a non-square frame keeps its share of the detail)."""
    return max(1, math.ceil(math.sqrt(shape[0] * shape[1]) / size))


def _fast_floor(n: int) -> int:
    """The largest even length ≤ ``n`` whose transform is fast (factors up to 11: a K3's 5760 / 6 = 960 stays,
    its 4092 / 6 = 682 = 2·11·31 becomes 672), or ``n`` itself if small."""
    if n <= 64:
        return n
    m = n - n % 2
    while sfft.next_fast_len(m, real=False) != m:
        m -= 2
    return m


STRIP_PX = 128 * 4096  # pixels per strip of the normalise-and-bin pass: float32, half the core's L2


def normalise_and_bin(
    raw: np.ndarray, gain: np.ndarray | None, hot: HotPixels, b: int, out: np.ndarray, strip: np.ndarray
) -> None:
    """One raw frame normalised (gain, hot pixels) and binned b × b into ``out`` (my, mx), strip of rows by
    strip of rows through ``strip`` (a float32 buffer of whole-bin rows): the normalised strip is binned
    while it is still in cache, instead of writing a whole float32 frame to memory and reading it back
    (14 ms a 4k frame instead of 20). Binning is OpenCV's area resampling: whole-pixel means, 8× faster
    than numpy's strided reduction."""
    import cv2

    my, mx = out.shape
    rows = strip.shape[0]
    for r0 in range(0, my * b, rows):
        r1 = min(my * b, r0 + rows)
        g = gain[r0:r1, : mx * b] if gain is not None else None
        part = hot.normalised_strip(raw[r0:r1, : mx * b], g, r0, strip[: r1 - r0, : mx * b])
        if b == 1:
            out[r0:r1] = part
        else:
            cv2.resize(part, (mx, (r1 - r0) // b), dst=out[r0 // b : r1 // b], interpolation=cv2.INTER_AREA)


def find_movie_hot_pixels(
    reader: MovieReader, gain: np.ndarray | None, settings: MotionSettings, pool: ThreadPoolExecutor
) -> HotPixels:
    """Hot pixels from the sum of the first ``hot_pixel_frames`` raw frames (hot_pixels module), the sum
    taken in row strips in parallel."""
    step = settings.frames_per_task
    n = min(reader.n, max(step, settings.hot_pixel_frames - settings.hot_pixel_frames % step or step))
    if settings.hot_pixel_sigma <= 0:
        return find_hot_pixels(np.zeros((0, 0)), n, 0)
    total = np.zeros((reader.ny, reader.nx), np.float32)
    array = reader.array
    if array is not None:
        edges = np.linspace(0, reader.ny, 4 * WORKERS + 1).round().astype(int)

        def strip(k: int) -> None:
            rows = slice(edges[k], edges[k + 1])
            part = array[:n, rows]
            if part.dtype in (np.uint8, np.uint16) and int(part.max()) * n <= np.iinfo(np.uint16).max:
                counts = np.zeros(part.shape[1:], np.uint16)  # integer adds: 3× the float32 ones' speed
                for i in range(n):
                    np.add(counts, part[i], out=counts)
                total[rows] = counts
            else:
                for i in range(n):
                    total[rows] += part[i]

        list(pool.map(strip, range(len(edges) - 1)))
    else:
        for start in range(0, n, step):
            total += reader.raw(start, min(reader.n, start + step)).sum(axis=0, dtype=np.float32)
    return find_hot_pixels(total, n, settings.hot_pixel_sigma, gain, pool)


def estimation_frames(
    reader: MovieReader,
    gain: np.ndarray | None,
    hot: HotPixels,
    binning: int,
    settings: MotionSettings,
    pool: ThreadPoolExecutor,
) -> np.ndarray:
    """Every frame normalised and binned by ``binning`` (n, my, mx), sides cut to fast transform lengths
    (the ragged border dropped); chunks of frames in parallel (:func:`normalise_and_bin`)."""
    n, step = reader.n, settings.frames_per_task
    my, mx = _fast_floor(reader.ny // binning), _fast_floor(reader.nx // binning)
    est = np.empty((n, my, mx), np.float32)
    strip_rows = binning * max(1, STRIP_PX // (reader.nx * binning))

    def task(start: int) -> None:
        strip = np.empty((strip_rows, reader.nx), np.float32)
        raw = reader.raw(start, min(n, start + step))
        for k in range(len(raw)):
            normalise_and_bin(raw[k], gain, hot, binning, est[start + k], strip)

    list(pool.map(task, range(0, n, step)))
    return est


# ---------------------------------------------------------------------------------------------------
# The whole movie, stage by stage


class StageClock:
    """Wall and CPU (all threads) seconds per stage, for :class:`MotionResult` ``timings``."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def timings(self, reader: MovieReader) -> dict:
        out: dict[str, Any] = {
            "wall_s": {k: round(self.wall.get(k, 0.0), 4) for k in STAGES},
            "cpu_s": {k: round(self.cpu.get(k, 0.0), 4) for k in STAGES},
        }
        if not reader.keep:
            out["read_thread_s_in_other_stages"] = round(reader.read_thread_s, 4)
        return out


def _threads(settings: MotionSettings) -> int:
    return settings.threads or WORKERS


def _local_motion(spectra, shifts_est, est_pixel, binning, scale_shape, n, settings):
    """Patch residuals, the local model and its test: (local shifts function or None, centres, residuals,
    figures), all in full-resolution px."""
    ny, nx = scale_shape
    group = settings.patch_group if n >= 4 * settings.patch_group else 1
    band = patch_band(spectra, est_pixel, settings.bfactor_patch_A2)
    frames, times, scale = aligned_groups(spectra, shifts_est, group, band)  # scale: (x, y) est px per px
    centres_g, residuals_g = patch_residuals(
        frames, est_pixel * float(scale.mean()), settings.patches, settings.bfactor_patch_A2,
        settings.patch_iterations, _threads(settings),
    )  # fmt: skip
    # the test in estimation px, as the threshold is; the model applied in full-resolution px
    centres_est, residuals_est = centres_g * scale, residuals_g * scale
    est_shape = (frames.shape[1] * scale[1], frames.shape[2] * scale[0])
    coef_est = fit_local_model(centres_est, residuals_est, est_shape, times, n)
    model_est = model_at(coef_est, centres_est, est_shape, times, n)
    apply, figures = local_test(residuals_est, model_est, settings.local_significance, settings.local_threshold_px,
                                settings.local_motion)  # fmt: skip
    figures = {k: v * binning if k.endswith("_px") else v for k, v in figures.items()}
    centres, residuals = centres_est * binning, residuals_est * binning
    local = None
    if apply:
        coef = fit_local_model(centres, residuals, (ny, nx), times, n)

        def local(points: np.ndarray) -> np.ndarray:
            return local_shifts(coef, points, n, (ny, nx))

    return local, centres, residuals, figures


def correct_movie(
    frames,
    pixel_A: float,
    dose_per_frame: float,
    gain: np.ndarray | None = None,
    pre_exposure: float = 0.0,
    voltage_kV: float = 300.0,
    settings: MotionSettings = MotionSettings(),
) -> MotionResult:
    """Motion-correct one movie (n_frames, ny, nx), numpy, memory map or dask (read chunk by chunk).

    OpenBLAS is held at one thread meanwhile (:mod:`em_platform.cryo.blas_threads`): the stages run their
    own threads, and BLAS's spinning helpers tripled the alignment's CPU time."""
    with single_threaded_blas():
        return _correct_movie(frames, pixel_A, dose_per_frame, gain, pre_exposure, voltage_kV, settings)


def _correct_movie(
    frames,
    pixel_A: float,
    dose_per_frame: float,
    gain: np.ndarray | None,
    pre_exposure: float,
    voltage_kV: float,
    settings: MotionSettings,
) -> MotionResult:
    if frames.ndim != 3 or frames.shape[0] < 1:
        raise ValueError(f"a movie must be (n_frames, ny, nx), got shape {frames.shape}")
    n, ny, nx = frames.shape
    if gain is not None and tuple(gain.shape) != (ny, nx):
        raise ValueError(f"gain reference shape {tuple(gain.shape)} does not match the frames' {(ny, nx)}")
    if gain is not None:
        gain = np.asarray(gain, np.float32)
    clock = StageClock()
    threads = _threads(settings)
    reader = MovieReader(frames, settings.cache_mib)
    binning = estimation_binning((ny, nx), settings.estimation_size)
    est_pixel = pixel_A * binning
    with ThreadPoolExecutor(threads) as pool:
        with clock.stage("read"):
            reader.read_all(pool)
        with clock.stage("gain_defects"):
            hot = find_movie_hot_pixels(reader, gain, settings, pool)
            est = estimation_frames(reader, gain, hot, binning, settings, pool)
            levels = est.mean(axis=(1, 2))  # each frame's mean level (pads its transform: motion_sum)
    with clock.stage("alignment"):
        spectra = band_spectra(est, est_pixel, settings.bfactor_global_A2, workers=threads)
        del est
        fitted = align_spectra(
            spectra,
            est_pixel,
            settings.bfactor_global_A2,
            max_iterations=settings.max_iterations,
            tolerance_px=settings.tolerance_px,
            max_shift_fraction=settings.max_shift_fraction,
            trajectory=settings.trajectory,
            workers=threads,
        )
    shifts = fitted.shifts * binning

    local, centres, residuals, local_figures = None, np.zeros((0, 2)), np.zeros((0, n, 2)), {}
    grid = patch_grid(settings, (ny, nx))
    with clock.stage("patches"):
        if grid != (1, 1) and n >= 4 and settings.local_motion != "off":
            local, centres, residuals, local_figures = _local_motion(
                spectra, fitted.shifts, est_pixel, binning, (ny, nx), n, _with_grid(settings, grid)
            )
    del spectra
    with clock.stage("sum"):
        if local is None:

            def frame(i: int, buffer: np.ndarray) -> np.ndarray:
                return hot.normalised(reader.raw(i, i + 1)[0], gain, out=buffer)

            micrograph, even, odd = global_sums(
                n, frame, (ny, nx), shifts, pixel_A, dose_per_frame, pre_exposure, voltage_kV, threads, levels
            )
        else:
            buffers = threading.local()  # one chunk's normalised frames per thread, reused

            def chunk(start: int, stop: int) -> np.ndarray:
                buffer = getattr(buffers, "frames", None)
                if buffer is None:
                    buffer = buffers.frames = np.empty((settings.frames_per_task, ny, nx), np.float32)
                return hot.normalised(reader.raw(start, stop), gain, out=buffer[: stop - start])

            micrograph, even, odd = tiled_sums(n, chunk, (ny, nx), shifts, pixel_A, dose_per_frame, pre_exposure,
                                               voltage_kV, local, grid, settings.frames_per_task, threads)  # fmt: skip
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
        timings=clock.timings(reader),
    )


def _with_grid(settings: MotionSettings, grid: tuple[int, int]) -> MotionSettings:
    from dataclasses import replace

    return replace(settings, patches=grid)
