"""The per-tile image chain of the live TEM pipeline: flatfield, CLAHE, statistics, focus.

This is the CPU counterpart of the Allen Institute's TEM_graph (docs/seed-systems.md §1.2): a raw
camera tile is flatfield-corrected with the brightfield/darkfield references, contrast-enhanced with
OpenCV CLAHE (clip limit 2, 16×16 tile grid), and measured: min/max/mean/std and a 256-bin histogram
(TEM_comms ``tile.statistics.min_max_mean`` / ``.histogram``) and a focus score in [0, 1], lower is
better (``tile.statistics.focus``). Matching against neighbours is in :mod:`em_platform.stitch.matching`.

Everything here is plain numpy/OpenCV on one tile, holds no global state and is picklable, so a Dask
task can run :func:`process_tile` on a worker. OpenCV may use its own thread pool; a process that runs
one tile per core should call ``cv2.setNumThreads(1)``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

__all__ = [
    "CLAHE_CLIP_LIMIT",
    "CLAHE_GRID",
    "FOCUS_BAND",
    "FOCUS_CROP",
    "Flatfield",
    "ProcessedTile",
    "TileReadError",
    "clahe",
    "flatfield_and_clahe",
    "focus_score",
    "process_tile",
    "raw_statistics",
    "read_tile",
    "specimen_contrast",
    "tile_statistics",
]

CLAHE_CLIP_LIMIT = 2.0  # TEM_graph CLAHENodeGPU clipLimit
CLAHE_GRID = 16  # TEM_graph CLAHENodeGPU tileGridSize (16 × 16 tiles)
FOCUS_CROP = 256  # TEM_graph FFTNode dftSize: the central 256 × 256 px
FOCUS_BAND = (50, 251)  # TEM_graph FocusNode frequencyStart / frequencyEnd
HISTOGRAM_BINS = 256  # TEM_graph HistogramNode bins

_SUPPORTED = (np.dtype(np.uint8), np.dtype(np.uint16))
# flatfield works on row blocks: the float32 product of one (128 × 5000 ≈ 2.6 MB) stays in cache, and the
# blocks are few enough that OpenCV's per-call cost does not count (5000² uint8, one thread: 9.3 ms a tile at
# 128 rows, 16 ms at 16, 12 / 16 ms with two tiles at once; 512+ rows lose the cache again)
_ROWS_PER_BLOCK = 128


def _check_camera_dtype(image: np.ndarray, what: str) -> None:
    if image.dtype not in _SUPPORTED:
        raise TypeError(f"{what} must be uint8 or uint16 (a camera tile), got {image.dtype}")
    if image.ndim != 2:
        raise ValueError(f"{what} must be a 2-D single-channel image, got shape {image.shape}")


# ----------------------------------------------------------------------------------------------------
# Reading a tile


class TileReadError(OSError):
    """A tile file is missing, truncated, corrupt or not a single-channel camera image."""


def read_tile(
    path: str | os.PathLike[str] | BinaryIO, *, expected_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Read one raw camera tile (TIFF through tifffile; other formats through ``cv2.imread``).

    Returns a 2-D uint8 or uint16 array. Raises :class:`TileReadError` naming the file when it is
    missing, truncated or corrupt, not a 2-D uint8/uint16 image, or not ``expected_shape``. (An
    uncompressed TIFF whose pixel bytes were overwritten in place cannot be told from a good one: TIFF
    has no checksum.)
    """
    name = getattr(path, "name", None) or str(path)
    is_file_like = hasattr(path, "read")
    suffix = "" if is_file_like else Path(os.fspath(path)).suffix.lower()  # type: ignore[arg-type]
    if not is_file_like and not os.path.isfile(path):  # type: ignore[arg-type]
        raise TileReadError(f"tile file {name} does not exist (or is not a file)")
    image: np.ndarray | None
    try:
        if is_file_like or suffix in (".tif", ".tiff", ""):
            import tifffile

            image = tifffile.imread(path)
        else:
            image = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)  # type: ignore[arg-type]
            if image is None:
                raise ValueError("OpenCV could not decode it")
    except FileNotFoundError as exc:
        raise TileReadError(f"tile file {name} does not exist: {exc}") from exc
    except Exception as exc:  # tifffile/codecs raise many types for truncated or corrupt data
        raise TileReadError(
            f"tile file {name} is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "re-acquire the tile or remove it from the montage"
        ) from exc
    image = np.asarray(image)
    if image.dtype not in _SUPPORTED or image.ndim != 2:
        raise TileReadError(
            f"tile file {name} holds a {image.dtype} image of shape {image.shape}; "
            "expected a single-channel uint8 or uint16 camera frame"
        )
    if expected_shape is not None and tuple(image.shape) != tuple(expected_shape):
        raise TileReadError(
            f"tile file {name} is {image.shape[0]}×{image.shape[1]} px, expected {expected_shape[0]}×{expected_shape[1]}"
        )
    return image


# ----------------------------------------------------------------------------------------------------
# Flatfield


def _average_frames(frames: np.ndarray | Iterable[np.ndarray], what: str) -> tuple[np.ndarray, int]:
    """Mean of the frames as float32; a single camera frame (uint8/uint16) comes back as it is. Camera counts
    are summed in float32, exact while the sum stays below 2**24 (256 uint16 frames); anything else, or
    more frames, is summed in float64."""
    if isinstance(frames, np.ndarray) and frames.ndim == 2:
        frames = [frames]
    total: np.ndarray | None = None
    n = 0
    for frame in frames:
        frame = np.asarray(frame)
        if frame.ndim != 2:
            raise ValueError(f"{what} frame {n} is not a 2-D image (shape {frame.shape})")
        if total is None:
            total = frame  # a single frame is its own mean (camera counts are exact as they are)
        elif frame.shape != total.shape:
            raise ValueError(f"{what} frame {n} is {frame.shape}, the first one is {total.shape}")
        else:
            exact_in_f32 = frame.dtype in _SUPPORTED and (n + 1) * np.iinfo(frame.dtype).max < 2**24
            if n == 1:  # from the second frame on: our own accumulator (never the caller's first frame)
                total = total.astype(np.float32 if exact_in_f32 and total.dtype in _SUPPORTED else np.float64)
            elif total.dtype == np.float32 and not exact_in_f32:
                total = total.astype(np.float64)
            np.add(total, frame, out=total)
        n += 1
    if total is None:
        raise ValueError(f"no {what} frames given: a flatfield needs at least one")
    if n > 1:
        total /= n
        return total.astype(np.float32, copy=False), n
    return (total if total.dtype in _SUPPORTED else total.astype(np.float32)), n


@dataclass(frozen=True, eq=False)
class Flatfield:
    """A flatfield correction ``(raw − dark) / (bright − dark) · mean(bright − dark)``.

    ``bright`` is the average of frames taken while the stage moves (the specimen averages out), ``dark``
    the average of frames with the beam blanked / screen lowered (pyTEM's Brightfield and Darkfield
    states). The correction is precomputed as ``corrected = raw · gain + offset`` with
    ``gain = mean(bright − dark) / (bright − dark)`` and ``offset = −dark · gain``, so applying it is
    one multiply-add per pixel and a uniform specimen keeps the raw's brightness scale.

    Pixels whose ``bright − dark`` is not positive (a dead pixel, a darkfield brighter than the
    brightfield) or below ``min_response`` of the mean cannot be normalised: they get a gain of 1 (the
    dark offset is still removed) and are counted in ``invalid_pixels``. The gain is also capped at
    ``1 / min_response``.

    The object is picklable (two float32 arrays, 8 bytes per pixel: 200 MB for a 5000² camera).
    """

    gain: np.ndarray
    offset: np.ndarray
    scale: float  # mean(bright − dark) over the valid pixels: the brightness the output keeps
    invalid_pixels: int = 0
    n_bright: int = 0
    n_dark: int = 0

    def __post_init__(self) -> None:
        # C-contiguous, aligned float32: arrays unpickled from a Dask transfer can sit at odd addresses,
        # which makes OpenCV's arithmetic about twice as slow
        for name in ("gain", "offset"):
            object.__setattr__(self, name, np.require(getattr(self, name), np.float32, ["C", "A"]))
        if self.gain.shape != self.offset.shape or self.gain.ndim != 2:
            raise ValueError(
                f"gain {self.gain.shape} and offset {self.offset.shape} must be 2-D and the same shape"
            )

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuild through __init__ (so __post_init__ realigns the arrays) rather than restoring __dict__
        return (
            type(self),
            (self.gain, self.offset, self.scale, self.invalid_pixels, self.n_bright, self.n_dark),
        )

    @classmethod
    def from_frames(
        cls,
        bright_frames: np.ndarray | Iterable[np.ndarray],
        dark_frames: np.ndarray | Iterable[np.ndarray],
        *,
        min_response: float = 0.05,
    ) -> Flatfield:
        """Build the correction from brightfield and darkfield frames (each a 2-D frame, a list of
        frames or a ``(n, h, w)`` stack; several frames are averaged)."""
        bright, n_bright = _average_frames(bright_frames, "brightfield")
        dark, n_dark = _average_frames(dark_frames, "darkfield")
        if bright.shape != dark.shape:
            raise ValueError(
                f"brightfield is {bright.shape} but darkfield is {dark.shape}: they must come from the same camera"
            )
        return cls.from_references(bright, dark, min_response=min_response, n_bright=n_bright, n_dark=n_dark)

    @classmethod
    def from_references(
        cls,
        bright: np.ndarray,
        dark: np.ndarray,
        *,
        min_response: float = 0.05,
        n_bright: int = 1,
        n_dark: int = 1,
    ) -> Flatfield:
        """Build the correction from already-averaged reference images (e.g. ``brightfield.tiff`` and
        ``darkfield.tiff`` as pyTEM stores them)."""
        # Camera counts are used as they are (each row block is converted on the way): no full-frame float copies.
        bright, dark = (
            a if a.dtype in (*_SUPPORTED, np.float32) else a.astype(np.float32)
            for a in map(np.asarray, (bright, dark))
        )
        if bright.shape != dark.shape or bright.ndim != 2:
            raise ValueError(
                f"brightfield {bright.shape} and darkfield {dark.shape} must be 2-D images of the same shape"
            )
        if not 0 < min_response < 1:
            raise ValueError(f"min_response must be in (0, 1), got {min_response}")
        # Row blocks, one reused buffer: only gain and offset are full-size, so building the correction
        # costs about what applying it does instead of five full-frame temporaries (cold pages in a new worker).
        blocks = [slice(i, i + _ROWS_PER_BLOCK) for i in range(0, bright.shape[0], _ROWS_PER_BLOCK)]
        buffer = np.empty((min(_ROWS_PER_BLOCK, bright.shape[0]), bright.shape[1]), np.float32)

        def response(b: slice) -> np.ndarray:
            r = buffer[: bright[b].shape[0]]
            return np.subtract(bright[b], dark[b], out=r)

        def mean_above(threshold: float) -> tuple[float, int]:
            total, count = 0.0, 0
            for b in blocks:
                r = response(b)
                above = r > threshold
                total += float(r.sum(dtype=np.float64, where=above))
                count += int(np.count_nonzero(above))
            return (total / count if count else 0.0), count

        scale, positive = mean_above(0.0)
        if not positive:
            raise ValueError(
                "brightfield is nowhere brighter than darkfield: check the reference frames (beam on for brightfield?)"
            )
        threshold = min_response * scale
        scale, n_valid = mean_above(threshold)
        gain = np.empty(bright.shape, np.float32)
        offset = np.empty(bright.shape, np.float32)
        for b in blocks:
            r = response(b)
            g = gain[b]
            g.fill(1.0)
            np.divide(scale, r, out=g, where=r > threshold)
            np.negative(np.multiply(dark[b], g, out=offset[b]), out=offset[b])
        return cls(
            gain=gain,
            offset=offset,
            scale=scale,
            invalid_pixels=int(bright.size - n_valid),
            n_bright=n_bright,
            n_dark=n_dark,
        )

    @classmethod
    def from_files(
        cls,
        bright_path: str | os.PathLike[str],
        dark_path: str | os.PathLike[str],
        *,
        min_response: float = 0.05,
    ) -> Flatfield:
        """Build the correction from the averaged reference images as pyTEM saves them
        (``brightfield.tiff`` and ``darkfield.tiff``; any numeric dtype)."""
        import tifffile

        references = []
        for what, path in (("brightfield", bright_path), ("darkfield", dark_path)):
            try:
                references.append(np.asarray(tifffile.imread(path), np.float32))
            except Exception as exc:
                raise OSError(
                    f"cannot read the {what} reference {path}: {exc}; acquire the references again"
                ) from exc
        return cls.from_references(*references, min_response=min_response)

    @property
    def shape(self) -> tuple[int, int]:
        return self.gain.shape

    def check(self, raw: np.ndarray) -> np.ndarray:
        """``raw`` as a C-contiguous camera tile this correction applies to; raises naming what is wrong."""
        _check_camera_dtype(raw, "raw tile")
        if raw.shape != self.gain.shape:
            raise ValueError(
                f"raw tile is {raw.shape} but the flatfield references are {self.gain.shape}: wrong camera or binning"
            )
        return np.ascontiguousarray(raw)

    def apply(self, raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Correct one raw tile; the result has the raw's dtype (rounded, clipped to its range)."""
        raw = self.check(raw)
        if out is None:
            out = np.empty_like(raw)
        elif out.shape != raw.shape or out.dtype != raw.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {raw.dtype} array of shape {raw.shape}")
        depth = cv2.CV_8U if raw.dtype == np.uint8 else cv2.CV_16U
        rows = raw.shape[0]
        # one reused block buffer: a fresh temporary per block costs a page fault per 4 KiB where malloc
        # hands big blocks back to the OS at once (as in Dask worker processes: MALLOC_TRIM_THRESHOLD_)
        block = np.empty((min(rows, _ROWS_PER_BLOCK), raw.shape[1]), np.float32)
        for i in range(0, rows, _ROWS_PER_BLOCK):
            j = min(rows, i + _ROWS_PER_BLOCK)
            product = block[: j - i]
            cv2.multiply(raw[i:j], self.gain[i:j], dst=product, dtype=cv2.CV_32F)
            # OpenCV rounds to nearest and saturates to the output depth
            cv2.add(product, self.offset[i:j], dst=out[i:j], dtype=depth)
        return out


# ----------------------------------------------------------------------------------------------------
# CLAHE


def clahe(
    image: np.ndarray,
    clip_limit: float = CLAHE_CLIP_LIMIT,
    grid: int | tuple[int, int] = CLAHE_GRID,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """OpenCV contrast-limited adaptive histogram equalisation (``cv2.createCLAHE``), uint8 or uint16.

    ``grid`` is the number of contextual tiles per axis (an int) or ``(columns, rows)``; the Allen
    pipeline uses ``clip_limit=2`` and a 16 × 16 grid. ``out`` may be ``image`` itself: every tile's
    lookup table is built before a pixel is mapped, so in place gives the same result (tested). uint8
    goes through :mod:`em_platform.tem.clahe_u8` (OpenCV's result, pixel for pixel, in under a third of
    its CPU where the CPU has AVX2).
    """
    _check_camera_dtype(image, "image")
    grid_size = _grid_size(grid)
    image = np.ascontiguousarray(image)
    if out is None:
        out = np.empty_like(image)
    elif out.shape != image.shape or out.dtype != image.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {image.dtype} array of shape {image.shape}")
    if image.dtype == np.uint8:
        from em_platform.tem.clahe_u8 import clahe_u8

        return clahe_u8(image, float(clip_limit), grid_size, out)
    result = _clahe_operator(float(clip_limit), grid_size).apply(image, dst=out)
    if result is not out:  # OpenCV could not write into out (it never happens for a matching array)
        np.copyto(out, result)
    return out


def flatfield_and_clahe(
    raw: np.ndarray,
    flatfield: Flatfield | None,
    clip_limit: float = CLAHE_CLIP_LIMIT,
    grid: int | tuple[int, int] = CLAHE_GRID,
) -> np.ndarray:
    """``clahe(flatfield.apply(raw), clip_limit, grid)`` in a new array (no flatfield: CLAHE of the raw),
    pixel for pixel; for uint8 the correction is made in CLAHE's first pass over the tile
    (:mod:`em_platform.tem.clahe_u8`: 6 ms of CPU less per 5000² tile)."""
    if flatfield is None:
        return clahe(raw, clip_limit, grid)
    if raw.dtype != np.uint8:
        corrected = flatfield.apply(raw)
        return clahe(corrected, clip_limit, grid, out=corrected)
    from em_platform.tem.clahe_u8 import clahe_u8

    raw = flatfield.check(raw)
    grid_size = _grid_size(grid)
    out = np.empty_like(raw)
    return clahe_u8(raw, float(clip_limit), grid_size, out, flatfield=(flatfield.gain, flatfield.offset))


def _grid_size(grid: int | tuple[int, int]) -> tuple[int, int]:
    grid_size = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if len(grid_size) != 2 or min(grid_size) < 1:
        raise ValueError(f"the CLAHE grid must be one or two positive tile counts, got {grid}")
    return int(grid_size[0]), int(grid_size[1])


_CLAHE_OPERATORS = threading.local()


def _clahe_operator(clip_limit: float, grid_size: tuple[int, int]) -> Any:
    """This thread's ``cv2.CLAHE`` for the settings, kept between tiles. An operator holds its padded copy
    of the image (OpenCV pads a 5000 px side to a multiple of the grid) and its lookup tables: made
    anew per tile, the 25 MB copy is fresh memory, and its page faults cost 10-18 ms of kernel time per
    5000² tile. Not shared between threads: ``apply`` writes into those buffers."""
    operators = getattr(_CLAHE_OPERATORS, "by_settings", None)
    if operators is None:
        operators = _CLAHE_OPERATORS.by_settings = {}
    key = (clip_limit, grid_size)
    operator = operators.get(key)
    if operator is None:
        if len(operators) >= 4:  # a handful of settings at most; drop the rest (and their buffers)
            operators.clear()
        operator = operators[key] = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=grid_size)
    return operator


# ----------------------------------------------------------------------------------------------------
# Statistics


def _histogram_u8(image: np.ndarray) -> np.ndarray:
    """Exact 256-bin counts (int64) of a uint8 image: :func:`~em_platform.tem.byte_counts.histogram_u8`
    (``cv2.calcHist`` counts in float32, exact only below 2**24, and took 77 ms a 5000² tile on some cores)."""
    from em_platform.tem.byte_counts import histogram_u8

    return histogram_u8(image)


def tile_statistics(image: np.ndarray) -> dict[str, Any]:
    """min, max, mean, std (ints, as TEM_comms ``MinMaxMean`` sends them), ``mean_float``/``std_float``
    (the same, unrounded, for QC) and a 256-bin ``histogram`` (list of ints).

    For uint8 the bins are the 256 grey values; for uint16 bin ``i`` counts values ``256·i … 256·i + 255``.
    ``std`` is the population standard deviation.
    """
    _check_camera_dtype(image, "image")
    image = np.ascontiguousarray(image)
    if image.dtype == np.uint8:  # one pass: everything follows exactly from the 256 grey-value counts
        hist = _histogram_u8(image)
        occupied = np.flatnonzero(hist)
        low, high = float(occupied[0]), float(occupied[-1])
        values = np.arange(HISTOGRAM_BINS, dtype=np.float64)
        n = hist.sum()
        mean_f = float(hist @ values / n)
        std_f = math.sqrt(max(0.0, float(hist @ (values - mean_f) ** 2 / n)))
    else:
        low, high, _, _ = cv2.minMaxLoc(image)
        mean, std = cv2.meanStdDev(image)
        mean_f, std_f = float(mean[0, 0]), float(std[0, 0])
        hist = _histogram_u8(np.right_shift(image, 8).astype(np.uint8))
    return {
        "min": int(low),
        "max": int(high),
        "mean": int(round(mean_f)),
        "std": int(round(std_f)),
        "mean_float": mean_f,
        "std_float": std_f,
        "histogram": [int(v) for v in hist.ravel()],
    }


def raw_statistics(raw: np.ndarray) -> dict[str, float]:
    """What QC judges on the camera's own counts, before CLAHE re-stretches them: ``raw_std`` (population
    standard deviation), ``saturated_fraction`` (pixels at the dtype's full scale) and
    :func:`specimen_contrast`."""
    _check_camera_dtype(raw, "raw tile")
    raw = np.ascontiguousarray(raw)
    top = np.iinfo(raw.dtype).max
    _, brightest, _, _ = cv2.minMaxLoc(raw)  # cheaper than counting, and usually nothing is clipped
    # OpenCV compares against a scalar; its stubs take only an array there
    saturated = cv2.countNonZero(cv2.compare(raw, top, cv2.CMP_EQ)) if brightest >= top else 0  # type: ignore[call-overload]
    return {
        "raw_std": float(cv2.meanStdDev(raw)[1][0, 0]),
        "saturated_fraction": saturated / raw.size,
        "specimen_contrast": specimen_contrast(raw),
    }


# ----------------------------------------------------------------------------------------------------
# Specimen or not


CONTRAST_GRID = 64  # blocks per side of the tile for :func:`specimen_contrast`
_NOISE_CROP = 256


@lru_cache(maxsize=8)
def _quadratic_fit(gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
    """Design matrix of a quadratic surface over a gh × gw grid, and its pseudo-inverse."""
    y, x = np.mgrid[0:gh, 0:gw]
    x, y = x.ravel() / gw, y.ravel() / gh
    design = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=1)
    return design, np.linalg.pinv(design)


def specimen_contrast(raw: np.ndarray, grid: int = CONTRAST_GRID) -> float:
    """How far a tile's large-scale contrast stands above its pixel noise: about 1 when the tile images no
    specimen (film or resin only, an empty beam: flat but for shot noise), far above it with a section.

    The tile is cut into ``grid`` × ``grid`` square blocks of ``b`` px; the block means, less the
    quadratic surface that fits them best (vignetting and illumination gradients), vary by ``s``. Pixel
    noise ``σ`` is estimated from the differences of horizontal neighbours in the central 256² px (their
    mean absolute value · √π / 2, exact for Gaussian noise; a specimen's edges only raise it). White noise alone gives block means
    that vary by ``σ / b``, so the result ``s · b / σ`` is 1 in expectation for noise whatever the dose,
    and the specimen's contrast at scales of ``b`` px and more lifts it far above (simulated sections at
    10–1000 e⁻/px: 2.3–75, even 12 µm out of focus; film only: 0.96–1.0; Poisson noise: 1.00 ± 0.02).
    Noise correlated between neighbouring pixels (a camera's point-spread) raises a specimen-free
    frame's value somewhat: QC's threshold (``QCConfig.min_specimen_contrast``) leaves room for that.
    """
    _check_camera_dtype(raw, "raw tile")
    h, w = raw.shape
    b = min(h, w) // grid
    if b < 2:
        raise ValueError(f"a {h}×{w} tile is too small for {grid}×{grid} blocks of 2 px or more")
    gh, gw = h // b, w // b
    # block sums: one cv2.reduce per block row, then the columns in numpy (exact sums, no rounding)
    depth = cv2.CV_32S if raw.dtype == np.uint8 else cv2.CV_64F  # OpenCV sums uint16 only into floats
    rows = np.stack(
        [cv2.reduce(raw[i * b : (i + 1) * b, : gw * b], 0, cv2.REDUCE_SUM, dtype=depth)[0] for i in range(gh)]
    )
    means = rows.reshape(gh, gw, b).sum(axis=2, dtype=np.float64) / (b * b)
    design, inverse = _quadratic_fit(gh, gw)
    detail = float((means.ravel() - design @ (inverse @ means.ravel())).std())
    c = min(_NOISE_CROP, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    diff = np.diff(raw[y0 : y0 + c, x0 : x0 + c].astype(np.float32), axis=1)
    sigma = float(np.abs(diff).mean(dtype=np.float64)) * math.sqrt(math.pi) / 2.0
    if sigma <= 0:  # no pixel noise at all (a synthetic image): any block contrast is specimen
        return math.inf if detail > 0 else 0.0
    return detail * b / sigma


# ----------------------------------------------------------------------------------------------------
# Focus


_HANN_CORRELATION = (1 + 2 * (4 / 9 + 1 / 36)) ** 2  # variance inflation of summed Hann-windowed power bins
_DETECTION_SIGMAS = 2.0  # band signal below this many standard errors of the noise floor counts as none
_DB_RANGE = 30.0  # score 1 at a band share of −30 dB (1/1000) or less


@lru_cache(maxsize=8)
def _focus_masks(n: int, band_low: float, band_high: float) -> tuple[np.ndarray, ...]:
    """Weights and masks over the ``rfft2`` half-spectrum of an n × n crop, in 256-spectrum units."""
    v = np.fft.fftfreq(n) * n
    u = np.fft.rfftfreq(n) * n
    vv, uu = np.meshgrid(v, u, indexing="ij")
    scale = FOCUS_CROP / n  # frequencies in index units of a 256-point spectrum
    l1 = (np.abs(uu) + np.abs(vv)) * scale
    radius = np.hypot(uu, vv) * scale
    weight = np.full(uu.shape, 2.0)  # each rfft column stands for itself and its mirror image …
    weight[:, 0] = 1.0  # … except the u = 0 and u = Nyquist columns
    if n % 2 == 0:
        weight[:, -1] = 1.0
    band = (l1 >= band_low) & (l1 <= band_high)
    non_dc = l1 > 0
    noise = radius > FOCUS_CROP / 2  # beyond the Nyquist circle: the spectrum's corners
    window = np.outer(np.hanning(n), np.hanning(n)).astype(np.float32)
    return window, weight * band, weight * non_dc, weight * noise


def focus_score(image: np.ndarray, crop: int = FOCUS_CROP, band: tuple[float, float] = FOCUS_BAND) -> float:
    """Focus score of a tile in [0, 1], lower is better (TEM_comms ``tile.statistics.focus``).

    Definition (the Allen FocusNode's published parameters, made exact):

    1. Take the central ``crop`` × ``crop`` square (256 px; the largest centred square if the image is
       smaller), subtract its mean, multiply by a 2-D Hann window and take the power spectrum
       ``|F(u, v)|²`` (u, v in FFT-index units, cycles per crop).
    2. Frequency is the L1 distance from DC, ``ρ = |u| + |v|``, in units of a 256-point spectrum
       (``ρ · 256 / crop`` for other crop sizes). It runs from 0 to 256, so the band ``50 ≤ ρ ≤ 251`` is
       the whole high-frequency part of the spectrum: periods shorter than 5 px along an axis, 7 px on
       the diagonal.
    3. Shot noise is white and fills the band whatever the focus, so it is measured and removed: the
       noise floor is the mean power beyond the Nyquist circle (``√(u² + v²) > 128``, the spectrum's
       corners, where a TEM image has no specimen signal left). The band's *signal* energy is the band
       total minus the floor, less two standard errors of that estimate (so detail that cannot be told
       from noise counts as none); the total signal energy is the non-DC total minus the floor.
    4. ``r`` = band signal / total signal; ``score = clip(−10·log10(r) / 30, 0, 1)``: the band's share of
       the specimen contrast in decibels, with 0 dB → 0 and −30 dB or less → 1.

    On the synthetic EM-like test specimen a sharp tile scores about 0.4–0.45 and a 1 px Gaussian blur
    about 0.55–0.65; a tile with no detectable fine detail (blank, flat, pure shot noise, badly out of
    focus) scores 1. The score ignores brightness and contrast (any affine change of grey values), and
    shot noise does not make a tile look sharper; heavy noise hides the finest detail, so noisier tiles
    reach 1 at a smaller blur (at 300 e⁻/px a 1.5 px blur already scores about 0.9–1).
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"focus_score needs a 2-D image, got shape {image.shape}")
    h, w = image.shape
    n = min(int(crop), h, w)
    if n < 16:
        raise ValueError(f"image {image.shape} is too small for a focus score (needs at least 16 × 16 px)")
    y0, x0 = (h - n) // 2, (w - n) // 2
    patch = image[y0 : y0 + n, x0 : x0 + n].astype(np.float32)
    window, w_band, w_total, w_noise = _focus_masks(n, float(band[0]), float(band[1]))
    patch -= patch.mean(dtype=np.float64)
    patch *= window
    power = np.fft.rfft2(patch)
    power = (power.real**2 + power.imag**2).astype(np.float64)
    n_band, n_total, n_noise = float(w_band.sum()), float(w_total.sum()), float(w_noise.sum())
    floor = float((power * w_noise).sum() / n_noise)  # mean noise power per bin
    band_signal = float((power * w_band).sum()) - n_band * floor
    total_signal = float((power * w_total).sum()) - n_total * floor
    # standard errors (exponentially distributed, Hann-correlated bins; the floor's own error dominates)
    c = 2 * _HANN_CORRELATION

    def standard_error(bins: float) -> float:
        outside = max(bins - n_noise, 0.0)  # the part of the region not used for the floor
        return floor * math.sqrt(c * outside * (1 + outside / n_noise))

    if not total_signal > 3 * standard_error(n_total):
        return 1.0  # no detectable specimen contrast at all
    band_signal -= _DETECTION_SIGMAS * standard_error(n_band)
    if band_signal <= 0:
        return 1.0
    ratio = min(band_signal / total_signal, 1.0)
    return float(min(1.0, max(0.0, -10.0 * math.log10(ratio) / _DB_RANGE)))


# ----------------------------------------------------------------------------------------------------
# The chain


@dataclass(frozen=True, eq=False)
class ProcessedTile:
    """One tile after the chain.

    ``image``, ``stats`` and ``focus`` are what TEM_graph publishes: the flatfield-corrected, CLAHE-
    enhanced tile, its :func:`tile_statistics` and its :func:`focus_score`. CLAHE stretches whatever
    is there (a blank tile's shot noise comes out with the contrast of a specimen), so for QC the chain
    also keeps ``raw_stats`` (of the camera frame: saturation is ``raw_stats["histogram"][-1]``) and
    ``corrected_stats`` (after flatfield, before CLAHE: the specimen's real contrast).
    """

    image: np.ndarray
    stats: dict[str, Any]
    focus: float
    raw_stats: dict[str, Any] = field(default_factory=dict)
    corrected_stats: dict[str, Any] = field(default_factory=dict)


def process_tile(
    raw: np.ndarray,
    flatfield: Flatfield | None,
    *,
    clahe_clip: float = CLAHE_CLIP_LIMIT,
    clahe_grid: int | tuple[int, int] = CLAHE_GRID,
) -> ProcessedTile:
    """The whole per-tile chain on a raw camera tile: flatfield (skipped when ``flatfield`` is None) →
    CLAHE → statistics and 256-bin histogram → focus score on the processed image, as in TEM_graph,
    plus the statistics of the raw and the flatfield-corrected tile for QC."""
    _check_camera_dtype(raw, "raw tile")
    raw_stats = tile_statistics(raw)
    if flatfield is not None:
        corrected = flatfield.apply(raw)
        corrected_stats = tile_statistics(corrected)
        enhanced = clahe(corrected, clahe_clip, clahe_grid, out=corrected)  # our own buffer: reuse it
    else:
        corrected_stats = raw_stats
        enhanced = clahe(raw, clahe_clip, clahe_grid)
    return ProcessedTile(
        image=enhanced,
        stats=tile_statistics(enhanced),
        focus=focus_score(enhanced),
        raw_stats=raw_stats,
        corrected_stats=corrected_stats,
    )
