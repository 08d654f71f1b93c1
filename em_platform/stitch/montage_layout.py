"""A montage's layout from its acquired tiles: the solve, its QC, and the file the fusion reads.

Live processing leaves each tile's matches (against its top and left neighbours) in the journal and its
processed pixels in ``processed_tiles.zarr`` (one array per tile, named by grid position). This module
turns them into solved tile positions (:mod:`em_platform.stitch.solve`), judged by
:mod:`em_platform.stitch.layout_qc`, and saves them as ``layout.json`` beside the tiles.

Prior: the stage positions when every tile has one and the pixel size is known (the montage's own from
``montage.complete``, else the scope's calibration), otherwise the nominal grid.

Models: ``translation`` (default: the neighbour offsets, as the live matcher measures them) or ``rigid`` /
``affine`` per tile from the matched patch centres (:mod:`em_platform.stitch.solve_affine`). Every tile's
full 2×3 transform is saved (``transform``, tile px → montage px) beside its ``x``/``y`` (the top-left
corner that keeps the tile centre where the transform puts it, for readers that place by translation);
:func:`placed_tiles` hands the transforms to the fusion, which resamples when one is not a pure
translation. The per-tile scale of the flexible models feeds the scale-distortion figure.

Lens: a scope's lens correction (:mod:`em_platform.stitch.lens`), estimated from one montage's matched
point pairs by :func:`estimate_montage_lens`, is applied to later montages by ``solve_montage(lens=…)``:
their point pairs are corrected before the solve (so the transforms act on undistorted tile pixels) and
the model is saved in ``layout.json`` for the fusion (:func:`layout_lens`).

Seams: :func:`layout_seams` measures a saved layout's seams on the tiles' pixels (the ``montage`` asset's
blocking ``fused_seams`` check). Dagster-free.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from em_platform.stitch.edges import match_edges, nominal_positions, stage_positions
from em_platform.stitch.grid import GridPosition, GridTile, array_name, neighbour_of
from em_platform.stitch.layout import Layout, Model, PointEdge
from em_platform.stitch.layout_qc import SEAM_PX, LayoutQC, layout_qc
from em_platform.stitch.lens import LensFit, LensModel, estimate_lens
from em_platform.stitch.model_choice import Requested, solve_model
from em_platform.stitch.seams import SeamMeasure, measure_source_seams
from em_platform.stitch.solve import solve_translations

if TYPE_CHECKING:  # the fusion (dask) for the type checker; at run time placed_tiles imports it on first use
    from em_platform.stitch.fuse import Rows2x3

# ``transform`` and ``lens`` were added to version 1: readers of x/y read it as before
LAYOUT_FORMAT = "em_platform/montage-layout/1"

__all__ = [
    "LAYOUT_FORMAT",
    "MontageLayout",
    "array_name",
    "estimate_montage_lens",
    "layout_lens",
    "layout_seams",
    "match_point_edges",
    "placed_tiles",
    "scope_point_edges",
    "solve_montage",
]


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
    # 2×3 [A | t] per tile: montage (x, y) = A @ tile (x, y) + t, tile pixels undistorted by ``lens`` if any
    transforms: dict[GridPosition, np.ndarray] = dataclasses.field(default_factory=dict)
    lens: LensModel | None = None

    def transform(self, tile: GridPosition) -> np.ndarray:
        """The tile's 2×3 transform (a pure translation to its ``x``/``y`` when none was solved)."""
        m = self.transforms.get(tile)
        if m is None:
            x, y = self.layout.positions[tile]
            return np.array([[1.0, 0.0, x], [0.0, 1.0, y]])
        return np.asarray(m, np.float64)

    def is_translation(self, tolerance: float = 1e-9) -> bool:
        """No lens and every linear part the identity: the fusion pastes tiles instead of resampling."""
        return self.lens is None and all(
            np.abs(self.transform(t)[:, :2] - np.eye(2)).max() <= tolerance for t in self.layout.positions
        )

    def to_dict(self) -> dict[str, Any]:
        lay = self.layout
        return {
            "format": LAYOUT_FORMAT,
            "montage_id": self.montage_id,
            "model": self.model,
            "prior": self.prior,
            "pixel_size_nm": self.pixel_size_nm,
            "frame": "top-left corners in pixels, x right, y down, in the prior's frame",
            "transform": "per tile [[a, b, tx], [c, d, ty]]: montage (x, y) = [[a, b], [c, d]] @ tile (x, y) "
            "+ (tx, ty), tile pixels corrected by the lens first when one is given; x, y keep the tile "
            "centre where the transform puts it",
            "lens": None if self.lens is None else self.lens.to_dict(),
            "tiles": [
                {
                    "row": r,
                    "column": c,
                    "array": array_name(r, c),
                    "height": self.shapes[(r, c)][0],
                    "width": self.shapes[(r, c)][1],
                    "x": round(x, 3),
                    "y": round(y, 3),
                    "transform": _rounded(self.transform((r, c))),
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
    model: Requested = "auto",
    seam_px: float = SEAM_PX,
    lens: LensModel | None = None,
    point_edges: Iterable[PointEdge] | None = None,
) -> MontageLayout:
    """Solve the positions of the tiles in ``shapes`` (the processed ones) from their matches, or
    from ``point_edges`` where the scope provides its own (keyed by grid position: :func:`scope_point_edges`).

    With a ``lens`` correction (not the identity) the matched patch centres are corrected first and solved
    as point pairs for every model; the lens must be for tiles of the montage's size (ValueError)."""
    tiles = [t for t in tiles if (t.row, t.column) in shapes]
    if not tiles:
        raise ValueError(f"montage {montage_id}: no processed tile to lay out")
    if lens is not None and lens.is_identity():
        lens = None
    sizes = {(w, h) for h, w in shapes.values()}
    if lens is not None and sizes != {tuple(lens.tile_size)}:
        raise ValueError(
            f"montage {montage_id}: the lens correction is for {lens.tile_size[0]}×{lens.tile_size[1]} px "
            f"tiles, these are {sorted(sizes)}; estimate one for this camera setting or lay out without it"
        )
    with_stage = all(t.stage_x_nm is not None and t.stage_y_nm is not None for t in tiles)
    if with_stage and pixel_size_nm:
        prior, positions = "stage", stage_positions(tiles, shapes, pixel_size_nm, stage_rotation_rad)
    else:
        prior, positions = "nominal", nominal_positions(tiles, shapes)
    tile_scale = 0.0
    transforms: dict[GridPosition, np.ndarray] = {}
    if model == "auto" and len(sizes) != 1:  # only a translation places tiles of several sizes
        model = "translation"
    if model == "translation" and lens is None and point_edges is None:
        layout = solve_translations(positions, match_edges(tiles, shapes))
    else:
        if len(sizes) != 1:
            raise ValueError(
                f"montage {montage_id}: a {model} solve needs tiles of one size, found {sorted(sizes)}"
            )
        edges = (
            match_point_edges(tiles)
            if point_edges is None
            else [e for e in point_edges if e.tile in positions and e.neighbour in positions]
        )
        if lens is not None:
            edges = [
                PointEdge(e.tile, e.neighbour, lens.correct(e.p), lens.correct(e.q), e.weight) for e in edges
            ]
        solved = solve_model(positions, edges, model, tile_size=next(iter(sizes)))
        model = solved.model  # auto: the model the matches chose
        layout = solved.as_layout()
        transforms = {k: np.asarray(m, np.float64) for k, m in solved.transforms.items()}
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
        transforms=transforms,
        lens=lens,
    )


def estimate_montage_lens(
    tiles: Iterable[GridTile], shapes: Mapping[GridPosition, tuple[int, int]], *, order: int | str = "auto"
) -> LensFit:
    """The scope's lens correction from one montage's matches (the matched patch centres of the
    processed tiles in ``shapes``, which must all have one size): :func:`~em_platform.stitch.lens.estimate_lens`.
    Best from a calibration montage with plenty of texture in every overlap; raises ValueError when there
    are too few point pairs."""
    tiles = [t for t in tiles if (t.row, t.column) in shapes]
    sizes = {(w, h) for h, w in shapes.values()}
    if len(sizes) != 1:
        raise ValueError(f"a lens correction needs tiles of one size, found {sorted(sizes)}")
    edges = [e for e in match_point_edges(tiles) if e.neighbour in shapes]
    return estimate_lens(edges, next(iter(sizes)), order=order)


def _rounded(m: np.ndarray) -> list[list[float]]:
    """A 2×3 transform for JSON: the linear part to 1e-9 (a nanopixel over a 10k-px tile), t to 1e-4 px."""
    return [[round(float(v), 9 if j < 2 else 4) for j, v in enumerate(row)] for row in np.asarray(m)]


def match_point_edges(tiles: Iterable[GridTile]) -> list[PointEdge]:
    """The matched patch centres of every match of the tiles: tile point (pX, pY) = neighbour point (qX, qY)."""
    out = []
    for t in tiles:
        for position, m in sorted(t.matches.items()):
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


def scope_point_edges(edges: Iterable[PointEdge], tiles: Iterable[GridTile]) -> list[PointEdge]:
    """A scope's own point matches (render ids = the journal's tile ids) keyed by grid position, as
    :func:`solve_montage` takes them; raises ValueError when none names two of the montage's tiles."""
    where = {t.tile_id: (t.row, t.column) for t in tiles}
    edges = list(edges)
    out = [
        PointEdge(where[e.tile], where[e.neighbour], e.p, e.q, e.weight)
        for e in edges
        if e.tile in where and e.neighbour in where
    ]
    if not out:
        names = sorted({str(e.tile) for e in edges})[:3]
        raise ValueError(
            f"none of the {len(edges)} point matches names two tiles of this montage (their ids start "
            f"{names}; the journal's tile ids are e.g. {sorted(where)[:3]})"
        )
    return out


def _check_format(layout_json: Mapping[str, Any]) -> None:
    if layout_json.get("format") != LAYOUT_FORMAT:
        raise ValueError(
            f"not a montage layout (format {layout_json.get('format')!r}, expected {LAYOUT_FORMAT})"
        )


def placed_tiles(layout_json: Mapping[str, Any]):
    """The fusion's input from a saved ``layout.json``: one PlacedTile per tile, named by its array, with
    its full transform when the layout has one (a layout written before transforms were saved places
    tiles by ``x``/``y``)."""
    from em_platform.stitch.fuse import PlacedTile

    _check_format(layout_json)
    out = []
    for t in layout_json["tiles"]:
        m = t.get("transform")
        # layout.json's transform is 2×3 (write side: layout_json)
        transform = None if m is None else cast("Rows2x3", tuple(tuple(float(v) for v in row) for row in m))
        out.append(PlacedTile(t["array"], t["y"], t["x"], t["height"], t["width"], transform))
    return out


def layout_lens(layout_json: Mapping[str, Any]) -> LensModel | None:
    """The lens correction a saved ``layout.json`` was solved with (the fusion must apply it), or None."""
    _check_format(layout_json)
    doc = layout_json.get("lens")
    return None if doc is None else LensModel.from_dict(doc)


def layout_seams(
    layout_json: Mapping[str, Any],
    source: Any,
    *,
    exclude: Iterable[GridPosition] = (),
    client: Any = None,
) -> list[SeamMeasure]:
    """Seams of a saved ``layout.json`` on its tiles' pixels (:mod:`em_platform.stitch.seams`): every matched
    neighbour pair (edges accepted and rejected) of tiles not in ``exclude`` (e.g. tiles QC failed, placed
    by the stage), each tile resampled by its solved transform and the layout's lens. A tear the solve's
    residuals cannot see (a block hanging on one wrong match, the rest of its edges rejected or unmatched)
    shows here as seams pixels wide. ``source`` holds the tiles by array name (``processed_tiles.zarr``);
    the measures name tiles by array name too. Translation layouts are measured at their solved (sub-pixel)
    positions: the fusion's rounding to whole pixels (≤ ½ px per tile, by design) is not counted."""
    _check_format(layout_json)
    skip = {tuple(c) for c in exclude}
    placed = {p.tile_id: p for p in placed_tiles(layout_json)}
    transforms = {name: p.matrix() for name, p in placed.items()}
    shapes = {name: (p.height, p.width) for name, p in placed.items()}
    pairs = sorted(
        {
            (array_name(*e["tile"]), array_name(*e["neighbour"]))
            for e in layout_json.get("edges", [])
            if tuple(e["tile"]) not in skip and tuple(e["neighbour"]) not in skip
        }
    )
    pairs = [(a, b) for a, b in pairs if a in placed and b in placed]
    return measure_source_seams(
        pairs, transforms, source, shapes, lens=layout_lens(layout_json), client=client
    )


def dumps(layout: MontageLayout) -> bytes:
    return json.dumps(layout.to_dict(), indent=1).encode()
