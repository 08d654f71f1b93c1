"""The Dask tasks of live montage processing: build the flatfield, process one tile file, match two tiles.

A tile task returns only what later steps need — statistics, focus and the four overlap strips of the
processed tile — so the full image goes to storage once and never travels between tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TileOutcome:
    stats: dict[str, Any]
    focus: float
    shape: tuple[int, int]
    strips: dict[str, Any]  # "top", "bottom", "left", "right": EdgeStrips of the processed tile
    tiff_path: str | None = None


def warm_up() -> None:
    """Load what the first tile would otherwise wait for: OpenCV, zarr's codec pipeline, the focus masks."""
    import cv2
    import zarr
    from zarr.codecs import BloscCodec  # noqa: F401

    from em_platform.tem.tile_processing import clahe, focus_score

    cv2.setNumThreads(1)
    image = np.zeros((512, 512), np.uint8)
    clahe(image)
    focus_score(image)
    zarr.create_array(zarr.storage.MemoryStore(), shape=(8,), dtype="u1")[...] = 0


def build_flatfield(bright_paths: list[str], dark_paths: list[str]):
    from em_platform.tem.tile_processing import Flatfield, read_tile

    return Flatfield.from_frames([read_tile(p) for p in bright_paths], [read_tile(p) for p in dark_paths])


def _strips(image: np.ndarray, overlap: int) -> dict[str, Any]:
    from em_platform.tem.matching import default_max_shift, edge_strip, stage_margin

    depth = default_max_shift(overlap) + stage_margin(
        overlap
    )  # beyond the overlap: room for the stage's place
    return {side: edge_strip(image, side, overlap, depth) for side in ("top", "bottom", "left", "right")}


def process_tile_file(
    path: str,
    flatfield,
    *,
    overlap: int,
    out_url: str,
    storage_options: dict | None,
    array_name: str,
    tiff_path: str | None = None,
) -> TileOutcome:
    """Read, correct, enhance and measure one tile; store the processed tile as ``<out_url>/<array_name>``."""
    import cv2
    import zarr
    from zarr.codecs import BloscCodec

    from em_platform.tem.tile_processing import clahe, focus_score, read_tile, tile_statistics

    cv2.setNumThreads(1)  # Dask runs one tile per thread; OpenCV's own pool would oversubscribe the cores
    raw = read_tile(path)
    corrected = flatfield.apply(raw) if flatfield is not None else raw
    image = clahe(corrected)
    # Focus is judged on the raw tile. After CLAHE, 8-bit local re-stretching draws contour steps into a
    # blurred tile that read as fine detail; after flatfield, the reference frames' own noise (a few
    # averaged frames) adds white noise that buries the band. Vignetting, which flatfield removes, is
    # smooth and does not reach the 50-251 band anyway.
    focus = focus_score(raw)
    # Blank and saturated are camera facts: judge them on the raw counts, before CLAHE re-stretches them.
    top = np.iinfo(raw.dtype).max
    stats = {
        **tile_statistics(image),
        "raw_std": float(cv2.meanStdDev(raw)[1][0, 0]),  # 25× numpy's std on a 5000² tile
        "saturated_fraction": float(np.count_nonzero(raw == top)) / raw.size,
    }
    arr = zarr.create_array(
        f"{out_url}/{array_name}",
        shape=image.shape,
        chunks=(min(1024, image.shape[0]), min(1024, image.shape[1])),
        dtype=image.dtype,
        overwrite=True,
        storage_options=storage_options,
        # On the live path: LZ4 writes a 5000² tile in half the time of zarr's default Zstd for 10 % more
        # bytes (CLAHE output barely compresses). The stitched montage is compressed properly later.
        compressors=BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle"),
    )
    arr[...] = image
    if tiff_path:
        _write_tiff(tiff_path, image, storage_options)
    return TileOutcome(
        stats=stats,
        focus=float(focus),
        shape=image.shape,
        strips=_strips(image, overlap),
        tiff_path=tiff_path,
    )


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


_OPPOSITE = {"top": "bottom", "left": "right"}
_NEIGHBOUR = {"top": (-1, 0), "left": (0, -1)}


def match_outcomes(
    tile: TileOutcome,
    neighbour: TileOutcome,
    position: str,
    overlap: int,
    row: int,
    column: int,
    expected: tuple[float, float] | None = None,
) -> dict[str, Any] | None:
    """Match ``tile`` (at ``row``, ``column``) against its ``position`` ("top"/"left") neighbour's strip.

    ``expected``: the offset from nominal the stage positions predict. The search is centred there
    (clamped to :func:`~em_platform.tem.matching.stage_margin`, searching
    :func:`~em_platform.tem.matching.stage_search` around it), and around nominal if that finds
    nothing, so a wrong stage reading costs time, never a match. Returns the TEM_comms ``Match``
    fields plus ``quality``, ``n_agreeing`` and ``search`` ("stage"/"nominal"), or None when no
    overlap is found.
    """
    from em_platform.tem.matching import match_neighbour, stage_margin, stage_search

    dr, dc = _NEIGHBOUR[position]
    strips = tile.strips[position], neighbour.strips[_OPPOSITE[position]]
    m, search = None, "nominal"
    if expected is not None and any(round(e) for e in expected):
        limit = stage_margin(overlap)
        centre = tuple(float(np.clip(e, -limit, limit)) for e in expected)
        shift = stage_search(overlap)
        m, search = match_neighbour(*strips, position, overlap, max_shift_px=shift, expected=centre), "stage"
    if m is None:
        m, search = match_neighbour(*strips, position, overlap), "nominal"
    if m is None:
        return None
    return {
        **m.to_message(row + dr, column + dc),
        "quality": m.quality,
        "n_agreeing": m.n_agreeing,
        "search": search,
    }
