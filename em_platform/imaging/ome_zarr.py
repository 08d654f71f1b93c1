"""Write a dask array as a multiscale OME-Zarr image (NGFF 0.5 on zarr format 3), chunk by chunk.

This is the one image writer every part of the platform shares (ingest, montage fusion, simulation,
cryo). It never holds the whole image: level 0 is read once, block by block; each block of
(level-1 chunk x 2) voxels is written to level 0 and, mean-downsampled, to level 1 in the same task,
which hands its level-1 chunk on to the task that combines it with its neighbours into a level-2
chunk, and so on up the pyramid (one dask graph, a tree, nothing read back). Every task writes whole
chunks that no other task touches, so no locks are needed, and the tasks open the zarr arrays by URL
themselves, so on a ``distributed`` cluster no pixels pass through the scheduler. The multiscales
metadata (ome-zarr's own writer) is written last: until the pyramid is complete the group is not an
OME-Zarr image, so a reader never mistakes a half-written pyramid for a finished one.

Data that arrives in order along its first axis (a file still downloading: TIFF pages, sections) is
written ``in_order`` instead: its blocks are read one after the other, and each group of whole level-0
chunks along that axis is written and downsampled as soon as its planes are here, while the next planes
are still arriving (see :class:`_InOrderPyramid`). Same levels, chunks and bytes as the tree.

The pyramid rule and the downsampling arithmetic live in :mod:`em_platform.imaging.pyramid`.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, cast

import dask
import numpy as np

from em_platform.imaging.chunk_io import write_region
from em_platform.imaging.pyramid import (
    check_downsample_dtype,
    downsample_mean,
    level_translation,
    plan_pyramid,
)
from em_platform.lazy_import import LazyModule

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    import dask.array as da
    import zarr
else:
    da = LazyModule("dask.array")
    zarr = LazyModule("zarr")

NGFF_VERSION = "0.5"
AXIS_ORDER = ("t", "c", "z", "y", "x")
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}

# Compression: Blosc with Zstd at clevel 1 and bit-shuffle. EM intensities are smooth structure plus shot
# noise: the noise bits do not compress at any level, so a higher level costs write rate (about half of it
# at clevel 5) and buys a few percent of ratio. Bit-shuffle groups the clean high bits of all values and beats
# byte-shuffle on ratio and speed. For 1-byte types there is nothing to regroup (bit-shuffle cut the ratio
# and the speed), so no shuffle. bench/bench_ome_zarr.py times the writer.
BLOSC_CNAME: Final = "zstd"
BLOSC_CLEVEL = 1

# Default chunks hold 2**20 voxels (1 MiB uint8, 2 MiB uint16): big enough that per-chunk costs
# (a file or an S3 object each, ~1 ms of zarr overhead) stay a few percent of the chunk's encode time,
# small enough for a viewer to fetch one quickly and for S3 to like (>= 1 MB objects).
DEFAULT_CHUNKS_2D = (1024, 1024)
# Near-isotropic volumes (FIB-SEM): 64 x 128 x 128 keeps xz/yz reslicing cheap. Strongly anisotropic
# stacks (serial-section TEM, 40 x 4 x 4 nm) are mostly viewed section by section, so their chunks are
# thinner in z and wider in y/x: whichever of the two is nearer to a physical cube is the default.
DEFAULT_CHUNKS_3D = (64, 128, 128)
DEFAULT_CHUNKS_3D_ANISOTROPIC = (16, 256, 256)


class MultiscaleLevel(NamedTuple):
    """One stored level: its array path inside the group, shape and voxel size (per axis)."""

    path: str
    shape: tuple[int, ...]
    scale: tuple[float, ...]


@dataclass(frozen=True)
class MultiscaleInfo:
    """What :func:`write_ome_zarr` wrote; small enough to go into a catalog record."""

    url: str
    axes: tuple[str, ...]
    units: tuple[str | None, ...]
    levels: tuple[MultiscaleLevel, ...]
    chunks: tuple[int, ...]
    dtype: str
    compressor: str
    ngff_version: str = NGFF_VERSION
    zarr_format: int = 3

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (levels as dicts with path, shape, scale)."""
        out = asdict(self)
        out["levels"] = [
            {"path": lv.path, "shape": list(lv.shape), "scale": list(lv.scale)} for lv in self.levels
        ]
        for key in ("axes", "units", "chunks"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MultiscaleInfo:
        """Back from :meth:`to_dict` (keys it does not know, e.g. a caller's additions, are ignored)."""
        return cls(
            url=d["url"],
            axes=tuple(d["axes"]),
            units=tuple(d["units"]),
            levels=tuple(
                MultiscaleLevel(lv["path"], tuple(lv["shape"]), tuple(lv["scale"])) for lv in d["levels"]
            ),
            chunks=tuple(d["chunks"]),
            dtype=d["dtype"],
            compressor=d["compressor"],
            ngff_version=d.get("ngff_version", NGFF_VERSION),
            zarr_format=d.get("zarr_format", 3),
        )


# ----------------------------------------------------------------------------------------------------
# Stores


def open_store(url: str, storage_options: dict | None = None, *, read_only: bool = False):
    """A zarr store for a local path (``/x.zarr``, ``file:///x.zarr``) or any fsspec URL.

    ``storage_options`` go to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for s3://);
    they are ignored for local paths.
    """
    import fsspec.utils

    protocol = fsspec.utils.get_protocol(url)
    if protocol in ("file", "local"):
        path = url.split("://", 1)[1] if "://" in url else url
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(
        url, storage_options=dict(storage_options or {}), read_only=read_only
    )


_ARRAY_CACHE: OrderedDict[tuple[str, str, str], zarr.Array] = OrderedDict()
_ARRAY_CACHE_LOCK = threading.Lock()
_ARRAY_CACHE_SIZE = 32


def _open_level(url: str, storage_options: dict | None, write_id: str, path: str) -> zarr.Array:
    """Open one level of a pyramid being written, once per process (tasks run wherever dask puts them).

    ``write_id`` is unique per :func:`write_ome_zarr` call, so a cached array is never a stale one from an
    earlier write to the same URL.
    """
    key = (url, write_id, path)
    with _ARRAY_CACHE_LOCK:
        arr = _ARRAY_CACHE.get(key)
        if arr is not None:
            _ARRAY_CACHE.move_to_end(key)
            return arr
    arr = zarr.open_array(open_store(url, storage_options), path=path, mode="r+", zarr_format=3)
    with _ARRAY_CACHE_LOCK:
        _ARRAY_CACHE[key] = arr
        while len(_ARRAY_CACHE) > _ARRAY_CACHE_SIZE:
            _ARRAY_CACHE.popitem(last=False)
    return arr


# ----------------------------------------------------------------------------------------------------
# Arguments


def _validate(
    ndim: int, axes: Sequence[str], scale: Sequence[float], units: Sequence[str | None]
) -> tuple[tuple[str, ...], tuple[float, ...], tuple[str | None, ...]]:
    if isinstance(axes, str):
        axes = list(axes)
    axes = tuple(axes)
    for a in axes:
        if a not in AXIS_ORDER:
            raise ValueError(f"axes: unknown axis {a!r}; use names among {', '.join(AXIS_ORDER)}")
    if len(axes) != ndim:
        raise ValueError(f"axes {axes} has {len(axes)} names but the data has {ndim} dimensions")
    if len(set(axes)) != len(axes) or list(axes) != sorted(axes, key=AXIS_ORDER.index):
        raise ValueError(f"axes {axes} must be distinct and in NGFF order t, c, z, y, x")
    if "y" not in axes or "x" not in axes:
        raise ValueError(f"axes {axes} must include y and x")
    if len(scale) != ndim:
        raise ValueError(f"scale {tuple(scale)} has {len(scale)} entries but axes {axes} has {ndim}")
    if len(units) != ndim:
        raise ValueError(f"units {tuple(units)} has {len(units)} entries but axes {axes} has {ndim}")
    scale_f = []
    for a, s in zip(axes, scale, strict=True):
        try:
            v = float(s)
        except (TypeError, ValueError):
            raise ValueError(f"scale for axis {a!r} must be a positive number, got {s!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"scale for axis {a!r} must be a positive number, got {s!r}")
        scale_f.append(v)
    for a, u in zip(axes, units, strict=True):
        if u is None:
            continue
        kind = AXIS_TYPES[a]
        # ome-zarr imported here, not at the top: it pulls in networkx and pydantic models (0.43 s), in every
        # process that imports the code location (each run, each CLI call) whether it writes an image or not
        from ome_zarr.axes import KNOWN_SPATIAL_UNITS, KNOWN_TEMPORAL_UNITS

        known = {"space": KNOWN_SPATIAL_UNITS, "time": KNOWN_TEMPORAL_UNITS}.get(kind, [])
        if u not in known:
            hint = {
                "space": "an NGFF unit name such as 'nanometer', 'angstrom' or 'micrometer' "
                "(em_platform.formats.volume.normalise_unit maps 'nm', 'Å', 'µm' to these)",
                "time": "an NGFF unit name such as 'second' or 'millisecond'",
            }.get(kind, "None: a channel axis has no unit")
            raise ValueError(f"units: unknown unit {u!r} for axis {a!r}; use {hint}")
    return axes, tuple(scale_f), tuple(units)


def default_chunks(axes: Sequence[str], shape: Sequence[int], scale: Sequence[float]) -> tuple[int, ...]:
    """The default chunk shape: 1 along t and c, capped by the image shape.

    2-D: DEFAULT_CHUNKS_2D. 3-D: of DEFAULT_CHUNKS_3D and DEFAULT_CHUNKS_3D_ANISOTROPIC, the one whose
    physical extent is nearer to a cube (the thin one wins once z voxels are > ~5.7x the y/x voxels).
    """
    axes = list(axes)
    if "z" in axes:
        sz = scale[axes.index("z")]
        syx = min(scale[axes.index("y")], scale[axes.index("x")])
        zyx = min(
            (DEFAULT_CHUNKS_3D, DEFAULT_CHUNKS_3D_ANISOTROPIC),
            key=lambda c: abs(math.log(c[0] * sz / (c[1] * syx))),
        )
        spatial = dict(zip("zyx", zyx, strict=True))
    else:
        spatial = dict(zip("yx", DEFAULT_CHUNKS_2D, strict=True))
    return tuple(min(spatial.get(a, 1), max(int(n), 1)) for a, n in zip(axes, shape, strict=True))


def blosc_codec(dtype: np.dtype) -> zarr.codecs.BloscCodec:
    """The compressor used for every level (see BLOSC_* above for the choice)."""
    dtype = np.dtype(dtype)
    shuffle: Literal["noshuffle", "bitshuffle"] = "noshuffle" if dtype.itemsize == 1 else "bitshuffle"
    return zarr.codecs.BloscCodec(
        typesize=dtype.itemsize, cname=BLOSC_CNAME, clevel=BLOSC_CLEVEL, shuffle=shuffle
    )


def _describe(codec: zarr.codecs.BloscCodec) -> str:
    shuffle = getattr(codec.shuffle, "value", codec.shuffle)
    cname = getattr(codec.cname, "value", codec.cname)
    return f"blosc(cname={cname}, clevel={codec.clevel}, shuffle={shuffle})"


def _default_name(url: str) -> str:
    base = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".ome.zarr", ".zarr"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base or "image"


# ----------------------------------------------------------------------------------------------------
# Tasks (module-level functions: they run on dask workers)


def _pyramid_task(
    block: np.ndarray,
    *,
    url: str,
    storage_options: dict | None,
    write_id: str,
    write_path: str | None,
    down_path: str | None,
    factors: tuple[int, ...],
    pass_on: bool,
    block_info: dict | None = None,
) -> np.ndarray:
    """One block of one level of the pyramid.

    Writes ``block`` to ``write_path`` (level 0 only: every other level was written by the task that
    made it), writes its mean-downsampled image to ``down_path`` and returns that image if a further
    level is made from it (``pass_on``), else a one-voxel marker. Every region written is a union of
    whole chunks that no other task writes.
    """
    assert block_info is not None  # map_blocks passes it to a function with this parameter
    loc = block_info[0]["array-location"]
    if write_path is not None:
        write_region(_open_level(url, storage_options, write_id, write_path), [a for a, _ in loc], block)
    if down_path is None:
        return np.ones((1,) * block.ndim, dtype=bool)
    small = downsample_mean(block, factors)
    start = [a // f for (a, _), f in zip(loc, factors, strict=True)]
    write_region(_open_level(url, storage_options, write_id, down_path), start, small)
    return small if pass_on else np.ones((1,) * block.ndim, dtype=bool)


def _compute(collections: list, client: Any) -> None:
    """Run the graph on ``client`` or, without one, on dask's threaded scheduler.

    The threaded scheduler gets twice as many threads as cores (unless dask's ``num_workers`` is
    configured): a task spends much of its time waiting on zarr's I/O loop while zarr's own thread
    pool compresses its chunks, and with one thread per core the cores sat idle in those waits
    (2 GiB benchmark on 2 cores: ~150-200 MB/s with 4 threads against ~110-130 with 2).
    """
    if not collections:
        return
    if client is None:
        workers = dask.config.get("num_workers", None) or 2 * (os.cpu_count() or 1)
        dask.compute(*collections, scheduler="threads", num_workers=workers)
    else:
        client.compute(collections, sync=True)


def _pyramid_graph(data: da.Array, plan: list, paths: Sequence[str], level_chunks: list, common: dict):
    """The dask graph that writes the whole pyramid (see :func:`write_ome_zarr`): its last stage."""
    # One dask graph for the whole pyramid, a tree with no barrier between levels. A level-0 block is a
    # level-1 chunk times the level-1 factors, so it is made of whole level-0 chunks and gives exactly
    # one whole level-1 chunk: its task writes both and hands the level-1 chunk on. A level-n task
    # (n >= 2) takes the level-(n-1) chunks under one level-n chunk (at most 2 per axis), downsamples
    # and writes that chunk and hands it on. Nothing is read back from the store, and dask runs the
    # tree depth-first, so the blocks waiting to be combined stay few whatever the image size.
    dtype = data.dtype
    ones = (1,) * data.ndim
    if len(plan) == 1:  # already small: level 0 only
        blocks = data.rechunk(level_chunks[0])
        level = blocks.map_blocks(
            _pyramid_task,
            write_path=paths[0],
            down_path=None,
            factors=ones,
            pass_on=False,
            chunks=tuple((1,) * len(cs) for cs in blocks.chunks),
            meta=np.empty((0,) * data.ndim, dtype=bool),
            **common,
        )
    else:
        level = data
        for n in range(len(plan) - 1):  # stage n: blocks of level n in, level n + 1 written
            factors = plan[n + 1].factors
            blocks = level.rechunk(tuple(c * f for c, f in zip(level_chunks[n + 1], factors, strict=True)))
            pass_on = n + 2 < len(plan)
            level = blocks.map_blocks(
                _pyramid_task,
                write_path=paths[0] if n == 0 else None,
                down_path=paths[n + 1],
                factors=factors,
                pass_on=pass_on,
                chunks=tuple(
                    tuple(-(-c // f) if pass_on else 1 for c in cs)
                    for cs, f in zip(blocks.chunks, factors, strict=True)
                ),
                meta=np.empty((0,) * data.ndim, dtype=dtype if pass_on else bool),
                **common,
            )
    return level


# ----------------------------------------------------------------------------------------------------
# In order along the first axis (data that is still arriving)

# Level-0 groups being written or waiting for a worker at once: a group is a row of level-0 chunks along
# the first axis (64 planes of a FIB-SEM stack: 64 MiB for 1024 x 1024 uint8), so this bounds memory;
# at least one group per worker and one more are allowed, whatever the plane size.
IN_ORDER_BUFFER_BYTES = 128 << 20


class _InOrderPyramid:
    """The pyramid of an array whose blocks come in order along axis 0, written as they come.

    Level ``n`` collects planes (along axis 0) in order; as soon as it holds a *group* (a whole number of its
    chunks along axis 0, even when the next level halves that axis) or the last planes of the level, a worker
    writes the group to level ``n``, mean-downsamples it and hands the result to level ``n + 1``, which
    collects the pieces in order (they may finish out of order) and does the same. Every write covers whole
    chunks that no other write touches; nothing is read back. ``feed(0, ...)`` waits while level-0 groups
    of more than ``max_bytes`` are in flight, so memory stays bounded whatever the image size. Pieces are
    copied into group buffers that are used again once written (fresh 64 MiB arrays cost more in page
    faults on this kind of machine than the copy), unless a piece already is a whole group.
    """

    def __init__(
        self, levels: list[zarr.Array], plan: list, level_chunks: list, workers: int, max_bytes: int
    ):
        self.levels = levels
        self.plan = plan
        self.totals = [lv.shape[0] for lv in plan]
        self.groups = []
        for n, lc in enumerate(level_chunks):
            f = plan[n + 1].factors[0] if n + 1 < len(plan) else 1
            self.groups.append(math.lcm(lc[0], f))
        self.next = [0] * len(plan)  # first plane of each level not yet collected
        self.pending: list[dict[int, np.ndarray]] = [{} for _ in plan]  # pieces that came early
        self.filling: list[np.ndarray | None] = [None] * len(plan)  # the group being collected
        self.group_start = [0] * len(plan)  # its first plane
        self.filled = [0] * len(plan)  # and how many planes it holds
        self.free: list[list[np.ndarray]] = [[] for _ in plan]  # group buffers to use again
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)
        self.outstanding = 0
        self.in_flight_bytes = 0
        self.max_bytes = max_bytes
        self.error: BaseException | None = None
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ome-zarr-in-order")

    def feed(self, level: int, start: int, piece: np.ndarray) -> None:
        """Planes ``start`` .. of ``level`` (any order for level > 0; in order for level 0)."""
        ready: list[tuple[int, np.ndarray, np.ndarray | None]] = []
        with self.lock:
            if self.error is not None:
                if level == 0:
                    raise self.error
                return
            self.pending[level][start] = piece
            while self.next[level] in self.pending[level]:
                p = self.pending[level].pop(self.next[level])
                self.next[level] += p.shape[0]
                self._collect(level, p, ready)
            if level == 0:
                for _, group, _ in ready:  # counted now: the producer waits below until there is room
                    self.in_flight_bytes += group.nbytes
            self.outstanding += len(ready)
        for z0, group, buffer in ready:
            self.pool.submit(self._process, level, z0, group, buffer).add_done_callback(self._lost)
        if level == 0:
            with self.lock:
                while self.in_flight_bytes > self.max_bytes and self.error is None:
                    self.done.wait()
                if self.error is not None:
                    raise self.error

    def _collect(self, level: int, piece: np.ndarray, ready: list) -> None:
        """Add ``piece`` (the next planes of ``level``) to the group being collected; whole groups go to
        ``ready`` as (first plane, planes, the buffer to use again or None)."""
        at = 0
        while at < piece.shape[0]:
            size = min(self.groups[level], self.totals[level] - self.group_start[level])
            filled = self.filled[level]
            n = min(piece.shape[0] - at, size - filled)
            if filled == 0 and n == size:  # a whole group as it came: no copy
                ready.append((self.group_start[level], piece[at : at + n], None))
            else:
                buf = self.filling[level]
                if filled == 0:
                    free = self.free[level]
                    shape = (self.groups[level], *piece.shape[1:])
                    buf = self.filling[level] = free.pop() if free else np.empty(shape, piece.dtype)
                assert buf is not None  # a group being collected has its buffer
                buf[filled : filled + n] = piece[at : at + n]
                self.filled[level] = filled + n
                if filled + n < size:
                    return
                ready.append((self.group_start[level], buf[:size], buf))
                self.filling[level], self.filled[level] = None, 0
            self.group_start[level] += size
            at += n

    def _process(self, level: int, z0: int, group: np.ndarray, buffer: np.ndarray | None) -> None:
        try:
            if self.error is None:
                write_region(self.levels[level], (z0,) + (0,) * (group.ndim - 1), group)
                if level + 1 < len(self.levels):
                    factors = self.plan[level + 1].factors
                    self.feed(level + 1, z0 // factors[0], _downsample_in_slabs(group, factors))
        except BaseException as exc:
            with self.lock:
                self.error = self.error or exc
        finally:
            with self.lock:
                self.outstanding -= 1
                if level == 0:
                    self.in_flight_bytes -= group.nbytes
                if buffer is not None:
                    self.free[level].append(buffer)
                self.done.notify_all()

    def _lost(self, future) -> None:
        """A task that failed outside its own error handling (it could not even start) stops the writer."""
        if not future.cancelled() and future.exception() is not None:
            with self.lock:
                self.error = self.error or future.exception()
                self.done.notify_all()

    def finish(self) -> None:
        """Wait for every level to be written; raise the first error a worker met."""
        try:
            with self.lock:
                while self.outstanding and self.error is None:
                    self.done.wait()
                if self.error is not None:
                    raise self.error
                missing = [n for n, (a, t) in enumerate(zip(self.next, self.totals, strict=True)) if a != t]
                if missing:
                    raise RuntimeError(f"in-order pyramid: levels {missing} did not receive all their planes")
        finally:
            self.close()

    def close(self) -> None:
        with self.lock:
            self.error = self.error or RuntimeError("in-order pyramid closed")  # queued groups are skipped
            self.done.notify_all()
        self.pool.shutdown(wait=True)


def _downsample_in_slabs(
    group: np.ndarray, factors: tuple[int, ...], slab_bytes: int = 8 << 20
) -> np.ndarray:
    """``downsample_mean(group, factors)``, a few planes at a time: the same numbers (slabs start at even
    planes), with temporaries of a few MiB instead of twice the group (and fewer page faults)."""
    plane = max(1, math.prod(group.shape[1:]) * group.dtype.itemsize)
    step = max(2, slab_bytes // plane // 2 * 2)
    if step >= group.shape[0]:
        return downsample_mean(group, factors)
    f = factors[0]
    out = np.empty(tuple(-(-n // k) for n, k in zip(group.shape, factors, strict=True)), dtype=group.dtype)
    for z in range(0, group.shape[0], step):
        out[z // f : (z + step) // f if z + step < group.shape[0] else None] = downsample_mean(
            group[z : z + step], factors
        )
    return out


def _blocks_along_first_axis(data: da.Array) -> Iterable[np.ndarray]:
    """``data``'s blocks along axis 0, each whole along the other axes, computed one after the other (as
    delayed objects: an array's ``compute`` would copy every block once more)."""
    whole = data.rechunk({i: -1 for i in range(1, data.ndim)}) if data.ndim > 1 else data
    for block in whole.to_delayed(optimize_graph=True).reshape(-1):
        yield np.asarray(block.compute(scheduler="sync"))


def _write_in_order(
    data: da.Array, root: zarr.Group, paths: Sequence[str], plan: list, level_chunks: list
) -> None:
    levels = [cast("zarr.Array", root[p]) for p in paths]
    plane_bytes = math.prod(data.shape[1:]) * data.dtype.itemsize
    workers = max(1, os.cpu_count() or 1)
    max_bytes = max(IN_ORDER_BUFFER_BYTES, (workers + 1) * math.lcm(level_chunks[0][0], 2) * plane_bytes)
    pyramid = _InOrderPyramid(levels, plan, level_chunks, workers, max_bytes)
    try:
        start = 0
        for block in _blocks_along_first_axis(data):
            pyramid.feed(0, start, block)
            start += block.shape[0]
    except BaseException:
        pyramid.close()
        raise
    pyramid.finish()


# ----------------------------------------------------------------------------------------------------
# The writer


def write_ome_zarr(
    data: da.Array,
    url: str,
    *,
    axes: Sequence[str],
    scale: Sequence[float],
    units: Sequence[str | None],
    storage_options: dict | None = None,
    chunks: Sequence[int] | None = None,
    name: str | None = None,
    min_size: int = 256,
    client: Any = None,
    in_order: bool = False,
) -> MultiscaleInfo:
    """Write ``data`` as a multiscale OME-Zarr image (NGFF 0.5, zarr format 3) at ``url``.

    Parameters
    ----------
    data : dask (or numpy) array; integer or floating-point. Level 0 is stored bit-exactly.
    url : a local path or an fsspec URL (``s3://bucket/x.zarr``, ``memory://x.zarr``). Anything
        already there is replaced.
    axes : axis names among t, c, z, y, x in that order; y and x are required.
    scale : voxel size per axis (physical units of ``units``; use 1.0 for t/c if meaningless).
    units : NGFF unit name per axis ("nanometer", "angstrom", "second", ...) or None for no unit.
    storage_options : passed to fsspec for remote URLs.
    chunks : chunk shape per axis; default ~2**20 voxels (see ``default_chunks``).
    name : the multiscale's name in the metadata; default the URL's last component.
    min_size : stop when the largest y/x side of a level is <= this.
    client : a ``distributed.Client``; without one, dask's threaded scheduler runs the tasks.
    in_order : read ``data`` block after block along its first axis and write each level's planes as
        soon as they are complete, in this process (``client`` is not used): for data that arrives in
        that order, e.g. the pages of a file still downloading. The same image as the default.

    Returns the :class:`MultiscaleInfo` of what was written. Raises ValueError for a bad argument,
    naming it (before anything is written).

    Memory: a task holds one block of (level-1 chunk x 2) voxels (16 MiB of uint16 for the default 3-D
    chunks) and a few temporaries, about 35 MiB; the threaded scheduler runs 2 tasks per core, and the
    chunks waiting to be combined into the next level add a few tens of MiB. None of it grows with the
    image size. Chunks that are all zero (the fill value) are not stored, so padded montages stay small.
    """
    if not isinstance(data, da.Array):
        data = da.asarray(data)
    axes, scale_t, units_t = _validate(data.ndim, axes, scale, units)
    dtype = np.dtype(data.dtype)
    try:
        check_downsample_dtype(dtype)
    except ValueError as exc:
        raise ValueError(f"data: {exc}") from None
    if any(n == 0 for n in data.shape):
        raise ValueError(f"data has an empty dimension: shape {data.shape}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive integer, got {min_size!r}")
    if chunks is None:
        chunk_shape = default_chunks(axes, data.shape, scale_t)
    else:
        if len(chunks) != data.ndim or any(int(c) < 1 for c in chunks):
            raise ValueError(f"chunks {tuple(chunks)} must give a positive size for each of the axes {axes}")
        chunk_shape = tuple(min(int(c), n) for c, n in zip(chunks, data.shape, strict=True))

    plan = plan_pyramid(data.shape, axes, scale_t, min_size)
    paths = tuple(str(i) for i in range(len(plan)))
    level_chunks = [tuple(min(c, n) for c, n in zip(chunk_shape, lv.shape, strict=True)) for lv in plan]
    codec = blosc_codec(dtype)

    store = open_store(url, storage_options)
    root = zarr.open_group(store, mode="w", zarr_format=3)
    for path, lv, lc in zip(paths, plan, level_chunks, strict=True):
        root.create_array(
            path,
            shape=lv.shape,
            dtype=dtype,
            chunks=lc,
            compressors=codec,
            fill_value=0,
            dimension_names=axes,
        )
    write_id = uuid.uuid4().hex
    common = {"url": url, "storage_options": storage_options, "write_id": write_id}

    if in_order:
        _write_in_order(data, root, paths, plan, level_chunks)
    else:
        _compute([_pyramid_graph(data, plan, paths, level_chunks, common)], client)

    scale0 = plan[0].scale
    datasets = []
    for path, lv in zip(paths, plan, strict=True):
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": list(lv.scale)}]
        if lv.scale != scale0:
            transforms.append(
                {"type": "translation", "translation": list(level_translation(scale0, lv.scale))}
            )
        datasets.append({"path": path, "coordinateTransformations": transforms})
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    write_multiscales_metadata(
        root,
        datasets=datasets,
        fmt=FormatV05(),
        axes=[{"name": a, "type": AXIS_TYPES[a]} for a in axes],
        axes_units={a: u for a, u in zip(axes, units_t, strict=True) if u is not None},
        name=name or _default_name(url),
        metadata={
            "method": "em_platform.imaging.pyramid.downsample_mean",
            "description": "mean (area) downsampling by 2; y/x every level, z while it keeps the level "
            "near-isotropic; integers rounded half up",
            "kwargs": {"min_size": min_size},
        },
    )
    return MultiscaleInfo(
        url=url,
        axes=axes,
        units=units_t,
        levels=tuple(MultiscaleLevel(p, lv.shape, lv.scale) for p, lv in zip(paths, plan, strict=True)),
        chunks=chunk_shape,
        dtype=dtype.name,
        compressor=_describe(codec),
    )
