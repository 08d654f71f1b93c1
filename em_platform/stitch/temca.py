"""A TEMCA montage metafile (``_metadata_*.json``, the Allen Institute's TEM camera arrays) as a tile folder.

The scope writes one JSON list per montage, which em_stitch reads the same way
(``meta_to_collection``, ``generate_EM_tilespecs_from_metafile``):

* ``[0]["metadata"]``: the ROI's facts: ``calibration.highmag`` (``x_nm_per_pix``, ``angle``),
  ``camera_info`` (``width``, ``height``, ``camera_bpp``), ``overlap``, ``temca_id``, ``session_id``, ``grid``;
* ``[1]["data"]``: per tile ``img_path``, ``img_meta`` (``raster_pos`` = [column, row], ``stage_pos`` [x, y] nm,
  ``pixel_size_x_move``/``_y_move`` nm/px, ``angle`` °) and the live matcher's results, ``matcher``: per
  edge ``position`` (2 left, 3 top, 4 right neighbour; em_stitch's ``Edge``), ``match_quality`` (−1: no
  match was possible) and point pairs ``pX, pY`` in the neighbour (the template's tile) with ``qX, qY`` the
  same specimen points in this tile;
* ``[2]``: ``sharedTransform`` (the scope's lens correction as a render transform), ``tile_qc``, ``alerts``.

Stage positions become image pixels as em_stitch's tile specs place them: divided by the move pixel size and
turned by ``-angle`` (``x' = x cos a + y sin a``, ``y' = −x sin a + y cos a``), shifted so the smallest is 0.
The matches need no stage: their points are tile pixels. Dagster-free.
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from em_platform.stitch.layout import PointEdge

__all__ = ["TemcaMontage", "TemcaTile", "read_temca_metafile"]

NEIGHBOUR_AT = {2: (-1, 0), 3: (0, -1), 4: (1, 0)}  # matcher position -> (Δcolumn, Δrow) of the neighbour
NO_MATCH = -1


class TemcaFileError(ValueError):
    """Not a TEMCA montage metafile, or one missing a field: the message names the file and the field."""


@dataclass(frozen=True)
class TemcaTile:
    name: str  # img_path: the tile's file name beside the metafile
    row: int
    column: int
    x: float  # top-left corner where the stage put it, image px
    y: float


@dataclass(frozen=True)
class TemcaMontage:
    path: Path
    tiles: tuple[TemcaTile, ...]
    edges: tuple[PointEdge, ...]  # tile = the template's tile (p), neighbour = the matched tile (q)
    width: int
    height: int
    dtype: np.dtype
    pixel_size_nm: float
    stage_angle_deg: float
    edges_without_match: int  # matcher entries flagged match_quality −1 or without a neighbour tile
    metadata: dict[str, Any]
    shared_transform: dict[str, Any] | None  # the scope's lens correction as render writes it (not applied)


def _field(obj: Any, *keys: str, where: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            raise TemcaFileError(f"{where}: no {'.'.join(keys)}")
        obj = obj[key]
    return obj


def _section(doc: list, key: str, path: Path) -> Any:
    for item in doc:
        if isinstance(item, dict) and key in item:
            return item[key]
    return None


def read_temca_metafile(path: str | os.PathLike) -> TemcaMontage:
    """Tiles, stage positions and the matcher's point pairs of one TEMCA montage (module docstring); a
    ``.json.xz`` or ``.json.gz`` is read as it is."""
    path = Path(path)
    try:
        content = path.read_bytes()
        if path.suffix in (".xz", ".gz"):  # as archived: read it without unpacking it first
            content = (lzma.decompress if path.suffix == ".xz" else gzip.decompress)(content)
        doc = json.loads(content.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, lzma.LZMAError, EOFError) as exc:
        raise TemcaFileError(f"{path}: cannot read a TEMCA metafile ({exc})") from exc
    if not isinstance(doc, list):
        raise TemcaFileError(
            f"{path}: a TEMCA metafile is a JSON list of sections, found {type(doc).__name__}"
        )
    metadata, data = _section(doc, "metadata", path), _section(doc, "data", path)
    if not isinstance(metadata, dict) or not isinstance(data, list) or not data:
        raise TemcaFileError(f"{path}: needs a 'metadata' section and a non-empty 'data' list of tiles")
    width = int(_field(metadata, "camera_info", "width", where=str(path)))
    height = int(_field(metadata, "camera_info", "height", where=str(path)))
    bits = int(metadata.get("camera_info", {}).get("camera_bpp", 8))
    pixel_size = float(_field(metadata, "calibration", "highmag", "x_nm_per_pix", where=str(path)))
    tiles: list[TemcaTile] = []
    raw: list[tuple[int, int, list]] = []
    angle = 0.0
    for i, tile in enumerate(data):
        where = f"{path}: data[{i}]"
        name = str(_field(tile, "img_path", where=where))
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise TemcaFileError(f"{where}: img_path {name!r} is not a file name beside the metafile")
        column, row = (int(v) for v in _field(tile, "img_meta", "raster_pos", where=where))
        sx, sy = (float(v) for v in _field(tile, "img_meta", "stage_pos", where=where))
        meta = tile["img_meta"]
        res_x = float(meta.get("pixel_size_x_move", pixel_size))
        res_y = float(meta.get("pixel_size_y_move", pixel_size))
        angle = float(meta.get("angle", _field(metadata, "calibration", "highmag", "angle", where=where)))
        a = math.radians(angle)
        x, y = sx / res_x, sy / res_y
        tiles.append(
            TemcaTile(
                name, row, column, x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
            )
        )
        raw.append((column, row, tile.get("matcher") or []))
    if len({(t.column, t.row) for t in tiles}) != len(tiles):
        raise TemcaFileError(f"{path}: two tiles share a raster_pos")
    x0, y0 = min(t.x for t in tiles), min(t.y for t in tiles)
    tiles = [TemcaTile(t.name, t.row, t.column, t.x - x0, t.y - y0) for t in tiles]
    at = {(t.column, t.row): t.name for t in tiles}
    edges: dict[tuple[str, str], PointEdge] = {}
    unmatched = 0
    for (column, row, matcher), tile in zip(raw, tiles, strict=True):
        for k, m in enumerate(matcher):
            where = f"{path}: {tile.name} matcher[{k}]"
            step = NEIGHBOUR_AT.get(int(_field(m, "position", where=where)))
            neighbour = at.get((column + step[0], row + step[1])) if step else None
            if int(m.get("match_quality", 0)) == NO_MATCH or neighbour is None:
                unmatched += 1
                continue
            p = np.column_stack([_field(m, "pX", where=where), _field(m, "pY", where=where)]).astype(
                np.float64
            )
            q = np.column_stack([_field(m, "qX", where=where), _field(m, "qY", where=where)]).astype(
                np.float64
            )
            if p.shape != q.shape or not len(p) or not (np.isfinite(p).all() and np.isfinite(q).all()):
                raise TemcaFileError(f"{where}: pX/pY and qX/qY must be finite lists of one length")
            edges[(neighbour, tile.name)] = PointEdge(neighbour, tile.name, p, q)
    shared = _section(doc, "sharedTransform", path)
    return TemcaMontage(
        path=path,
        tiles=tuple(tiles),
        edges=tuple(edges.values()),
        width=width,
        height=height,
        dtype=np.dtype(np.uint8 if bits <= 8 else np.uint16),
        pixel_size_nm=pixel_size,
        stage_angle_deg=angle,
        edges_without_match=unmatched,
        metadata=metadata,
        shared_transform=shared if isinstance(shared, dict) else None,
    )
