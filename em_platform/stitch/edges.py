"""From acquired tiles to the montage solve: neighbour matches as solver edges, stage readings as prior
positions, and solved positions against a simulator's ground truth.

Tiles (:class:`~em_platform.stitch.grid.GridTile`, one per grid position) are named by their grid position
``(row, column)``, which is how matches name their neighbours. Positions are top-left corners in pixels,
x to the right and y down.

A tile holds the matches live processing found against its top and left neighbours
(``matches["top"|"left"]``: TEM_comms ``Match`` fields). ``dX, dY`` there are measured from
the *nominal* place (:mod:`em_platform.stitch.matching`): a left neighbour's width minus the overlap to the
right of it, a top neighbour's height minus the overlap below it. The solver wants the whole offset
``position(tile) − position(neighbour)``, so the nominal step is added back here, with the tile's own
overlap (what its ``tile.raw`` said and what it was matched with) and the neighbour's shape.

Dagster-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from em_platform.stitch.grid import (
    NEIGHBOURS,
    GridPosition,
    GridTile,
    Shape,
    from_nominal,
    neighbour_of,
    nominal_grid_position,
    stage_to_image,
)
from em_platform.stitch.layout import Edge

if TYPE_CHECKING:
    from em_platform.simulation.scope import GroundTruth

__all__ = [
    "GridPosition",
    "TruthComparison",
    "compare_with_truth",
    "match_edges",
    "nominal_positions",
    "stage_positions",
    "true_positions",
]


def _one_per_position(tiles: Iterable[GridTile]) -> list[GridTile]:
    """The tiles, checked to hold one per grid position (a re-taken tile is the take that counts)."""
    seen: dict[GridPosition, str] = {}
    out = list(tiles)
    for t in out:
        first = seen.setdefault((t.row, t.column), t.tile_id)
        if first != t.tile_id:
            raise ValueError(
                f"tiles {first} and {t.tile_id} are both at row {t.row}, column {t.column}: pass one tile "
                "per grid position (the take that counts)"
            )
    return out


def match_edges(tiles: Iterable[GridTile], shapes: Mapping[GridPosition, Shape]) -> list[Edge]:
    """Every match of the tiles as an :class:`Edge` (``position(tile) −
    position(neighbour)``, px), weighted by its quality (the fraction of strip patches that agreed).

    ``shapes`` are the processed tiles' (height, width) by grid position: a neighbour's width (height)
    sets the nominal step to its right (below it). A tile without matches (not processed, failed) has no
    edges; a match that names a neighbour without a shape, or lacks its offsets, is an error.
    """
    edges = []
    for t in _one_per_position(tiles):
        for position, m in sorted(t.matches.items()):
            where = f"tile {t.tile_id} (row {t.row}, column {t.column}), {position} match"
            if position not in NEIGHBOURS:
                raise ValueError(f"{where}: position must be 'top' or 'left'")
            if not isinstance(m, Mapping) or not {"dX", "dY"} <= m.keys():
                raise ValueError(f"{where}: no dX/dY in {m!r}; these are not matches")
            expected = neighbour_of(t.row, t.column, position)
            neighbour = (int(m.get("row", expected[0])), int(m.get("column", expected[1])))
            if neighbour != expected:
                raise ValueError(f"{where}: names row {neighbour[0]}, column {neighbour[1]} as the neighbour")
            if neighbour not in shapes:
                raise KeyError(
                    f"{where}: no shape for the neighbour at row {neighbour[0]}, column {neighbour[1]}"
                )
            dx, dy = from_nominal(float(m["dX"]), float(m["dY"]), shapes[neighbour], t.overlap, position)
            edges.append(Edge((t.row, t.column), neighbour, dx, dy, float(m.get("quality", 1.0))))
    return edges


def stage_positions(
    tiles: Iterable[GridTile],
    shapes: Mapping[GridPosition, Shape],
    pixel_size_nm: float,
    rotation_rad: float = 0.0,
) -> dict[GridPosition, tuple[float, float]]:
    """Where the stage says each tile is: top-left corners (px) of the tiles in ``shapes``.

    A stage position is the field of view's centre in nm (TEM_comms), turned into image axes by
    ``rotation_rad`` (``montage.complete``'s ``rotation_angle``, see :func:`~em_platform.stitch.grid.stage_to_image`),
    so half the tile is taken off in the image frame.
    Tiles without a shape (never processed: nothing to place) are left out; a tile with a shape but no
    stage position is an error (use :func:`nominal_positions` for a scope that sends none).
    """
    if not pixel_size_nm or pixel_size_nm <= 0:
        raise ValueError(
            f"pixel_size_nm must be positive to turn stage positions into pixels, got {pixel_size_nm!r}"
        )
    out = {}
    for t in _one_per_position(tiles):
        key = (t.row, t.column)
        if key not in shapes:
            continue
        if t.stage_x_nm is None or t.stage_y_nm is None:
            raise ValueError(
                f"tile {t.tile_id} (row {t.row}, column {t.column}) has no stage position; place the montage "
                "on the nominal grid (nominal_positions) instead"
            )
        height, width = shapes[key]
        x, y = stage_to_image(t.stage_x_nm, t.stage_y_nm, pixel_size_nm, rotation_rad)
        out[key] = (x - width / 2.0, y - height / 2.0)
    return out


def nominal_positions(
    tiles: Iterable[GridTile], shapes: Mapping[GridPosition, Shape]
) -> dict[GridPosition, tuple[float, float]]:
    """The nominal grid as a prior (px): column × (width − overlap), row × (height − overlap) of each tile
    in ``shapes``, for tiles of one size. A montage without stage positions is solved from it."""
    out = {}
    for t in _one_per_position(tiles):
        key = (t.row, t.column)
        if key in shapes:
            out[key] = nominal_grid_position(t.row, t.column, shapes[key], t.overlap)
    return out


# ----------------------------------------------------------------------------------------------------
# Against the ground truth of a simulated montage


def true_positions(truth: GroundTruth) -> dict[GridPosition, tuple[float, float]]:
    """The acquired tiles' true top-left corners (px, specimen plane) from ``scope-sim``'s ground truth."""
    return {(t.row, t.column): (t.position_px[0], t.position_px[1]) for t in truth.tiles if t.acquired}


@dataclass(frozen=True)
class TruthComparison:
    """Solved positions against the truth, the common translation removed (no match can observe it)."""

    errors: dict[GridPosition, tuple[float, float]]  # solved − true − mean(solved − true), px
    rms_px: float
    max_px: float

    def worst(self, n: int = 5) -> list[tuple[GridPosition, float]]:
        """The ``n`` tiles furthest from the truth, with their distance (px)."""
        dist = {k: float(np.hypot(*e)) for k, e in self.errors.items()}
        return sorted(dist.items(), key=lambda kv: -kv[1])[:n]


def compare_with_truth(
    positions: Mapping[GridPosition, tuple[float, float]],
    truth: Mapping[GridPosition, tuple[float, float]],
) -> TruthComparison:
    """Compare solved (or stage) ``positions`` with the ``truth`` over the tiles both have.

    The two frames may differ by a translation (the stage's origin is not the specimen plane's); it is
    removed before the errors are measured. Nothing in common is an error.
    """
    common = [k for k in positions if k in truth]
    if not common:
        raise ValueError("no tile has both a solved and a true position: compare positions of one montage")
    diff = np.array([np.subtract(positions[k], truth[k]) for k in common], np.float64)
    diff -= diff.mean(axis=0)
    dist = np.hypot(diff[:, 0], diff[:, 1])
    return TruthComparison(
        errors={k: (float(d[0]), float(d[1])) for k, d in zip(common, diff, strict=True)},
        rms_px=float(np.sqrt(np.mean(dist**2))),
        max_px=float(dist.max()),
    )
