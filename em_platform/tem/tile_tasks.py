"""The Dask tasks of live montage processing: build the flatfield, process one tile, judge one tile.

Three tasks per tile, all submitted the moment the tile is in the journal:

* :func:`process_tile_file` reads, corrects, enhances and measures the tile and keeps on the worker what
  later steps need: statistics, focus, the four overlap strips and (until it is stored) the processed
  tile. It never raises for a bad tile: the error is part of its :class:`TileOutcome`, so a corrupt tile
  cannot fail the tasks of its neighbours that depend on it.
* :func:`judge_tile` depends on that task and on the neighbours' (Dask starts it when they are done):
  it matches the overlaps that involve the tile and returns a small :class:`Judgement` (statistics,
  focus, matches; no pixels) — the only result the verdict waits for.
* :func:`store_processed_tile` writes the processed tile behind the verdict: it leaves Dask's thread
  slots (``secede``) and writes one tile at a time per worker process at a lower CPU priority, so a store
  never holds a thread a live tile needs (on the critical path it cost 60 ms of the 160 ms a tile takes,
  and more while an ingest filled the page cache).

Each task reports the CPU seconds of its own stages (``cpu``), which the benchmark adds up, and when it
started and ended (``times``, Unix seconds), from which the run tells where a tile's latency went.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np

from em_platform.cluster.batch_priority import lower_thread_priority
from em_platform.stitch.grid import OPPOSITE, Position, Side, neighbour_of, to_nominal
from em_platform.tem.qc import QCConfig, usable_for_matching

STORE_CHUNK_PX = 1024  # largest chunk edge of a stored processed tile
STORE_NICENESS = 5  # a store's thread: behind the live tiles' threads (0), ahead of batch workers (10)
_ONE_WRITER = threading.Lock()  # one processed tile written at a time per worker process
MIN_TEMPLATE_PX = 8  # stitch.matching's narrowest template: an overlap thinner than this is not searched


@dataclass(frozen=True)
class TileOutcome:
    """A processed tile as the later steps see it (the pixels themselves are in storage)."""

    stats: dict[str, Any] | None
    focus: float | None
    shape: tuple[int, int] | None
    strips: dict[str, Any] = field(default_factory=dict)  # "top" ... "right": EdgeStrips (worker side)
    error: str | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # thread CPU seconds per stage
    times: dict[str, float] = field(default_factory=dict)  # "process_start", "process_end": Unix seconds
    pixels: PixelHandOff | None = None  # the processed tile, worker side, until it is stored

    def without_pixels(self) -> TileOutcome:
        """What leaves the worker: no strips, no processed tile."""
        return replace(self, strips={}, pixels=None)


class PixelHandOff:
    """The processed tile, held by its outcome until :func:`store_processed_tile` takes it: the outcome
    stays on the worker while neighbours still match against its strips, the 25 MB tile need not."""

    def __init__(self, image: np.ndarray):
        self._image: np.ndarray | None = image

    def take(self) -> np.ndarray:
        image, self._image = self._image, None
        if image is None:
            raise RuntimeError("the processed tile was already stored (or its worker restarted)")
        return image


@dataclass(frozen=True)
class StoredTile:
    """A processed tile whose strips are no longer held by the workers: they are read from storage."""

    url: str
    storage_options: dict | None
    shape: tuple[int, int]


@dataclass(frozen=True)
class EdgeJob:
    """One overlap to match: ``tile_id`` (at ``row``, ``column``) against its ``position`` neighbour.

    ``stage_offset``: where the stage puts the tile relative to the neighbour, ``position(tile) −
    position(neighbour)`` in image pixels (None without stage positions or pixel size).
    """

    tile_id: str
    row: int
    column: int
    position: Position
    overlap: int
    stage_offset: tuple[float, float] | None


@dataclass(frozen=True)
class Judgement:
    """What the run needs of a judged tile: its outcome (no strips) and the matches its task measured.

    ``matches``: (tile id, position, result): the TEM_comms ``Match`` fields plus ``quality``, ``None``
    when no overlap was found, ``{"skipped": True}`` when one side has a single-tile fault.
    """

    tile_id: str
    outcome: TileOutcome
    matches: list[tuple[str, str, dict[str, Any] | None]]
    cpu: dict[str, float]
    times: dict[str, float] = field(default_factory=dict)  # "judge_start", "judge_end": Unix seconds


_warmed = False  # this process has run warm_up


def warm_up() -> None:
    """Load what the first tile would otherwise wait for: OpenCV, zarr's codec pipeline, the focus masks,
    every compiled kernel of the chain (numba's import and cache: 0.5-1 s in a new process, 1.5-2.4 s more
    for each kernel never compiled): the chain itself, on a small tile, so that no kernel it reaches is
    left out (the histogram of the statistics was, and a fresh install's first tile took 2.4 s). Once a
    process: a montage run asks every worker for it as it starts, and on the live-QC service's warm workers
    the montage's first tiles would queue behind 0.1 s of it for each thread."""
    global _warmed
    if _warmed:
        return
    import zarr

    from em_platform.tem.tile_processing import Flatfield

    for dtype in (np.uint8, np.uint16):
        image = np.zeros((512, 512), dtype)
        flatfield = Flatfield.from_references(np.full(image.shape, 200, dtype), image)
        for correction in (None, flatfield):
            _process_image(image, correction, overlap=51, cpu={})
    zarr.create_array(zarr.storage.MemoryStore(), shape=(8,), dtype="u1")[...] = 0
    _warmed = True


def build_flatfield(bright_paths: list[str], dark_paths: list[str]):
    from em_platform.tem.tile_processing import Flatfield, read_tile

    return Flatfield.from_frames([read_tile(p) for p in bright_paths], [read_tile(p) for p in dark_paths])


def strip_depth(overlap: int) -> int:
    """How deep a stored strip reaches beyond the overlap: the search range plus room for the stage's place."""
    from em_platform.stitch.matching import default_max_shift, stage_margin

    return default_max_shift(overlap) + stage_margin(overlap)


def _strips(image: np.ndarray, overlap: int) -> dict[str, Any]:
    from em_platform.stitch.matching import edge_strip

    depth = strip_depth(overlap)
    return {side: edge_strip(image, side, overlap, depth) for side in ("top", "bottom", "left", "right")}


def store_chunks(shape: tuple[int, int]) -> tuple[int, int]:
    """Chunks of at most ``STORE_CHUNK_PX`` that divide the tile evenly where they can (5000 px: 1000), so
    no chunk is padded."""
    return tuple(-(-n // -(-n // STORE_CHUNK_PX)) for n in shape)  # type: ignore[return-value]


def store_shard(shape: tuple[int, int]) -> tuple[int, int]:
    """The one shard that holds the whole tile: whole chunks (zarr's rule), so a tile whose side has no
    divisor near ``STORE_CHUNK_PX`` (1031 px) has a shard reaching past it."""
    return tuple(-(-n // c) * c for n, c in zip(shape, store_chunks(shape), strict=True))  # type: ignore[return-value]


def process_tile_file(
    path: str,
    flatfield,
    *,
    overlap: int,
) -> TileOutcome:
    """Read, correct, enhance and measure one tile; the processed tile stays with the outcome for
    :func:`store_processed_tile`.

    A tile that cannot be read or processed gives an outcome with ``error`` set (never an exception).
    """
    cpu: dict[str, float] = {}
    clock = time.thread_time
    started, began = clock(), time.time()
    try:
        outcome = _process(path, flatfield, overlap, cpu)
    except Exception as exc:
        outcome = TileOutcome(
            None, None, None, error=f"{type(exc).__name__}: {exc}", cpu={"read": clock() - started}
        )
    return replace(outcome, times={"process_start": began, "process_end": time.time()})


def _process(path, flatfield, overlap, cpu) -> TileOutcome:
    from em_platform.tem.tile_processing import read_tile

    t = time.thread_time()
    raw = read_tile(path)
    _lap(cpu, "read", t, time.thread_time)
    return _process_image(raw, flatfield, overlap, cpu)


def _process_image(raw: np.ndarray, flatfield, overlap: int, cpu: dict[str, float]) -> TileOutcome:
    import cv2

    from em_platform.tem.tile_processing import (
        flatfield_and_clahe,
        focus_score,
        raw_statistics,
        tile_statistics,
    )

    cv2.setNumThreads(1)  # Dask runs one tile per thread; OpenCV's own pool would oversubscribe the cores
    clock = time.thread_time
    t = clock()
    image = flatfield_and_clahe(raw, flatfield)  # one pass for both (uint8): their CPU is one stage
    t = _lap(cpu, "flatfield_clahe", t, clock)
    # Blank, saturated and no-tissue are camera facts: judged on the raw counts, before CLAHE re-stretches them.
    stats = {**tile_statistics(image), **raw_statistics(raw)}
    t = _lap(cpu, "stats", t, clock)
    # Focus is judged on the raw tile. After CLAHE, 8-bit local re-stretching draws contour steps into a
    # blurred tile that read as fine detail; after flatfield, the reference frames' own noise (a few
    # averaged frames) adds white noise that buries the band. Vignetting, which flatfield removes, is
    # smooth and does not reach the 50-251 band anyway.
    focus = float(focus_score(raw))
    t = _lap(cpu, "focus", t, clock)
    strips = _strips(image, overlap)
    _lap(cpu, "strips", t, clock)
    return TileOutcome(stats, focus, image.shape, strips, cpu=cpu, pixels=PixelHandOff(image))


@dataclass(frozen=True)
class Stored:
    """A processed tile written: where (an end for later matches), and what the write cost."""

    tile: StoredTile
    cpu: dict[str, float]
    times: dict[str, float]  # "store_start", "store_end": Unix seconds


def store_processed_tile(
    outcome: TileOutcome,
    *,
    url: str,
    storage_options: dict | None,
    tiff_path: str | None = None,
) -> Stored | None:
    """Write the outcome's processed tile as the zarr array at ``url`` (and as ``tiff_path`` if given), off
    Dask's thread slots, one tile at a time per process, at :data:`STORE_NICENESS`. None for a tile that
    failed (nothing to store); raises when the write fails (the run reports it and a re-run re-makes it)."""
    if outcome.error is not None or outcome.pixels is None:
        return None
    _leave_thread_pool()
    with _ONE_WRITER:
        began = time.time()
        started = time.thread_time()
        image = outcome.pixels.take()
        store_tile(image, url, storage_options)
        if tiff_path:
            _write_tiff(tiff_path, image, storage_options)
        cpu = {"store": time.thread_time() - started}
        return Stored(
            StoredTile(url, storage_options, outcome.shape),  # type: ignore[arg-type]
            cpu,
            {"store_start": began, "store_end": time.time()},
        )


def _leave_thread_pool() -> None:
    """Free this task's Dask thread slot (the thread ends with the task) and lower the thread's CPU
    priority; outside a Dask worker (a synchronous scheduler) nothing changes."""
    from distributed import secede

    try:
        secede()
    except ValueError:  # not on a worker
        return
    if sys.platform == "linux":  # elsewhere the niceness is the whole process's: leave it
        lower_thread_priority(STORE_NICENESS)


def store_tile(image: np.ndarray, url: str, storage_options: dict | None = None) -> None:
    """Write a processed tile as the zarr array at ``url``: one shard (one file or object) of uncompressed
    chunks of :func:`store_chunks`, so a region (a neighbour's strip) is read without the rest. Its
    ``zarr.json`` says ``complete``; an array without that was cut off mid-write (:func:`stored_completely`).

    Uncompressed because CLAHE output hardly compresses: on 5000² bench tiles Blosc-LZ4 saved 0.0 % for
    5 ms of CPU, Blosc-Zstd level 1 saved 6 % for 40 ms, while the write itself costs about 15 ms.

    On a local file system (:func:`_store_tile_locally`) the shard goes straight into its file, around
    the page cache, and the ``zarr.json`` zarr would write is written last; elsewhere zarr writes it all.
    """
    folder = _local_folder(url, storage_options)
    if folder is not None:
        _store_tile_locally(image, folder)
        return
    import zarr

    arr = zarr.create_array(
        url,
        shape=image.shape,
        chunks=store_chunks(image.shape),
        shards=store_shard(image.shape),
        dtype=image.dtype,
        overwrite=True,
        storage_options=storage_options,
        compressors=None,
    )
    arr[...] = image
    arr.attrs["complete"] = True


def _local_folder(url: str, storage_options: dict | None) -> str | None:
    """The folder of the array at ``url`` when it is on a local file system, else None."""
    if "://" not in url:
        return os.path.abspath(url)
    if url.startswith("file://") and not storage_options:
        return os.path.abspath(url[len("file://") :])
    return None


def _store_tile_locally(image: np.ndarray, folder: str) -> None:
    """The array's shard file written directly and around the page cache (``O_DIRECT``,
    :func:`em_platform.imaging.chunk_io.write_shard_file`), then its ``zarr.json``, byte for byte what
    zarr writes for it, ``complete`` included, by rename: a reader sees no array until it is all there.

    Why: zarr's own writer cost about 50 ms of CPU per 5000² tile in its I/O threads, the direct write
    6-10 ms, and creating the array and setting its attribute through zarr 2-3 ms more. Through the
    page cache the write cost the writer about twice the CPU (page allocation, copy, reclaim when memory
    is short), and the kernel's writeback of the dirty pages ran at normal priority beside the live tiles;
    the tile is read again only after the montage, long after a real montage's pages would be dropped.
    """
    import shutil

    from em_platform.imaging.chunk_io import write_shard_file

    document, metadata = _array_document(image.shape, image.dtype.str)
    if os.path.lexists(folder):  # a tile stored before (a re-run): its old array goes first
        shutil.rmtree(folder)
    os.makedirs(folder)
    write_shard_file(folder, metadata, image, around_page_cache=True)
    staging = os.path.join(folder, f".zarr.json.{os.getpid()}.{threading.get_native_id()}")
    with open(staging, "wb") as f:
        f.write(document)
    os.replace(staging, os.path.join(folder, "zarr.json"))


@lru_cache(maxsize=8)
def _array_document(shape: tuple[int, int], dtype: str) -> tuple[bytes, Any]:
    """The ``zarr.json`` zarr writes for a stored tile of ``shape`` and ``dtype`` marked complete, and
    its metadata (made once per process, by zarr, in memory)."""
    import zarr
    from zarr.core.buffer import default_buffer_prototype

    arr = zarr.create_array(
        zarr.storage.MemoryStore(),
        shape=shape,
        chunks=store_chunks(shape),
        shards=store_shard(shape),
        dtype=np.dtype(dtype),
        compressors=None,
    )
    arr.attrs["complete"] = True
    return arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes(), arr.metadata


def stored_completely(url: str, storage_options: dict | None = None) -> bool:
    """Whether the processed tile at ``url`` was written to the end (:func:`store_tile`)."""
    import zarr

    try:
        arr = zarr.open_array(url, mode="r", storage_options=storage_options)
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.ArrayNotFoundError):
        return False
    return arr.attrs.get("complete") is True


def read_region(
    url: str, storage_options: dict | None, rows: tuple[int, int], cols: tuple[int, int]
) -> np.ndarray:
    """Rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]`` of the stored processed tile at ``url``."""
    import zarr

    arr = zarr.open_array(url, mode="r", storage_options=storage_options)
    return np.asarray(arr[rows[0] : rows[1], cols[0] : cols[1]])


def _lap(cpu: dict[str, float], stage: str, since: float, clock) -> float:
    now = clock()
    cpu[stage] = cpu.get(stage, 0.0) + now - since
    return now


def _write_tiff(path: str, image: np.ndarray, storage_options: dict | None) -> None:
    import io

    import fsspec
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, image)  # uncompressed, as TEM_graph's IMWriteNode
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(p + ".tmp", "wb") as f:
        f.write(buf.getvalue())
    fs.mv(p + ".tmp", p)


# ----------------------------------------------------------------------------------------------------
# Judging


def judge_tile(
    tile_id: str,
    outcome: TileOutcome,
    edges: list[tuple[EdgeJob, Any, Any]],
    qc: QCConfig,
) -> Judgement:
    """Match every overlap in ``edges`` (tile end, neighbour end: a :class:`TileOutcome` with its strips,
    a :class:`StoredTile`, or a store's :class:`Stored`) and return ``tile_id``'s judgement.

    An edge with a tile that has a single-tile fault (or failed) is skipped: nothing to match, and not
    the other tile's fault. A match that raises counts as no overlap found, with the error noted.
    """
    started, began = time.thread_time(), time.time()
    results: list[tuple[str, str, dict[str, Any] | None]] = []
    for job, tile, neighbour in edges:
        tile, neighbour = _as_end(tile), _as_end(neighbour)
        if tile is None or neighbour is None or not (_usable(tile, qc) and _usable(neighbour, qc)):
            results.append((job.tile_id, job.position, {"skipped": True}))
            continue
        try:
            results.append((job.tile_id, job.position, match_edge(job, tile, neighbour)))
        except Exception as exc:  # a bug or bad input: reported as no overlap, with the reason
            results.append((job.tile_id, job.position, {"error": f"{type(exc).__name__}: {exc}"}))
    cpu = {"match": time.thread_time() - started} if edges else {}
    return Judgement(
        tile_id, outcome.without_pixels(), results, cpu, {"judge_start": began, "judge_end": time.time()}
    )


def _as_end(end: TileOutcome | StoredTile | Stored | None) -> TileOutcome | StoredTile | None:
    """A store's result as the stored tile it wrote (None: the tile failed, nothing was stored)."""
    return end.tile if isinstance(end, Stored) else end


def _usable(end: TileOutcome | StoredTile | None, qc: QCConfig) -> bool:
    if end is None:
        return False
    # a stored tile was judged usable by the run before it was handed over as one
    return isinstance(end, StoredTile) or (
        end.error is None and usable_for_matching(end.stats, end.focus, qc)
    )


def _strip(end: TileOutcome | StoredTile, side: Side, overlap: int):
    if isinstance(end, TileOutcome):
        return end.strips[side], end.shape
    from em_platform.stitch.matching import edge_strip

    h, w = end.shape
    depth = overlap + strip_depth(overlap)
    rows = {"top": (0, min(h, depth)), "bottom": (max(0, h - depth), h)}.get(side, (0, h))
    cols = {"left": (0, min(w, depth)), "right": (max(0, w - depth), w)}.get(side, (0, w))
    region = read_region(end.url, end.storage_options, rows, cols)
    strip = edge_strip(region, side, overlap, strip_depth(overlap))
    return type(strip)(strip.pixels, strip.side, end.shape), end.shape


def _clamp_across(
    expected: tuple[float, float], position: str, closer: int, apart: int
) -> tuple[float, float]:
    """The stage's place, its shift *across* the edge kept where the strips can follow it.

    Closer together than nominal (negative across), the overlap is deeper than nominal: at most ``closer``
    px, what the strips' extra depth leaves beyond the search range. Further apart (positive), the overlap is thinner: at most ``apart`` px,
    which leaves the templates their minimum width. Along the edge nothing is clamped: the strips run the
    tile's whole length and the patches are placed where the stage says the tiles overlap. (Clamping both
    components to half the overlap lost every edge whose tiles sat further off than that: 3 of the 40
    edges of a clean 5 x 5 scope-sim montage, seeds 0-2, at its default ±20 px stage jitter.)
    """
    dx, dy = expected
    if position == "left":
        return float(np.clip(dx, -closer, apart)), float(dy)
    return float(dx), float(np.clip(dy, -closer, apart))


def match_edge(
    job: EdgeJob, tile: TileOutcome | StoredTile, neighbour: TileOutcome | StoredTile
) -> dict[str, Any] | None:
    """Match the tile's ``job.position`` strip against the neighbour's opposite strip.

    With a stage offset the search is centred where the stage puts the tile (across the edge as far as
    the strips reach, :func:`_clamp_across`), searching :func:`~em_platform.stitch.matching.stage_search`
    around it, and around nominal if that finds
    nothing, so a wrong stage reading costs time, never a match. Returns the TEM_comms ``Match`` fields
    plus ``quality``, ``n_agreeing`` and ``search`` ("stage"/"nominal"), or None when no overlap is found.
    """
    from em_platform.stitch.matching import match_neighbour, stage_search

    overlap, position = job.overlap, job.position
    own, _ = _strip(tile, position, overlap)
    other, neighbour_shape = _strip(neighbour, OPPOSITE[position], overlap)
    expected = None
    if job.stage_offset is not None:
        expected = to_nominal(*job.stage_offset, neighbour_shape, overlap, position)
    m, search = None, "nominal"
    if expected is not None and any(round(e) for e in expected):
        shift = stage_search(overlap)
        closer, apart = strip_depth(overlap) - shift, overlap - shift - MIN_TEMPLATE_PX
        centre = _clamp_across(expected, position, max(closer, 0), max(apart, 0))
        m, search = (
            match_neighbour(own, other, position, overlap, max_shift_px=shift, expected=centre),
            "stage",
        )
    if m is None:
        m, search = match_neighbour(own, other, position, overlap), "nominal"
    if m is None:
        return None
    return {
        **m.to_message(*neighbour_of(job.row, job.column, position)),
        "quality": m.quality,
        "n_agreeing": m.n_agreeing,
        "search": search,
    }
