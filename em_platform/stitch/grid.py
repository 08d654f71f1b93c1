"""Tile-grid geometry of a montage: neighbours, the nominal step between them, and tile array names.

A montage is a raster of tiles named by their grid position ``(row, column)``. A tile is matched
against the two neighbours acquired before it, its *top* (row − 1) and *left* (column − 1) one: the
tile's edge strip on that side against the neighbour's strip on the opposite side. Nominally the tile
sits the neighbour's width (left) or height (top) minus the overlap beyond the neighbour — the *nominal
step*. Matches are measured from that nominal place (:mod:`em_platform.stitch.matching`); the whole
offset ``position(tile) − position(neighbour)`` is the nominal step plus the match.

Positions are top-left corners in pixels, x to the right, y down. This module is the one home of these
rules: live acquisition (``em_platform.tem``), the montage solve and the tile-folder stitch use it.
Dagster-free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "NEIGHBOURS",
    "OPPOSITE",
    "GridPosition",
    "GridTile",
    "Position",
    "Shape",
    "Side",
    "array_name",
    "from_nominal",
    "matched_against",
    "neighbour_of",
    "nominal_grid_position",
    "nominal_step",
    "stage_to_image",
    "to_nominal",
]

GridPosition = tuple[int, int]  # (row, column)
Shape = tuple[int, int]  # (height, width) px
Position = Literal["top", "left"]
Side = Literal["top", "bottom", "left", "right"]

NEIGHBOURS: Mapping[Position, GridPosition] = {"top": (-1, 0), "left": (0, -1)}
"""The neighbours a tile is matched against, as (row, column) steps from the tile."""

OPPOSITE: Mapping[str, Side] = {"top": "bottom", "left": "right", "bottom": "top", "right": "left"}
"""The neighbour's side that meets a tile's side."""


@dataclass(frozen=True)
class GridTile:
    """What stitching reads of an acquired tile: one per grid position, with the matches live processing
    found against its top and left neighbours (``matches["top"|"left"]``: TEM_comms ``Match`` fields).
    Acquisition turns its journal rows into these (:mod:`em_platform.tem.stitch_inputs`)."""

    tile_id: str
    row: int
    column: int
    overlap: int = 0  # px: what the tile's ``tile.raw`` said and what it was matched with
    stage_x_nm: float | None = None  # the field of view's centre (TEM_comms), None when the scope sends none
    stage_y_nm: float | None = None
    matches: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def neighbour_of(row: int, column: int, position: str) -> GridPosition:
    """Grid position of the tile's ``position`` ("top"/"left") neighbour."""
    dr, dc = NEIGHBOURS[position]  # type: ignore[index]
    return row + dr, column + dc


def matched_against(row: int, column: int) -> tuple[tuple[GridPosition, Position], ...]:
    """The tiles matched against this one, each with the position this tile has for it: the tile below
    (this is its top neighbour) and the tile to the right (this is its left neighbour)."""
    return ((row + 1, column), "top"), ((row, column + 1), "left")


def array_name(row: int, column: int) -> str:
    """The processed tile's array in ``processed_tiles.zarr`` (what live processing names it)."""
    return f"r{row:03d}_c{column:03d}"


def nominal_step(neighbour_shape: Shape, overlap: int, position: str) -> int:
    """How far beyond its ``position`` neighbour a tile nominally sits: the neighbour's width (left) or
    height (top) minus the overlap, px."""
    height, width = neighbour_shape
    return (width if position == "left" else height) - int(overlap)


def from_nominal(
    dx: float, dy: float, neighbour_shape: Shape, overlap: int, position: str
) -> tuple[float, float]:
    """An offset measured from the nominal place -> the whole ``position(tile) − position(neighbour)``."""
    step = nominal_step(neighbour_shape, overlap, position)
    return (dx + step, dy) if position == "left" else (dx, dy + step)


def to_nominal(
    dx: float, dy: float, neighbour_shape: Shape, overlap: int, position: str
) -> tuple[float, float]:
    """A whole offset ``position(tile) − position(neighbour)`` -> measured from the nominal place."""
    step = nominal_step(neighbour_shape, overlap, position)
    return (dx - step, dy) if position == "left" else (dx, dy - step)


def nominal_grid_position(row: int, column: int, shape: Shape, overlap: int) -> tuple[float, float]:
    """Top-left corner (x, y) px of a tile on the nominal grid of tiles of one ``shape``."""
    height, width = shape
    return float(column * (width - overlap)), float(row * (height - overlap))


def stage_to_image(
    dx_nm: float, dy_nm: float, pixel_size_nm: float, rotation_rad: float = 0.0
) -> tuple[float, float]:
    """A displacement of the stage (nm) as a displacement in the image (px, x right, y down).

    TEM_comms ``montage.complete`` gives ``rotation_angle`` θ, the rotation that lines the image axes up
    with the stage's: a displacement ``p`` px in the image is ``R(θ)·p·pixel_size`` nm on the stage with
    ``R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]]``, so the image displacement is ``R(−θ)·d / pixel_size``.
    """
    c, s = math.cos(rotation_rad), math.sin(rotation_rad)
    return (c * dx_nm + s * dy_nm) / pixel_size_nm, (-s * dx_nm + c * dy_nm) / pixel_size_nm
