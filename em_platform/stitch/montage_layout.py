"""A montage's layout from its acquisition journal: the solve, its QC, and the file the fusion reads.

Live processing leaves each tile's matches (against its top and left neighbours) in the journal and its
processed pixels in ``processed_tiles.zarr`` (one array per tile, named by grid position). This module
turns them into solved tile positions (:mod:`em_platform.stitch.solve`), judged by
:mod:`em_platform.stitch.layout_qc`, and saves them as ``layout.json`` beside the tiles.

Prior: the stage positions when every tile has one and the pixel size is known (the montage's own from
``montage.complete``, else the scope's calibration), otherwise the nominal grid.

Models: ``translation`` (default: the neighbour offsets, as the live matcher measures them) or ``rigid`` /
``affine`` per tile from the matched patch centres (:mod:`em_platform.stitch.solve_affine`); fusion
places every tile by its translation, and the per-tile scale of the flexible models feeds the
scale-distortion figure. Dagster-free.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from em_platform.stitch.edges import match_edges, nominal_positions, stage_positions
from em_platform.stitch.grid import GridPosition, GridTile, array_name, neighbour_of
from em_platform.stitch.layout_qc import SEAM_PX, LayoutQC, layout_qc
from em_platform.stitch.solve import Layout, solve_translations
from em_platform.stitch.solve_affine import Model, PointEdge, solve_transforms

LAYOUT_FORMAT = "em_platform/montage-layout/1"

__all__ = ["LAYOUT_FORMAT", "MontageLayout", "array_name", "match_point_edges", "solve_montage"]


@dataclass(frozen=True)
class MontageLayout:
    montage_id: str
    model: Model
    prior: str  # "stage" | "nominal"
    pixel_size_nm: float | None
    shapes: dict[GridPosition, tuple[int, int]]
    prior_positions: dict[GridPosition, tuple[float, float]]
    layout: Layout
    qc: LayoutQC

    def to_dict(self) -> dict[str, Any]:
        lay = self.layout
        return {
            "format": LAYOUT_FORMAT,
            "montage_id": self.montage_id,
            "model": self.model,
            "prior": self.prior,
            "pixel_size_nm": self.pixel_size_nm,
            "frame": "top-left corners in pixels, x right, y down, in the prior's frame",
            "tiles": [
                {
                    "row": r,
                    "column": c,
                    "array": array_name(r, c),
                    "height": self.shapes[(r, c)][0],
                    "width": self.shapes[(r, c)][1],
                    "x": round(x, 3),
                    "y": round(y, 3),
                    "prior_x": round(self.prior_positions[(r, c)][0], 3),
                    "prior_y": round(self.prior_positions[(r, c)][1], 3),
                    "residual_px": round(lay.tile_residuals[(r, c)], 3),
                    "disconnected": (r, c) in set(lay.disconnected),
                }
                for (r, c), (x, y) in sorted(lay.positions.items())
            ],
            "edges": [
                {"tile": list(a), "neighbour": list(b), "residual_px": round(res, 3), "accepted": ok}
                for ok, items in ((True, lay.edge_residuals), (False, lay.rejected))
                for (a, b), res in sorted(items.items())
            ],
            "qc": self.qc.summary(),
        }


def solve_montage(
    montage_id: str,
    tiles: Iterable[GridTile],
    shapes: Mapping[GridPosition, tuple[int, int]],
    pixel_size_nm: float | None,
    *,
    stage_rotation_rad: float = 0.0,  # stage -> image axes: montage.complete's rotation_angle
    model: Model = "translation",
    seam_px: float = SEAM_PX,
) -> MontageLayout:
    """Solve the positions of the tiles in ``shapes`` (the processed ones) from the journal's matches."""
    tiles = [t for t in tiles if not t.is_reference and (t.row, t.column) in shapes]
    if not tiles:
        raise ValueError(f"montage {montage_id}: no processed tile to lay out")
    with_stage = all(t.stage_x_nm is not None and t.stage_y_nm is not None for t in tiles)
    if with_stage and pixel_size_nm:
        prior, positions = "stage", stage_positions(tiles, shapes, pixel_size_nm, stage_rotation_rad)
    else:
        prior, positions = "nominal", nominal_positions(tiles, shapes)
    tile_scale = 0.0
    if model == "translation":
        layout = solve_translations(positions, match_edges(tiles, shapes))
    else:
        sizes = {(w, h) for h, w in shapes.values()}
        if len(sizes) != 1:
            raise ValueError(
                f"montage {montage_id}: a {model} solve needs tiles of one size, found {sorted(sizes)}"
            )
        solved = solve_transforms(positions, match_point_edges(tiles), model, tile_size=sizes.pop())
        layout = solved.as_layout()
        tile_scale = max(solved.scale_distortion.values(), default=0.0)
    qc = layout_qc(layout, positions, seam_px=seam_px)
    if tile_scale > qc.scale_distortion:  # a tile's own scale counts as much as the montage's
        qc = dataclasses.replace(qc, scale_distortion=tile_scale)
    return MontageLayout(
        montage_id=montage_id,
        model=model,
        prior=prior,
        pixel_size_nm=pixel_size_nm,
        shapes=dict(shapes),
        prior_positions=positions,
        layout=layout,
        qc=qc,
    )


def match_point_edges(tiles: Iterable[GridTile]) -> list[PointEdge]:
    """The matched patch centres of every journal match: tile point (pX, pY) = neighbour point (qX, qY)."""
    out = []
    for t in tiles:
        for position, m in sorted(((t.results or {}).get("matches") or {}).items()):
            if not m or not all(m.get(k) for k in ("pX", "pY", "qX", "qY")):
                continue
            out.append(
                PointEdge(
                    (t.row, t.column),
                    neighbour_of(t.row, t.column, position),
                    np.column_stack([m["pX"], m["pY"]]),
                    np.column_stack([m["qX"], m["qY"]]),
                    float(m.get("quality", 1.0)),
                )
            )
    return out


def placed_tiles(layout_json: Mapping[str, Any]):
    """The fusion's input from a saved ``layout.json``: one PlacedTile per tile, named by its array."""
    from em_platform.stitch.fuse import PlacedTile

    if layout_json.get("format") != LAYOUT_FORMAT:
        raise ValueError(
            f"not a montage layout (format {layout_json.get('format')!r}, expected {LAYOUT_FORMAT})"
        )
    return [PlacedTile(t["array"], t["y"], t["x"], t["height"], t["width"]) for t in layout_json["tiles"]]


def dumps(layout: MontageLayout) -> bytes:
    return json.dumps(layout.to_dict(), indent=1).encode()
