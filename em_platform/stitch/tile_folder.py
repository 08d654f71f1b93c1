"""Stitching a folder of TIFF tiles described by a layout CSV (``em-platform stitch``).

For tiles that did not come through the acquisition path: a folder of 2-D TIFFs plus a CSV with the
header ``tile,row,column,x,y`` (file name, grid indices, nominal top-left position in pixels). Each tile
is matched against its top (row − 1) and left (column − 1) grid neighbours with
:func:`~em_platform.tem.matching.match_neighbour`, the way the live pipeline matches processed tiles, and
:func:`~em_platform.stitch.solve.solve_translations` turns the matches into positions with the layout as
the (weak) stage prior. The nominal overlap and the expected offset of every pair come from the layout
positions, not from one montage-wide overlap, so irregular layouts (stage readouts, uneven steps) work.

Memory stays bounded by the montage's width, not its size: tiles are read row by row, each is cut into
the edge strips its pairs need, and a row's strips are dropped once the row below has been matched.
Reading and matching run on a thread pool (tifffile and OpenCV release the GIL).

Dagster-free; bad input raises :class:`TileFolderError` naming the file, the line and the problem.
"""

from __future__ import annotations

import csv
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from em_platform.stitch.solve import Edge, Layout, solve_translations
from em_platform.tem.matching import EdgeStrip, default_max_shift, edge_strip, match_neighbour

__all__ = [
    "LAYOUT_COLUMNS",
    "FolderTile",
    "MatchReport",
    "NeighbourPair",
    "TileFolder",
    "TileFolderError",
    "match_tile_folder",
    "neighbour_pairs",
    "open_tile_folder",
    "positions_path",
    "solve_tile_folder",
    "write_positions",
]

LAYOUT_COLUMNS = ("tile", "row", "column", "x", "y")
MIN_MATCH_OVERLAP_PX = 16  # narrower nominal overlaps leave no room for templates and a search range
_MIN_TEMPLATE_PX = 8  # what match_neighbour needs across the strip beyond the search range
_OPPOSITE = {"top": "bottom", "left": "right"}


class TileFolderError(ValueError):
    """Bad input to a tile-folder stitch: the message names the file (and line) and what to fix."""


@dataclass(frozen=True)
class FolderTile:
    """One layout row, with what the TIFF's header says about the tile."""

    tile: str  # file name inside the folder (the tile id)
    row: int
    column: int
    x: float  # nominal top-left position, px
    y: float
    height: int
    width: int
    line: int  # line of the layout CSV, for messages


@dataclass(frozen=True)
class TileFolder:
    """A validated tile folder: its tiles in layout order, their dtype, and the pixel size the TIFFs'
    resolution tags state (None when they state none)."""

    folder: Path
    layout_csv: Path
    tiles: tuple[FolderTile, ...]
    dtype: np.dtype
    pixel_size_nm: float | None

    def stage(self) -> dict[str, tuple[float, float]]:
        """The layout positions, as the solve's stage prior."""
        return {t.tile: (t.x, t.y) for t in self.tiles}


@dataclass(frozen=True)
class NeighbourPair:
    """A tile and its top or left grid neighbour, with what the layout says about their overlap:
    ``overlap_px`` is the nominal overlap across the shared edge, ``expected`` = (dX, dY) is where the
    layout puts the tile relative to that nominal place (``match_neighbour``'s convention)."""

    tile: FolderTile
    neighbour: FolderTile
    position: Literal["top", "left"]
    overlap_px: int
    expected: tuple[float, float]
    max_shift_px: int

    @property
    def depth(self) -> int:
        """How deep the two edge strips must be: overlap + search range + the sub-pixel rest."""
        return self.overlap_px + self.max_shift_px + 1

    def unmatchable(self) -> str | None:
        """Why the layout rules out matching this pair, or None."""
        if self.overlap_px < MIN_MATCH_OVERLAP_PX:
            return f"the layout overlap is {self.overlap_px} px, too narrow to match"
        across = (lambda t: t.width) if self.position == "left" else (lambda t: t.height)
        if self.depth > min(across(self.tile), across(self.neighbour)):
            return f"the layout overlap is {self.overlap_px} px, more than a tile minus the search range"
        return None

    def edge(self, dX: float, dY: float, weight: float) -> Edge:
        """The solve's edge from a match measured from nominal (position(tile) − position(neighbour))."""
        if self.position == "left":
            return Edge(
                self.tile.tile, self.neighbour.tile, self.neighbour.width - self.overlap_px + dX, dY, weight
            )
        return Edge(
            self.tile.tile, self.neighbour.tile, dX, self.neighbour.height - self.overlap_px + dY, weight
        )


@dataclass(frozen=True)
class MatchReport:
    """The outcome of matching every neighbour pair: edges for the solve, and the pairs that gave none
    (with the reason: the layout leaves too little overlap, or no overlap was found in the pixels)."""

    edges: tuple[Edge, ...]
    unmatched: tuple[tuple[NeighbourPair, str], ...]

    @property
    def pairs(self) -> int:
        return len(self.edges) + len(self.unmatched)


# ----------------------------------------------------------------------------------------------------
# Reading and validating the layout


def open_tile_folder(folder: str | os.PathLike, layout_csv: str | os.PathLike) -> TileFolder:
    """Read and validate ``layout_csv`` against the TIFFs in ``folder``; read each tile's shape and dtype
    from its header (no pixels are read). Raises :class:`TileFolderError` for any problem."""
    folder, layout_csv = Path(folder), Path(layout_csv)
    if not folder.is_dir():
        raise TileFolderError(f"{folder}: not a folder of tiles")
    rows = _read_layout(layout_csv, folder)
    tiles, dtypes, pixel_size = [], {}, None
    for i, (name, row, column, x, y, line) in enumerate(rows):
        (height, width), dtype, size_nm = _tiff_header(folder / name, layout_csv, line)
        if i == 0:
            pixel_size = size_nm  # one camera per montage: the first tile's tags speak for all
        dtypes.setdefault(dtype, name)
        tiles.append(FolderTile(name, row, column, x, y, height, width, line))
    if len(dtypes) > 1:
        examples = ", ".join(f"{name} is {dt}" for dt, name in dtypes.items())
        raise TileFolderError(f"{folder}: tiles must share one dtype to be fused, but {examples}")
    return TileFolder(folder, layout_csv, tuple(tiles), next(iter(dtypes)), pixel_size)


def _read_layout(path: Path, folder: Path) -> list[tuple[str, int, int, float, float, int]]:
    try:
        handle = path.open(newline="", encoding="utf-8-sig")  # a BOM from spreadsheet exports is fine
    except OSError as exc:
        raise TileFolderError(f"{path}: cannot read the layout CSV ({exc.strerror or exc})") from exc
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise TileFolderError(f"{path}: empty; the first line must be {','.join(LAYOUT_COLUMNS)}")
            header = [h.strip().lower() for h in header]
            missing = [c for c in LAYOUT_COLUMNS if c not in header]
            if missing:
                raise TileFolderError(
                    f"{path} line 1: missing column(s) {', '.join(missing)}; "
                    f"the header must name {','.join(LAYOUT_COLUMNS)}"
                )
            index = {c: header.index(c) for c in LAYOUT_COLUMNS}
            out, names, cells = [], {}, {}
            for fields in reader:
                line = reader.line_num
                if not any(f.strip() for f in fields):
                    continue
                if len(fields) != len(header):
                    raise TileFolderError(
                        f"{path} line {line}: {len(fields)} fields, the header has {len(header)}"
                    )
                value = {c: fields[i].strip() for c, i in index.items()}
                name = value["tile"]
                where = f"{path} line {line}"
                if not name:
                    raise TileFolderError(f"{where}: the tile file name is empty")
                if Path(name).name != name or not (folder / name).is_file():
                    raise TileFolderError(f"{where}: tile {name!r} is not a file in {folder}")
                if name in names:
                    raise TileFolderError(
                        f"{where}: tile {name!r} is listed twice (first on line {names[name]})"
                    )
                row, column = (_integer(value[c], c, where) for c in ("row", "column"))
                x, y = (_number(value[c], c, where) for c in ("x", "y"))
                if (row, column) in cells:
                    other, other_line = cells[(row, column)]
                    raise TileFolderError(
                        f"{where}: duplicate grid cell (row {row}, column {column}), "
                        f"already tile {other!r} on line {other_line}"
                    )
                names[name] = line
                cells[(row, column)] = (name, line)
                out.append((name, row, column, x, y, line))
        except csv.Error as exc:
            raise TileFolderError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise TileFolderError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc
    if not out:
        raise TileFolderError(f"{path}: lists no tiles (only the header)")
    return out


def _integer(text: str, column: str, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TileFolderError(f"{where}: {column} is {text!r}, not a whole number") from None
    if value < 0:
        raise TileFolderError(f"{where}: {column} is {value}; grid indices start at 0")
    return value


def _number(text: str, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TileFolderError(f"{where}: {column} is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise TileFolderError(f"{where}: {column} is {text!r}; positions must be finite")
    return value


# TIFF ResolutionUnit → nanometres per unit (inch is left out: 72/96/300 dpi are print defaults, not optics)
_NM_PER_RESOLUTION_UNIT = {3: 1e7, 4: 1e6, 5: 1e3}  # centimeter, millimeter, micrometer (tifffile RESUNIT)
_NM_PER_IMAGEJ_UNIT = {"nm": 1.0, "nanometer": 1.0, "um": 1e3, "µm": 1e3, "\\u00b5m": 1e3, "micron": 1e3}


def _tiff_header(path: Path, layout_csv: Path, line: int) -> tuple[tuple[int, int], np.dtype, float | None]:
    """Shape, dtype and the pixel size (nm) its resolution tags give, if any, of a 2-D TIFF."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype = series.shape, np.dtype(series.dtype).newbyteorder("=")  # big-endian files too
            page = tif.pages[0]
            imagej_unit = (tif.imagej_metadata or {}).get("unit")
            tags = page.tags
            res_x = tags.get("XResolution")
            res_y = tags.get("YResolution")
            unit = tags.get("ResolutionUnit")
            resolution = (
                (_ratio(res_x.value), _ratio(res_y.value), int(unit.value) if unit else 2)
                if res_x and res_y
                else None
            )
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise TileFolderError(f"{layout_csv} line {line}: {path} is not a readable TIFF ({exc})") from exc
    if len(shape) != 2:
        raise TileFolderError(
            f"{layout_csv} line {line}: {path} holds an image of shape {tuple(shape)}; tiles must be 2-D"
        )
    if dtype.kind not in "uif":
        raise TileFolderError(f"{layout_csv} line {line}: {path} has pixels of type {dtype}; need numbers")
    return (int(shape[0]), int(shape[1])), dtype, _pixel_size_nm(resolution, imagej_unit)


def _ratio(value) -> float:
    num, den = value if isinstance(value, tuple) else (value, 1)
    return float(num) / float(den) if den else 0.0


def _pixel_size_nm(resolution: tuple[float, float, int] | None, imagej_unit: str | None) -> float | None:
    """Pixel size from resolution tags (pixels per unit), when they name a physical unit and square pixels."""
    if resolution is None:
        return None
    res_x, res_y, unit = resolution
    if res_x <= 0 or not math.isclose(res_x, res_y, rel_tol=1e-6):
        return None
    per_unit = _NM_PER_RESOLUTION_UNIT.get(unit)
    if per_unit is None and imagej_unit is not None:  # ImageJ keeps the unit in its description
        per_unit = _NM_PER_IMAGEJ_UNIT.get(str(imagej_unit).strip().lower())
    return per_unit / res_x if per_unit else None


# ----------------------------------------------------------------------------------------------------
# Neighbour pairs and matching


def neighbour_pairs(tiles: Iterable[FolderTile], max_shift_px: int | None = None) -> list[NeighbourPair]:
    """Every tile with its top (row − 1) and left (column − 1) grid neighbour, where that cell is in the
    layout. The nominal overlap is the neighbour's extent minus the layout step, so each pair gets its
    own; the search range is ``max_shift_px`` (default: ``default_max_shift`` of that overlap), narrowed
    where the overlap is too thin to leave templates room."""
    by_cell = {(t.row, t.column): t for t in tiles}
    pairs = []
    for (row, column), tile in by_cell.items():
        for position, cell in (("top", (row - 1, column)), ("left", (row, column - 1))):
            neighbour = by_cell.get(cell)
            if neighbour is None:
                continue
            step_x, step_y = tile.x - neighbour.x, tile.y - neighbour.y
            if position == "left":
                overlap = round(neighbour.width - step_x)
                expected = (step_x - (neighbour.width - overlap), step_y)
            else:
                overlap = round(neighbour.height - step_y)
                expected = (step_x, step_y - (neighbour.height - overlap))
            shift = default_max_shift(overlap) if max_shift_px is None else int(max_shift_px)
            shift = max(1, min(shift, overlap - _MIN_TEMPLATE_PX))
            pairs.append(NeighbourPair(tile, neighbour, position, overlap, expected, shift))
    return pairs


def match_tile_folder(
    folder: TileFolder, *, workers: int | None = None, max_shift_px: int | None = None
) -> MatchReport:
    """Match every tile of ``folder`` against its top and left grid neighbours on ``workers`` threads
    (default: one per core). Rows are read one ahead of the row being matched; a row's strips are
    dropped when the next row has been matched, so memory grows with the montage's width only."""
    if max_shift_px is not None and max_shift_px < 1:
        raise TileFolderError(f"max_shift_px must be at least 1 px, got {max_shift_px}")
    unmatched: list[tuple[NeighbourPair, str]] = []
    pairs = []
    for p in neighbour_pairs(folder.tiles, max_shift_px):
        reason = p.unmatchable()
        if reason is None:
            pairs.append(p)
        else:
            unmatched.append((p, reason))
    # how deep each side of each tile must be cut, over all the pairs that use it
    sides: dict[str, dict[str, int]] = {}
    for p in pairs:
        for name, side in ((p.tile.tile, p.position), (p.neighbour.tile, _OPPOSITE[p.position])):
            sides.setdefault(name, {})[side] = max(sides.get(name, {}).get(side, 0), p.depth)
    rows: dict[int, list[FolderTile]] = {}
    for t in folder.tiles:
        rows.setdefault(t.row, []).append(t)
    order = sorted(rows)
    by_row: dict[int, list[NeighbourPair]] = {}
    for p in pairs:
        by_row.setdefault(p.tile.row, []).append(p)

    edges: list[Edge] = []
    strips: dict[str, dict[str, EdgeStrip]] = {}
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:

        def read_row(r: int) -> list[Future]:
            return [pool.submit(_read_strips, folder, t, sides[t.tile]) for t in rows[r] if t.tile in sides]

        pending = read_row(order[0])  # a layout lists at least one tile
        for i, r in enumerate(order):
            current = pending
            pending = read_row(order[i + 1]) if i + 1 < len(order) else []  # one row ahead
            for future in current:
                name, cut = future.result()
                strips[name] = cut
            jobs = [
                (p, pool.submit(_match_pair, p, strips[p.tile.tile], strips[p.neighbour.tile]))
                for p in by_row.get(r, [])
            ]
            for p, job in jobs:
                edge = job.result()
                if edge is None:
                    unmatched.append((p, "no overlap found in the pixels"))
                else:
                    edges.append(edge)
            for t in rows.get(order[i - 1], []) if i else []:
                strips.pop(t.tile, None)  # the row above is done with
    return MatchReport(tuple(edges), tuple(unmatched))


def _read_strips(
    folder: TileFolder, tile: FolderTile, sides: Mapping[str, int]
) -> tuple[str, dict[str, EdgeStrip]]:
    import tifffile

    path = folder.folder / tile.tile
    try:
        image = tifffile.imread(path)
    except Exception as exc:  # tifffile and its codecs raise many kinds on truncated or corrupt data
        raise TileFolderError(f"{path}: cannot read its pixels ({exc}); replace or remove the tile") from exc
    if image.shape != (tile.height, tile.width):
        raise TileFolderError(
            f"{path}: pixels of shape {image.shape}, but its header said {(tile.height, tile.width)}"
        )
    return tile.tile, {side: edge_strip(image, side, d, 0) for side, d in sides.items()}


def _match_pair(
    pair: NeighbourPair, tile: Mapping[str, EdgeStrip], neighbour: Mapping[str, EdgeStrip]
) -> Edge | None:
    m = match_neighbour(
        tile[pair.position],
        neighbour[_OPPOSITE[pair.position]],
        pair.position,
        pair.overlap_px,
        max_shift_px=pair.max_shift_px,
        expected=pair.expected,
    )
    return None if m is None else pair.edge(m.dX, m.dY, m.quality)


def solve_tile_folder(folder: TileFolder, report: MatchReport) -> Layout:
    """Tile positions (top-left, px, the layout's frame) from the matches, the layout as stage prior."""
    return solve_translations(folder.stage(), report.edges)


# ----------------------------------------------------------------------------------------------------
# Output


def positions_path(out: str | os.PathLike) -> Path:
    """``OUT.positions.csv`` beside the fused ``OUT.zarr``."""
    out = Path(out)
    stem = out.name[: -len(".zarr")] if out.name.endswith(".zarr") else out.name
    return out.with_name(f"{stem}.positions.csv")


def write_positions(path: str | os.PathLike, positions: Mapping[str, tuple[float, float]]) -> Path:
    """Write ``tile,x,y`` (solved top-left corners, px) atomically: a temporary file renamed into place,
    so a reader never sees half a table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(("tile", "x", "y"))
            for name, (x, y) in positions.items():
                writer.writerow((name, f"{x:.3f}", f"{y:.3f}"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
