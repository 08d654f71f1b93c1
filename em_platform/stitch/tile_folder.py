"""Stitching a folder of TIFF tiles described by a layout CSV (``em-platform stitch``).

For tiles that did not come through the acquisition path: a folder of 2-D TIFFs plus a CSV with the
header ``tile,row,column,x,y`` (file name, grid indices, top-left position in pixels as the stage
reported it). Each tile is matched against its top (row − 1) and left (column − 1) grid neighbours with
:func:`~em_platform.stitch.matching.match_neighbour`, the way the live pipeline matches processed tiles, and
:func:`~em_platform.stitch.solve_affine.solve_transforms` turns the matched point pairs into a
translation, rigid or affine transform per tile with the layout as the stage prior. The nominal overlap
and the expected offset of every pair come from the layout positions, so irregular layouts work.

**Search that cannot silently fail.** The fine search window follows the stage error model: a pair's
relative error is at most twice one reading's (``stage_error_px``, default half the overlap), so the
window is ``min(2·stage_error_px, the live matcher's default)``. When the fine search finds no peak, the
pair is registered coarsely over the whole overlap and beyond, up to that bound
(:func:`~em_platform.stitch.coarse.coarse_offset`, accepted on a peak test), then refined by the fine
matcher around the coarse place. Every pair that still finds nothing is reported with its reason.

**Missing and blank tiles.** A layout row whose file is missing or unreadable is skipped and reported
(:attr:`TileFolder.skipped`); the rest is stitched. Tiles of bare resin are detected
(:mod:`em_platform.stitch.blank`) and flagged, so they are not counted as tiles the images failed to place.

Memory stays bounded by the montage's width, not its size: tiles are read row by row, each is cut into
the edge strips its pairs need, and a row's strips are dropped once the row below has been matched.
Reading and matching run on a thread pool (tifffile and OpenCV release the GIL).

Dagster-free; bad input raises :class:`TileFolderError` naming the file, the line and the problem.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from em_platform.stitch.blank import BLANK_SCORE, texture_score
from em_platform.stitch.coarse import coarse_offset, refine_offset
from em_platform.stitch.grid import (
    NEIGHBOURS,
    OPPOSITE,
    Side,
    from_nominal,
    neighbour_of,
    nominal_step,
    to_nominal,
)
from em_platform.stitch.layout import Edge, PointEdge, TransformLayout
from em_platform.stitch.lens import LensModel
from em_platform.stitch.matching import EdgeStrip, Match, default_max_shift, edge_strip, match_neighbour
from em_platform.stitch.model_choice import Requested, solve_model

__all__ = [
    "LAYOUT_COLUMNS",
    "FolderTile",
    "MatchReport",
    "NeighbourPair",
    "PairMatch",
    "SkippedTile",
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
class SkippedTile:
    """A layout row that is not stitched: its file is missing or unreadable (``reason``)."""

    tile: str
    row: int
    column: int
    line: int
    reason: str


@dataclass(frozen=True)
class TileFolder:
    """A validated tile folder: its tiles in layout order, their dtype, the pixel size the TIFFs'
    resolution tags state (None when they state none), and the layout rows skipped."""

    folder: Path
    layout_csv: Path
    tiles: tuple[FolderTile, ...]
    dtype: np.dtype
    pixel_size_nm: float | None
    skipped: tuple[SkippedTile, ...] = ()

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

    bound_px: float = 0.0  # how far the coarse search may look from the expected place (2 × stage error)

    @property
    def depth(self) -> int:
        """How deep the two edge strips must be: overlap + search range (fine or coarse) + the rest."""
        across = self.tile.width if self.position == "left" else self.tile.height
        n_across = self.neighbour.width if self.position == "left" else self.neighbour.height
        wanted = self.overlap_px + max(self.max_shift_px, math.ceil(self.bound_px)) + 1
        return min(wanted, across, n_across)

    def unmatchable(self) -> str | None:
        """Why the layout rules out matching this pair, or None."""
        if self.overlap_px < MIN_MATCH_OVERLAP_PX:
            return f"the layout overlap is {self.overlap_px} px, too narrow to match"
        across = (lambda t: t.width) if self.position == "left" else (lambda t: t.height)
        if self.overlap_px + self.max_shift_px + 1 > min(across(self.tile), across(self.neighbour)):
            return f"the layout overlap is {self.overlap_px} px, more than a tile minus the search range"
        return None

    def edge(self, dX: float, dY: float, weight: float) -> Edge:
        """The solve's edge from a match measured from nominal (position(tile) − position(neighbour))."""
        shape = (self.neighbour.height, self.neighbour.width)
        dx, dy = from_nominal(dX, dY, shape, self.overlap_px, self.position)
        return Edge(self.tile.tile, self.neighbour.tile, dx, dy, weight)

    def points(self, m: Match) -> PointEdge:
        """The matched patch centres as the solve's point pairs (tile pixels, neighbour pixels)."""
        return PointEdge(
            self.tile.tile,
            self.neighbour.tile,
            np.column_stack([m.pX, m.pY]),
            np.column_stack([m.qX, m.qY]),
            float(m.quality),
        )


@dataclass(frozen=True)
class PairMatch:
    """One matched pair: the offset edge, its point pairs, and how it was found ("fine" or "coarse")."""

    pair: NeighbourPair
    edge: Edge
    points: PointEdge
    method: str


@dataclass(frozen=True)
class MatchReport:
    """The outcome of matching every neighbour pair: the matches for the solve, the pairs that gave none
    (with the reason: the layout leaves too little overlap, or no overlap was found in the pixels), and
    each tile's texture score (blank tiles score under :data:`BLANK_SCORE`)."""

    matches: tuple[PairMatch, ...]
    unmatched: tuple[tuple[NeighbourPair, str], ...]
    texture: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def edges(self) -> tuple[Edge, ...]:
        return tuple(m.edge for m in self.matches)

    @property
    def point_edges(self) -> list[PointEdge]:
        return [m.points for m in self.matches]

    @property
    def pairs(self) -> int:
        return len(self.matches) + len(self.unmatched)

    @property
    def blank(self) -> list[str]:
        """Tiles of bare resin: nothing to match, so not failures to place."""
        return sorted(t for t, score in self.texture.items() if score < BLANK_SCORE)

    def methods(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.matches:
            out[m.method] = out.get(m.method, 0) + 1
        return out


# ----------------------------------------------------------------------------------------------------
# Reading and validating the layout


def open_tile_folder(folder: str | os.PathLike, layout_csv: str | os.PathLike) -> TileFolder:
    """Read and validate ``layout_csv`` against the TIFFs in ``folder``; read each tile's shape and dtype
    from its header (no pixels are read). Raises :class:`TileFolderError` for any problem."""
    folder, layout_csv = Path(folder), Path(layout_csv)
    if not folder.is_dir():
        raise TileFolderError(f"{folder}: not a folder of tiles")
    rows = _read_layout(layout_csv, folder)
    tiles: list[FolderTile] = []
    dtypes: dict[np.dtype, str] = {}  # each dtype found: the first tile of it
    pixel_size, skipped = None, []
    for name, row, column, x, y, line in rows:
        if not (folder / name).is_file():
            skipped.append(SkippedTile(name, row, column, line, f"no file {folder / name}"))
            continue
        try:
            (height, width), dtype, size_nm = _tiff_header(folder / name, layout_csv, line)
        except TileFolderError as exc:
            skipped.append(SkippedTile(name, row, column, line, str(exc)))
            continue
        if not tiles:
            pixel_size = size_nm  # one camera per montage: the first tile's tags speak for all
        dtypes.setdefault(dtype, name)
        tiles.append(FolderTile(name, row, column, x, y, height, width, line))
    if not tiles:
        raise TileFolderError(
            f"{layout_csv}: none of its {len(rows)} tiles is a readable TIFF in {folder} "
            f"(first: {skipped[0].reason})"
        )
    if len(dtypes) > 1:
        examples = ", ".join(f"{name} is {dt}" for dt, name in dtypes.items())
        raise TileFolderError(f"{folder}: tiles must share one dtype to be fused, but {examples}")
    return TileFolder(folder, layout_csv, tuple(tiles), next(iter(dtypes)), pixel_size, tuple(skipped))


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
            out: list[tuple[str, int, int, float, float, int]] = []
            names: dict[str, int] = {}  # tile → its line
            cells: dict[tuple[int, int], tuple[str, int]] = {}  # (row, column) → (tile, line)
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
                if Path(name).name != name or name in (".", ".."):
                    raise TileFolderError(f"{where}: tile {name!r} is not a file name in {folder}")
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
            page = tif.pages.first
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


def neighbour_pairs(
    tiles: Iterable[FolderTile], max_shift_px: int | None = None, stage_error_px: float | None = None
) -> list[NeighbourPair]:
    """Every tile with its top (row − 1) and left (column − 1) grid neighbour, where that cell is in the
    layout. The nominal overlap is the neighbour's extent minus the layout step, so each pair gets its
    own. ``stage_error_px`` bounds one stage reading's error per axis (default: half the pair's overlap):
    the pair's offset is then within twice that of the layout's (the coarse search's bound), and the fine
    window is that or the live matcher's default, whichever is smaller (``max_shift_px`` overrides it);
    narrowed where the overlap is too thin to leave templates room."""
    by_cell = {(t.row, t.column): t for t in tiles}
    pairs = []
    for (row, column), tile in by_cell.items():
        for position in NEIGHBOURS:
            neighbour = by_cell.get(neighbour_of(row, column, position))
            if neighbour is None:
                continue
            step_x, step_y = tile.x - neighbour.x, tile.y - neighbour.y
            shape = (neighbour.height, neighbour.width)
            overlap = round(nominal_step(shape, 0, position) - (step_x if position == "left" else step_y))
            expected = to_nominal(step_x, step_y, shape, overlap, position)
            error = overlap / 2 if stage_error_px is None else float(stage_error_px)
            bound = 2 * max(0.0, error)
            if max_shift_px is not None:
                shift = int(max_shift_px)
            else:
                shift = min(default_max_shift(overlap), max(2, math.ceil(bound)))
            shift = max(1, min(shift, overlap - _MIN_TEMPLATE_PX))
            pairs.append(NeighbourPair(tile, neighbour, position, overlap, expected, shift, bound))
    return pairs


def match_tile_folder(
    folder: TileFolder,
    *,
    workers: int | None = None,
    max_shift_px: int | None = None,
    stage_error_px: float | None = None,
) -> MatchReport:
    """Match every tile of ``folder`` against its top and left grid neighbours on ``workers`` threads
    (default: one per core), with the fine window and coarse fallback of the stage error model
    (:func:`neighbour_pairs`). Rows are read one ahead of the row being matched; a row's strips are
    dropped when the next row has been matched, so memory grows with the montage's width only. A tile
    whose pixels cannot be read is reported in the unmatched pairs, and the rest goes on."""
    if max_shift_px is not None and max_shift_px < 1:
        raise TileFolderError(f"max_shift_px must be at least 1 px, got {max_shift_px}")
    if stage_error_px is not None and not stage_error_px >= 0:
        raise TileFolderError(f"stage_error_px must be 0 or more px, got {stage_error_px}")
    unmatched: list[tuple[NeighbourPair, str]] = []
    pairs = []
    for p in neighbour_pairs(folder.tiles, max_shift_px, stage_error_px):
        reason = p.unmatchable()
        if reason is None:
            pairs.append(p)
        else:
            unmatched.append((p, reason))
    # how deep each side of each tile must be cut, over all the pairs that use it
    sides: dict[str, dict[Side, int]] = {t.tile: {} for t in folder.tiles}
    for p in pairs:
        for name, side in ((p.tile.tile, p.position), (p.neighbour.tile, OPPOSITE[p.position])):
            sides[name][side] = max(sides[name].get(side, 0), p.depth)
    rows: dict[int, list[FolderTile]] = {}
    for t in folder.tiles:
        rows.setdefault(t.row, []).append(t)
    order = sorted(rows)
    by_row: dict[int, list[NeighbourPair]] = {}
    for p in pairs:
        by_row.setdefault(p.tile.row, []).append(p)

    matches: list[PairMatch] = []
    texture: dict[str, float] = {}
    strips: dict[str, dict[str, EdgeStrip] | str] = {}  # a tile's strips, or why it could not be read
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:

        def read_row(r: int) -> list[Future]:
            return [pool.submit(_read_strips, folder, t, sides[t.tile]) for t in rows[r]]

        pending = read_row(order[0])  # a layout lists at least one tile
        for i, r in enumerate(order):
            current = pending
            pending = read_row(order[i + 1]) if i + 1 < len(order) else []  # one row ahead
            for future in current:
                name, cut, score = future.result()
                strips[name] = cut
                if score is not None:
                    texture[name] = score
            jobs = []
            for p in by_row.get(r, []):
                a, b = strips[p.tile.tile], strips[p.neighbour.tile]
                if isinstance(a, str):
                    unmatched.append((p, a))
                    continue
                if isinstance(b, str):
                    unmatched.append((p, b))
                    continue
                jobs.append((p, pool.submit(_match_pair, p, a, b)))
            for p, job in jobs:
                found = job.result()
                if found is None:
                    unmatched.append((p, "no overlap found in the pixels"))
                else:
                    matches.append(found)
            for t in rows.get(order[i - 1], []) if i else []:
                strips.pop(t.tile, None)  # the row above is done with
    return MatchReport(tuple(matches), tuple(unmatched), texture)


def _read_strips(
    folder: TileFolder, tile: FolderTile, sides: Mapping[Side, int]
) -> tuple[str, dict[str, EdgeStrip] | str, float | None]:
    import tifffile

    path = folder.folder / tile.tile
    try:
        image = tifffile.imread(path)
    except Exception as exc:  # tifffile and its codecs raise many kinds on truncated or corrupt data
        return tile.tile, f"{path}: cannot read its pixels ({exc}); replace or remove the tile", None
    if image.shape != (tile.height, tile.width):
        return (
            tile.tile,
            f"{path}: pixels of shape {image.shape}, its header said {(tile.height, tile.width)}",
            None,
        )
    cut: dict[str, EdgeStrip] = {side: edge_strip(image, side, d, 0) for side, d in sides.items()}
    return tile.tile, cut, texture_score(image)


def _match_pair(
    pair: NeighbourPair, tile: Mapping[str, EdgeStrip], neighbour: Mapping[str, EdgeStrip]
) -> PairMatch | None:
    """The fine search around the layout's place; when it finds no peak, the coarse registration over the
    whole overlap and beyond (up to the stage error bound), refined by the fine search around it."""
    t, q = tile[pair.position], neighbour[OPPOSITE[pair.position]]
    m = match_neighbour(
        t, q, pair.position, pair.overlap_px, max_shift_px=pair.max_shift_px, expected=pair.expected
    )
    if m is not None:
        return _measured(pair, t, q, m, "fine")
    if pair.bound_px <= pair.max_shift_px:
        return None
    extent = pair.neighbour.width if pair.position == "left" else pair.neighbour.height
    coarse = coarse_offset(
        t.pixels, q.pixels, pair.position, pair.overlap_px, extent, bound_px=pair.bound_px,
        expected=pair.expected,
    )  # fmt: skip
    if coarse is None:
        return None
    refine = coarse.downsample + 2
    try:
        m = match_neighbour(
            t, q, pair.position, pair.overlap_px, max_shift_px=refine, expected=(coarse.dX, coarse.dY)
        )
    except ValueError:  # the coarse place leaves the strips too shallow for the fine search
        m = None
    if m is not None and max(abs(m.dX - coarse.dX), abs(m.dY - coarse.dY)) <= refine:
        return _measured(pair, t, q, m, "coarse")
    fine = refine_offset(t.pixels, q.pixels, pair.position, pair.overlap_px, expected=(coarse.dX, coarse.dY))
    if fine is None:
        return None
    dX, dY, _ = fine
    return PairMatch(pair, pair.edge(dX, dY, 1.0), _line_points(pair, dX, dY), "coarse")


def _measured(pair: NeighbourPair, t: EdgeStrip, q: EdgeStrip, m: Match, method: str) -> PairMatch:
    """The match, its mean offset measured once more over the whole shared strip (one long template: the
    patches' sub-pixel fits lean by up to 0.015 px on small tiles, which adds up along a row); the
    patches keep their spread about it (a tile's rotation)."""
    points = pair.points(m)
    whole = refine_offset(t.pixels, q.pixels, pair.position, pair.overlap_px, expected=(m.dX, m.dY), radius=2)
    if whole is None or max(abs(whole[0] - m.dX), abs(whole[1] - m.dY)) > 1.0:
        return PairMatch(pair, pair.edge(m.dX, m.dY, m.quality), points, method)
    shift = np.array([whole[0] - m.dX, whole[1] - m.dY])
    points = PointEdge(points.tile, points.neighbour, points.p, points.q + shift, points.weight)
    return PairMatch(pair, pair.edge(whole[0], whole[1], m.quality), points, method)


def _line_points(pair: NeighbourPair, dX: float, dY: float, n: int = 1) -> PointEdge:
    """The point pair at the middle of the overlap for an offset found as a whole (no patches): one pair,
    so it says nothing about the tiles' relative rotation (several with one offset would say "none")."""
    e = pair.edge(dX, dY, 1.0)  # position(tile) − position(neighbour)
    if pair.position == "left":
        shared = pair.neighbour.width - e.dx
        along = (np.arange(n) + 0.5) / n * pair.tile.height
        p = np.column_stack([np.full(n, shared / 2), along])
    else:
        shared = pair.neighbour.height - e.dy
        along = (np.arange(n) + 0.5) / n * pair.tile.width
        p = np.column_stack([along, np.full(n, shared / 2)])
    return PointEdge(pair.tile.tile, pair.neighbour.tile, p, p + (e.dx, e.dy), 1.0)


def solve_tile_folder(
    folder: TileFolder,
    report: MatchReport | None,
    model: Requested = "auto",
    *,
    lens: LensModel | None = None,
    stage_sigma_px: float | None = None,
    point_edges: Iterable[PointEdge[str]] | None = None,
) -> TransformLayout[str]:
    """Each tile's transform (tile px → the layout's frame) from the matched point pairs (or
    ``point_edges`` given, e.g. external matches), the layout as stage prior. With ``lens``, points are
    corrected first and the transforms act on undistorted tile pixels. ``report`` may be None when
    ``point_edges`` are given."""
    sizes = {(t.width, t.height) for t in folder.tiles}
    if model == "auto" and len(sizes) != 1:  # only a translation places tiles of several sizes
        model = "translation"
    if model != "translation" and len(sizes) != 1:
        raise TileFolderError(
            f"{folder.folder}: a {model} solve needs tiles of one size, found {sorted(sizes)}"
        )
    if point_edges is None:
        assert report is not None, "solve_tile_folder needs the match report or point_edges"
        point_edges = report.point_edges
    edges = list(point_edges)
    if lens is not None and not lens.is_identity():
        if sizes != {tuple(lens.tile_size)}:
            raise TileFolderError(
                f"the lens correction is for {lens.tile_size[0]}×{lens.tile_size[1]} px tiles, these are "
                f"{sorted(sizes)}"
            )
        edges = [
            PointEdge(e.tile, e.neighbour, lens.correct(e.p), lens.correct(e.q), e.weight) for e in edges
        ]
    width, height = sizes.pop() if len(sizes) == 1 else (2, 2)
    return solve_model(folder.stage(), edges, model, tile_size=(width, height), stage_sigma_px=stage_sigma_px)


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
