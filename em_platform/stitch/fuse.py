"""Fuse a stitched montage into one multiscale OME-Zarr image, block by block through Dask.

Placement: each tile's solved top-left corner is rounded to the nearest whole pixel (half up, so
positions that differ by a whole number of pixels keep that difference) and the tile is pasted there
unresampled. Sub-pixel placement would interpolate every tile, which low-pass filters the fine
texture EM is read for and changes every pixel value; rounding moves a tile by at most half a pixel
and keeps each pixel covered by one tile bit-exactly equal to that tile's pixel. Tiles placed by a
transform that is not a pure translation (rigid, affine), or with a lens correction, are resampled
instead (bicubic, at the tile pixel each output pixel shows): a rotated tile pasted square would be off
by ``θ`` × half a tile at its corners.

Blending: in overlaps the output is the weighted mean of the tiles, each weighted by a linear ramp
(feathering) that grows from the tile's border over ``blend_px`` pixels (product of the row and
column ramps), so seams fade instead of stepping. Integer means are rounded to the nearest value.
Pixels no tile covers are 0, the store's fill value, which the writer does not store.

Memory: the output is a dask array with one task per block of (level-1 chunk x 2) pixels, exactly
the blocks :func:`~em_platform.imaging.ome_zarr.write_ome_zarr` consumes (so nothing is rechunked);
a task reads only the regions of the tiles that intersect its block and holds them, its block and
float buffers the size of its overlaps. Nothing grows with the montage.
"""

from __future__ import annotations

import itertools
import math
import numbers
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import numpy as np
from dask.highlevelgraph import HighLevelGraph

from em_platform.imaging.ome_zarr import MultiscaleInfo, open_store, write_ome_zarr
from em_platform.imaging.pyramid import plan_pyramid
from em_platform.lazy_import import LazyModule

da = LazyModule("dask.array")

Rows2x3 = tuple[tuple[float, float, float], tuple[float, float, float]]  # a 2×3 matrix [A | t], row by row

__all__ = [
    "DEFAULT_BLEND_PX",
    "FusedMontage",
    "PlacedTile",
    "TiffTileFolder",
    "TileInfo",
    "TileNotFound",
    "TilePixels",
    "ZarrTileGroup",
    "fuse_montage",
]

DEFAULT_BLEND_PX = 64  # a few percent of an EM tile: wide enough to hide a seam, narrow enough to stay sharp
DEFAULT_CHUNK = 1024  # the writer's default 2-D chunk side
PYRAMID_MIN_SIZE = 256  # passed to the writer, and used here to predict its blocks


# ----------------------------------------------------------------------------------------------------
# Tiles and where their pixels are read


@dataclass(frozen=True)
class PlacedTile:
    """A tile and its solved top-left corner in pixels (any origin; ``y`` rows, ``x`` columns).

    ``transform`` (2×3 ``[A | t]``, tile (x, y) → montage (x, y)), when given and not a pure translation,
    places the tile instead of ``y``/``x`` and the fusion resamples it; a ``lens`` correction given to
    :func:`fuse_montage` applies before it (the transform then acts on undistorted tile pixels).
    """

    tile_id: str
    y: float
    x: float
    height: int
    width: int
    transform: Rows2x3 | None = None

    def matrix(self) -> np.ndarray:
        """The 2×3 ``[A | t]`` that places the tile: its ``transform``, else the translation to ``x``/``y``."""
        if self.transform is not None:
            return np.asarray(self.transform, np.float64)
        return np.array([[1.0, 0.0, self.x], [0.0, 1.0, self.y]])


class TileInfo(NamedTuple):
    """A stored tile's (height, width) and sample type."""

    shape: tuple[int, int]
    dtype: np.dtype


class TileNotFound(LookupError):
    """A tile id the tiles' pixels (:class:`TilePixels`) do not hold."""


class TilePixels(Protocol):
    """Where the fusion reads tile pixels; must pickle (Dask sends it to workers) and open lazily."""

    def tile_info(self, tile_id: str) -> TileInfo:
        """Shape and dtype of a stored tile; raises :class:`TileNotFound` for an unknown id."""
        ...

    def read(self, tile_id: str, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows ``y0:y1`` and columns ``x0:x1`` of a tile (tile-local pixel coordinates)."""
        ...


def _check_region(
    tile_id: str, where: str, shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int
) -> None:
    h, w = shape
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(
            f"tile {tile_id!r} ({where}): region rows {y0}:{y1}, columns {x0}:{x1} is empty or outside the "
            f"{h}x{w} px tile; the placed tile's height and width must be the stored tile's"
        )


def _check_2d(tile_id: str, where: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(
            f"tile {tile_id!r} ({where}) has shape {tuple(shape)}; a montage tile must be one 2-D "
            "greyscale image"
        )
    return int(shape[0]), int(shape[1])


_ZARR_CACHE: OrderedDict[tuple[str, str], Any] = OrderedDict()
_ZARR_CACHE_LOCK = threading.Lock()
_ZARR_CACHE_SIZE = 256


class ZarrTileGroup:
    """Tiles stored as one 2-D zarr array each inside a group: ``<url>/<tile_id>``.

    This is how the live pipeline keeps processed tiles (``processed_tiles.zarr``, arrays such as
    ``r000_c001``). Arrays are opened on first use and cached per process (an open costs a metadata
    read, an object-store GET on S3); the object itself holds only the URL, so it pickles. The cache
    is per instance (and its pickled copies), so a new instance sees tiles rewritten since.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options) if storage_options else None
        self._cache_id = uuid.uuid4().hex

    def __repr__(self) -> str:
        return f"ZarrTileGroup({self.url!r})"

    def _array(self, tile_id: str):
        import zarr

        key = (self._cache_id, tile_id)
        with _ZARR_CACHE_LOCK:
            arr = _ZARR_CACHE.get(key)
            if arr is not None:
                _ZARR_CACHE.move_to_end(key)
                return arr
        try:
            store = open_store(self.url, self.storage_options, read_only=True)
            arr = zarr.open_array(store, path=tile_id, mode="r")
        except FileNotFoundError:
            raise TileNotFound(
                f"tile {tile_id!r}: no zarr array {self.url}/{tile_id}; check the tile id, or leave the "
                "tile out of the montage to fuse it as a hole"
            ) from None
        with _ZARR_CACHE_LOCK:
            _ZARR_CACHE[key] = arr
            while len(_ZARR_CACHE) > _ZARR_CACHE_SIZE:
                _ZARR_CACHE.popitem(last=False)
        return arr

    def tile_info(self, tile_id: str) -> TileInfo:
        arr = self._array(tile_id)
        return TileInfo(_check_2d(tile_id, f"{self.url}/{tile_id}", arr.shape), np.dtype(arr.dtype))

    def read(self, tile_id: str, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        arr = self._array(tile_id)
        where = f"{self.url}/{tile_id}"
        _check_region(tile_id, where, _check_2d(tile_id, where, arr.shape), y0, y1, x0, x1)
        return np.asarray(arr[y0:y1, x0:x1])


class TiffTileFolder:
    """Tiles as 2-D TIFF files in one local folder; the tile id is the file name.

    A region of an uncompressed TIFF is read through a memory map (only the rows it spans are
    touched); a compressed one through tifffile's zarr view, which decodes only the strips or tiles
    the region covers. Files are opened per read: a TIFF header parses in well under a millisecond,
    and no handle is kept, so thousands of tiles never exhaust file descriptors.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise NotADirectoryError(f"tile folder {str(self.folder)!r} does not exist or is not a folder")

    def __repr__(self) -> str:
        return f"TiffTileFolder({str(self.folder)!r})"

    def _path(self, tile_id: str) -> Path:
        path = self.folder / tile_id
        if not path.is_file():
            raise TileNotFound(
                f"tile {tile_id!r}: no file {path}; check the tile name, or leave the tile out of the "
                "montage to fuse it as a hole"
            )
        return path

    def tile_info(self, tile_id: str) -> TileInfo:
        import tifffile

        path = self._path(tile_id)
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return TileInfo(_check_2d(tile_id, str(path), series.shape), series.dtype.newbyteorder("="))
        except tifffile.TiffFileError as exc:
            raise ValueError(f"tile {tile_id!r}: {path} is not a readable TIFF ({exc})") from None

    def read(self, tile_id: str, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        import tifffile
        import zarr

        path = self._path(tile_id)
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape = _check_2d(tile_id, str(path), series.shape)
                _check_region(tile_id, str(path), shape, y0, y1, x0, x1)
                native = series.dtype.newbyteorder("=")
                if series.dataoffset is not None:  # uncompressed and contiguous
                    if series.dataoffset + series.nbytes > path.stat().st_size:
                        raise ValueError(f"tile {tile_id!r}: {path} is truncated; copy the file again")
                    image = np.memmap(
                        path,
                        dtype=series.dtype.newbyteorder(tif.byteorder),
                        mode="r",
                        offset=series.dataoffset,
                        shape=shape,
                    )
                    return np.array(image[y0:y1, x0:x1], dtype=native)
                with series.aszarr() as store:
                    return np.asarray(zarr.open_array(store, mode="r")[y0:y1, x0:x1], dtype=native)
        except tifffile.TiffFileError as exc:
            raise ValueError(f"tile {tile_id!r}: {path} is not a readable TIFF ({exc})") from None


# ----------------------------------------------------------------------------------------------------
# Placement and blending


@dataclass(frozen=True)
class _Placed:
    """A tile at whole-pixel output coordinates: rows ``y:y+height``, columns ``x:x+width`` (for a
    resampled tile: the box its pixels land in, ``inverse`` mapping output (x, y) to undistorted tile
    pixels, ``shape`` the tile's own (height, width))."""

    tile_id: str
    y: int
    x: int
    height: int
    width: int
    inverse: Rows2x3 | None = None
    shape: tuple[int, int] | None = None
    lens: Any = None


@dataclass(frozen=True)
class _BlockPlan:
    """What one task fuses: output rows ``y0:y1``, columns ``x0:x1`` from ``tiles``.

    A dataclass (not a tuple) so dask passes it to the task untouched instead of walking it for keys.
    """

    y0: int
    y1: int
    x0: int
    x1: int
    tiles: tuple[_Placed, ...]
    dtype: np.dtype
    blend_px: int


def _round_half_up(v: float) -> int:
    return math.floor(v + 0.5)


def _accumulator(dtype: np.dtype) -> np.dtype:
    """Float type for the weighted sums, wide enough that tiles which agree blend back to their value.

    ``sum(w_i * v) / sum(w_i)`` is within a few 2**-24 (float32) or 2**-53 (float64) of ``v``
    relative, so it rounds back to ``v`` for 8/16-bit integers in float32 and for 32-bit integers
    and float32 in float64. 64-bit samples would not (and no EM camera writes them).
    """
    if dtype.kind in "iu" and dtype.itemsize <= 2:
        return np.dtype(np.float32)
    if (dtype.kind in "iu" and dtype.itemsize == 4) or (dtype.kind == "f" and dtype.itemsize <= 4):
        return np.dtype(np.float64)
    raise ValueError(
        f"tiles of dtype {dtype} cannot be fused; use 8-, 16- or 32-bit integer or float32 tiles"
    )


def _ramp(start: int, stop: int, length: int, blend_px: int, acc: np.dtype) -> np.ndarray:
    """Feather weights of tile-local positions ``start:stop`` along an axis of ``length`` pixels."""
    if blend_px == 0:
        return np.ones(stop - start, acc)
    i = np.arange(start, stop, dtype=np.float64)
    edge = np.minimum(i, length - 1 - i) + 0.5  # distance of the pixel centre from the tile's border
    return np.minimum(edge / blend_px, 1.0).astype(acc)


class _Piece(NamedTuple):
    """The part of a tile inside a block: block rows ``y0:y1``, columns ``x0:x1``; ``pixels`` start at
    tile-local ``(ty, tx)``."""

    tile: _Placed
    y0: int
    y1: int
    x0: int
    x1: int
    ty: int
    tx: int
    pixels: np.ndarray


def _read_piece(plan: _BlockPlan, t: _Placed, source: TilePixels) -> _Piece:
    y0, y1 = max(t.y, plan.y0) - plan.y0, min(t.y + t.height, plan.y1) - plan.y0
    x0, x1 = max(t.x, plan.x0) - plan.x0, min(t.x + t.width, plan.x1) - plan.x0
    ty, tx = y0 + plan.y0 - t.y, x0 + plan.x0 - t.x
    pixels = source.read(t.tile_id, ty, ty + y1 - y0, tx, tx + x1 - x0)
    if pixels.shape != (y1 - y0, x1 - x0) or pixels.dtype != plan.dtype:
        raise ValueError(
            f"tile {t.tile_id!r}: {source!r} returned {pixels.dtype} {pixels.shape} for rows "
            f"{ty}:{ty + y1 - y0}, columns {tx}:{tx + x1 - x0}, expected {plan.dtype} {(y1 - y0, x1 - x0)}; "
            "the tile changed since the fusion started"
        )
    return _Piece(t, y0, y1, x0, x1, ty, tx, pixels)


def _blend(out: np.ndarray, y0: int, y1: int, x0: int, x1: int, pieces: list[_Piece], blend_px: int) -> None:
    """Overwrite ``out[y0:y1, x0:x1]`` with the feather-weighted mean of the pieces covering it."""
    acc_dtype = _accumulator(out.dtype)
    total = np.zeros((y1 - y0, x1 - x0), acc_dtype)
    weight = np.zeros_like(total)
    for p in pieces:
        ry0, ry1, rx0, rx1 = max(y0, p.y0), min(y1, p.y1), max(x0, p.x0), min(x1, p.x1)
        if ry0 >= ry1 or rx0 >= rx1:
            continue
        ty, tx = p.ty + ry0 - p.y0, p.tx + rx0 - p.x0
        w = np.multiply.outer(
            _ramp(ty, ty + ry1 - ry0, p.tile.height, blend_px, acc_dtype),
            _ramp(tx, tx + rx1 - rx0, p.tile.width, blend_px, acc_dtype),
        )
        region = (slice(ry0 - y0, ry1 - y0), slice(rx0 - x0, rx1 - x0))
        weight[region] += w
        w *= p.pixels[ry0 - p.y0 : ry1 - p.y0, rx0 - p.x0 : rx1 - p.x0]
        total[region] += w
    total /= weight  # every pixel of an overlap has weight > 0
    if out.dtype.kind in "iu":
        np.rint(total, out=total)
    out[y0:y1, x0:x1] = total


def _fuse_resampled(plan: _BlockPlan, source: TilePixels) -> np.ndarray:
    """A block where tiles are rotated, scaled or lens-corrected: every tile resampled (bicubic) at the
    tile pixel each output pixel shows, then the feather-weighted mean as for pasted tiles."""
    import cv2

    acc = _accumulator(plan.dtype)
    total = np.zeros((plan.y1 - plan.y0, plan.x1 - plan.x0), np.float64)
    weight = np.zeros_like(total)
    for t in plan.tiles:
        th, tw = t.shape or (t.height, t.width)
        # only the part of the block inside the tile's box: the lens's inverse is costly per pixel
        by0, by1 = max(plan.y0, t.y), min(plan.y1, t.y + t.height)
        bx0, bx1 = max(plan.x0, t.x), min(plan.x1, t.x + t.width)
        if by0 >= by1 or bx0 >= bx1:
            continue
        h, w = by1 - by0, bx1 - bx0
        gy, gx = np.mgrid[by0:by1, bx0:bx1].astype(np.float64)
        if t.inverse is None:
            inv = np.array([[1.0, 0.0, -t.x], [0.0, 1.0, -t.y]])
        else:
            inv = np.asarray(t.inverse, np.float64)
        ux = inv[0, 0] * gx + inv[0, 1] * gy + inv[0, 2]
        uy = inv[1, 0] * gx + inv[1, 1] * gy + inv[1, 2]
        if t.lens is not None:
            xy = t.lens.distort(np.column_stack([ux.ravel(), uy.ravel()]))
            ux, uy = xy[:, 0].reshape(h, w), xy[:, 1].reshape(h, w)
        inside = (ux > -0.5) & (ux < tw - 0.5) & (uy > -0.5) & (uy < th - 0.5)
        if not inside.any():
            continue
        x0 = max(0, int(np.floor(ux[inside].min())) - 2)
        x1 = min(tw, int(np.ceil(ux[inside].max())) + 3)
        y0 = max(0, int(np.floor(uy[inside].min())) - 2)
        y1 = min(th, int(np.ceil(uy[inside].max())) + 3)
        region = source.read(t.tile_id, y0, y1, x0, x1).astype(np.float32)
        values = cv2.remap(
            region, (ux - x0).astype(np.float32), (uy - y0).astype(np.float32), cv2.INTER_CUBIC,
            borderMode=cv2.BORDER_REPLICATE,
        )  # fmt: skip
        if plan.blend_px:
            ex = np.clip(np.minimum(ux + 0.5, tw - 0.5 - ux) / plan.blend_px, 0, 1)
            ey = np.clip(np.minimum(uy + 0.5, th - 0.5 - uy) / plan.blend_px, 0, 1)
            wt = np.where(inside, ex * ey, 0.0)
        else:
            wt = inside.astype(np.float64)
        region_out = (slice(by0 - plan.y0, by1 - plan.y0), slice(bx0 - plan.x0, bx1 - plan.x0))
        total[region_out] += wt * values
        weight[region_out] += wt
    out = np.zeros(total.shape, plan.dtype)
    covered = weight > 0
    mean = np.where(covered, total / np.where(covered, weight, 1.0), 0.0).astype(acc)
    if plan.dtype.kind in "iu":
        info = np.iinfo(plan.dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    out[:] = mean
    return out


def fuse_block(plan: _BlockPlan, source: TilePixels) -> np.ndarray:
    """One output block: the feather-weighted mean of the tile regions that cover it, 0 elsewhere.

    Every tile region is pasted as it is, so a pixel only one tile covers is that tile's pixel by
    construction; then each pairwise overlap (where a 2 x 2 corner is covered by several pairs, the
    same mean is computed again) is replaced by the weighted mean of all tiles covering it. The float
    work is confined to the overlaps, a fifth of the area at 10 % overlap.
    """
    if any(t.inverse is not None for t in plan.tiles):
        return _fuse_resampled(plan, source)
    out = np.zeros((plan.y1 - plan.y0, plan.x1 - plan.x0), plan.dtype)
    pieces = [_read_piece(plan, t, source) for t in plan.tiles]
    for p in pieces:
        out[p.y0 : p.y1, p.x0 : p.x1] = p.pixels
    for a, b in itertools.combinations(pieces, 2):
        y0, y1, x0, x1 = max(a.y0, b.y0), min(a.y1, b.y1), max(a.x0, b.x0), min(a.x1, b.x1)
        if y0 < y1 and x0 < x1:
            _blend(out, y0, y1, x0, x1, pieces, plan.blend_px)
    return out


# ----------------------------------------------------------------------------------------------------
# The fusion


@dataclass(frozen=True)
class FusedMontage:
    """What :func:`fuse_montage` wrote.

    ``origin`` is the (y, x) position, in the frame of the input positions, of fused pixel (0, 0):
    a tile placed at ``(y, x)`` starts at fused pixel ``(round(y) - origin[0], round(x) - origin[1])``.
    """

    info: MultiscaleInfo
    shape: tuple[int, int]
    origin: tuple[int, int]
    n_tiles: int
    blend_px: int
    resampled: bool = False  # tiles resampled by full transforms / a lens, not pasted at whole pixels

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.info.to_dict(),
            "shape": list(self.shape),
            "origin": list(self.origin),
            "n_tiles": self.n_tiles,
            "blend_px": self.blend_px,
            "resampled": self.resampled,
        }


def _check_tiles(tiles: Sequence[PlacedTile]) -> None:
    if not tiles:
        raise ValueError("no tiles to fuse: the montage has no placed tiles")
    seen: set[str] = set()
    for t in tiles:
        if not isinstance(t, PlacedTile):
            raise TypeError(f"tiles must be PlacedTile objects, got {type(t).__name__}: {t!r}")
        if t.tile_id in seen:
            raise ValueError(f"tile {t.tile_id!r} is placed twice; give each tile one position")
        seen.add(t.tile_id)
        if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in (t.y, t.x)):
            raise ValueError(
                f"tile {t.tile_id!r}: position ({t.y!r}, {t.x!r}) is not a finite number of pixels; solve the layout first"
            )
        for name in ("height", "width"):
            v = getattr(t, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"tile {t.tile_id!r}: {name} must be a positive integer, got {v!r}")


def _check_sources(tiles: Sequence[PlacedTile], source: TilePixels) -> np.dtype:
    """Every tile exists with its placed shape and all share one dtype (checked in parallel: on S3 each
    check is a round trip)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        infos = list(pool.map(lambda t: source.tile_info(t.tile_id), tiles))
    by_dtype: dict[np.dtype, list[str]] = {}
    for t, info in zip(tiles, infos, strict=True):
        if info.shape != (t.height, t.width):
            raise ValueError(
                f"tile {t.tile_id!r} is placed as {t.height}x{t.width} px but {source!r} holds a "
                f"{info.shape[0]}x{info.shape[1]} px tile; give the placed tile the stored shape"
            )
        by_dtype.setdefault(np.dtype(info.dtype), []).append(t.tile_id)
    if len(by_dtype) > 1:
        mix = "; ".join(
            f"{dt}: {', '.join(repr(i) for i in ids[:3])}{f' and {len(ids) - 3} more' if len(ids) > 3 else ''}"
            for dt, ids in by_dtype.items()
        )
        raise ValueError(f"tiles have mixed dtypes ({mix}); convert them to one dtype before fusing")
    dtype = next(iter(by_dtype))
    _accumulator(dtype)
    return dtype


def _resampled_boxes(tiles: Sequence[PlacedTile], lens: Any) -> tuple[list[_Placed], tuple[int, int]]:
    """Output boxes (and output → tile maps) of tiles placed by full transforms; the origin is the top-left
    of their union, so output pixel (0, 0) is frame point ``origin``."""
    margin = (lens.max_displacement() if lens is not None else 0.0) + 2
    boxes = []
    for t in tiles:
        m = t.matrix()
        corners = np.array([[0, 0], [t.width, 0], [0, t.height], [t.width, t.height]], np.float64) - 0.5
        frame = corners @ m[:, :2].T + m[:, 2]
        lo, hi = np.floor(frame.min(axis=0) - margin), np.ceil(frame.max(axis=0) + margin)
        boxes.append((m, lo, hi))
    origin_xy = np.min([lo for _, lo, _ in boxes], axis=0)
    placed = []
    for t, (m, lo, hi) in zip(tiles, boxes, strict=True):
        a_inv = np.linalg.inv(m[:, :2])
        shifted_t = m[:, 2] - origin_xy  # output (x, y) = A u + t − origin
        inverse = np.column_stack([a_inv, -a_inv @ shifted_t])
        x0, y0 = (lo - origin_xy).astype(int)
        x1, y1 = (hi - origin_xy).astype(int)
        placed.append(
            _Placed(
                t.tile_id,
                int(y0),
                int(x0),
                int(y1 - y0),
                int(x1 - x0),
                inverse=cast("Rows2x3", tuple(map(tuple, inverse.tolist()))),  # 2×3 by construction
                shape=(int(t.height), int(t.width)),
                lens=lens,
            )  # fmt: skip
        )
    return placed, (int(origin_xy[1]), int(origin_xy[0]))


def _block_sides(shape: tuple[int, int], pixel_size_nm: float, chunk: int) -> tuple[int, int]:
    """The block shape ``write_ome_zarr`` cuts level 0 into: a level-1 chunk times 2, or one chunk if
    the image has a single level."""
    plan = plan_pyramid(shape, ("y", "x"), (pixel_size_nm, pixel_size_nm), PYRAMID_MIN_SIZE)
    if len(plan) == 1:
        return min(chunk, shape[0]), min(chunk, shape[1])
    rows, columns = (min(chunk, n) * f for n, f in zip(plan[1].shape, plan[1].factors, strict=True))
    return rows, columns


def _edges(n: int, side: int) -> list[int]:
    return [*range(0, n, side), n]


def fuse_montage(
    tiles: Sequence[PlacedTile],
    source: TilePixels,
    url: str,
    *,
    pixel_size_nm: float,
    storage_options: dict | None = None,
    chunk: int = DEFAULT_CHUNK,
    client: Any = None,
    blend_px: int = DEFAULT_BLEND_PX,
    name: str | None = None,
    lens: Any = None,
) -> FusedMontage:
    """Fuse ``tiles`` read from ``source`` into a multiscale OME-Zarr image at ``url``.

    ``tiles`` hold solved top-left corners in pixels, or full transforms (then, or with a ``lens``
    correction, every tile is resampled, bicubic, instead of pasted); a tile left out (failed, never acquired) leaves
    a hole of zeros. ``pixel_size_nm`` is written as the y/x scale in nanometers; ``chunk`` is the
    stored chunk side; ``blend_px`` the feathering width (0: plain mean in overlaps). ``client`` is a
    ``distributed.Client``; without one, dask's threaded scheduler runs the tasks. ``url`` (with
    ``storage_options`` for fsspec) is overwritten; write to a staging location and publish it when
    this returns, since a failed fusion leaves a partial store there (one that is not yet an OME-Zarr
    image: the writer adds the multiscales metadata last).

    Raises ValueError / TypeError / :class:`TileNotFound` naming the tile or argument for bad input,
    before anything is written.
    """
    _check_tiles(tiles)
    if not (
        isinstance(pixel_size_nm, numbers.Real)
        and not isinstance(pixel_size_nm, bool)
        and math.isfinite(pixel_size_nm)
        and pixel_size_nm > 0
    ):
        raise ValueError(f"pixel_size_nm must be a positive number of nanometers, got {pixel_size_nm!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer (pixels), got {chunk!r}")
    if isinstance(blend_px, bool) or not isinstance(blend_px, int) or blend_px < 0:
        raise ValueError(f"blend_px must be a non-negative integer (pixels), got {blend_px!r}")
    dtype = _check_sources(tiles, source)

    if lens is not None and lens.is_identity():
        lens = None
    resample = lens is not None or any(
        t.transform is not None and not np.allclose(np.asarray(t.transform)[:, :2], np.eye(2), atol=1e-9)
        for t in tiles
    )
    if resample:
        placed, origin = _resampled_boxes(tiles, lens)
    else:
        ys = [_round_half_up(t.y if t.transform is None else t.transform[1][2]) for t in tiles]
        xs = [_round_half_up(t.x if t.transform is None else t.transform[0][2]) for t in tiles]
        origin = (min(ys), min(xs))
        placed = [
            _Placed(t.tile_id, y - origin[0], x - origin[1], int(t.height), int(t.width))
            for t, y, x in zip(tiles, ys, xs, strict=True)
        ]
    shape = (max(p.y + p.height for p in placed), max(p.x + p.width for p in placed))

    # Grid index: each tile is listed in the blocks its rectangle touches (integer division).
    by, bx = _block_sides(shape, float(pixel_size_nm), chunk)
    rows, cols = _edges(shape[0], by), _edges(shape[1], bx)
    members: dict[tuple[int, int], list[_Placed]] = {}
    for p in placed:
        for i in range(p.y // by, (p.y + p.height - 1) // by + 1):
            for j in range(p.x // bx, (p.x + p.width - 1) // bx + 1):
                members.setdefault((i, j), []).append(p)

    layer_name = f"fuse-montage-{uuid.uuid4().hex}"
    layer = {
        (layer_name, i, j): (
            fuse_block,
            _BlockPlan(
                rows[i], rows[i + 1], cols[j], cols[j + 1], tuple(members.get((i, j), ())), dtype, blend_px
            ),
            source,
        )
        for i in range(len(rows) - 1)
        for j in range(len(cols) - 1)
    }
    chunks = (tuple(np.diff(rows).tolist()), tuple(np.diff(cols).tolist()))
    graph = HighLevelGraph.from_collections(layer_name, layer, dependencies=())
    fused = da.Array(graph, layer_name, chunks, meta=np.empty((0, 0), dtype))

    info = write_ome_zarr(
        fused,
        url,
        axes=("y", "x"),
        scale=(float(pixel_size_nm), float(pixel_size_nm)),
        units=("nanometer", "nanometer"),
        storage_options=storage_options,
        chunks=(chunk, chunk),
        name=name,
        min_size=PYRAMID_MIN_SIZE,
        client=client,
    )
    return FusedMontage(
        info=info, shape=shape, origin=origin, n_tiles=len(placed), blend_px=blend_px, resampled=resample
    )
