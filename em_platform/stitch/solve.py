"""Global montage solve from neighbour offsets: where every tile really sits (translation model).

One sparse least-squares problem: each accepted match says ``p_tile − p_neighbour = measured offset``;
each tile's stage position, in the image frame the matches measure and weighted by the stage's measured
error, is a prior that fixes the free translation and places tiles no match reaches. Bad matches are
rejected edge by edge without cascading and reported, never silently averaged in. This is
:func:`~em_platform.stitch.solve_affine.solve_transforms` with one point pair per edge and ``A ≡ I``
(its docstring has the details); the journal's translation matches and simple callers use it.

Dagster-free; the montage assets and ``em-platform stitch`` both call :func:`solve_translations`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from em_platform.stitch.layout import Edge, Layout, PointEdge, TileId
from em_platform.stitch.solve_affine import solve_transforms

__all__ = ["solve_translations"]


def solve_translations(
    stage: Mapping[TileId, tuple[float, float]],
    edges: Iterable[Edge[TileId]],
    *,
    stage_weight: float | None = None,
    stage_sigma_px: float | None = None,
    fit_stage_frame: bool = True,
    outlier_px: float = 3.0,
    mad_factor: float = 6.0,
    max_iterations: int = 40,
) -> Layout[TileId]:
    """Solve tile positions from ``edges`` anchored softly at the ``stage`` positions (px).

    ``stage_weight`` fixes the prior's weight against one match (default: measured from the scatter of
    the matches around the stage's own frame). Edges naming a tile not in ``stage`` raise ``KeyError``;
    an edge given twice keeps both offsets (two pairs of one edge).
    """
    merged: dict[tuple[TileId, TileId], list[Edge[TileId]]] = {}
    for e in edges:
        merged.setdefault((e.tile, e.neighbour), []).append(e)
    point_edges = [  # an edge given twice keeps both offsets, as two pairs of one edge
        PointEdge(
            tile,
            neighbour,
            np.zeros((len(group), 2)),
            np.array([(e.dx, e.dy) for e in group], np.float64),
            float(np.mean([e.weight for e in group])),
        )
        for (tile, neighbour), group in merged.items()
    ]
    solved = solve_transforms(
        stage,
        point_edges,
        "translation",
        tile_size=(2.0, 2.0),
        stage_weight=stage_weight,
        stage_sigma_px=stage_sigma_px,
        fit_stage_frame=fit_stage_frame,
        outlier_px=outlier_px,
        mad_factor=mad_factor,
        max_iterations=max_iterations,
    )
    return solved.as_layout()
