"""Montage QC of a solved layout, in the spirit of asap-modules' montage QC: what a person checks first.

* **Disconnected tiles**: no accepted match ties them to the montage; they sit where the stage put them.
* **Seams**: accepted edges whose solved offset still disagrees with the measured one by ``seam_px`` (4 px,
  asap-modules' default residual threshold) or more: a visible step in the fused image.
* **Scale distortion**: the solved montage against the stage grid. A straight-line fit per axis of solved
  positions on stage positions has slope 1 when the pixel size is right and the solve is sound; a slope
  off by 1 % puts a 5000-px tile 50 px off at the far side of a 10-tile row. The fit's standard error
  (the stage's readout error over the montage's extent) says how well a montage can tell: a 2 × 2
  montage cannot measure its scale to 0.5 %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic

import numpy as np

from em_platform.stitch.layout import Layout, TileId

SEAM_PX = 4.0

__all__ = ["SEAM_PX", "LayoutQC", "layout_qc"]


@dataclass(frozen=True)
class LayoutQC(Generic[TileId]):
    tiles: int
    edges: int  # accepted
    rejected: int
    disconnected: list[TileId]
    seams: list[tuple[TileId, TileId, float]]  # (tile, neighbour, residual px), worst first
    rms_residual_px: float
    max_residual_px: float
    scale: tuple[float, float]  # (x, y) slope of solved on stage positions; 1.0 when there is nothing to fit
    scale_distortion: float  # max |scale − 1| over both axes
    scale_uncertainty: float = math.inf  # standard error of the scale fit (inf: the montage cannot tell)

    def summary(self) -> dict[str, float | int | None]:
        return {
            "tiles": self.tiles,
            "edges": self.edges,
            "rejected_edges": self.rejected,
            "disconnected_tiles": len(self.disconnected),
            "seams": len(self.seams),
            "rms_residual_px": round(self.rms_residual_px, 3),
            "max_residual_px": round(self.max_residual_px, 3),
            "scale_x": round(self.scale[0], 5),
            "scale_y": round(self.scale[1], 5),
            "scale_distortion": round(self.scale_distortion, 5),
            "scale_uncertainty": round(self.scale_uncertainty, 5)
            if math.isfinite(self.scale_uncertainty)
            else None,
        }

    def scale_ok(self, limit: float, sigmas: float = 3.0) -> bool:
        """Scale within ``limit``, or not distinguishable from it given how well the montage measures it."""
        return self.scale_distortion <= limit + sigmas * self.scale_uncertainty


def _slope(stage: np.ndarray, solved: np.ndarray) -> tuple[float, float | None]:
    """Least-squares slope of solved on stage coordinates and its standard error; ``(1.0, None)`` when the
    axis has no extent to fit (one column), an infinite error when there are too few tiles to estimate it."""
    s = stage - stage.mean()
    denom = float(s @ s)
    if denom < 1e-9:
        return 1.0, None
    slope = float(s @ (solved - solved.mean())) / denom
    if len(stage) <= 2:
        return slope, math.inf
    resid = (solved - solved.mean()) - slope * s
    return slope, math.sqrt(float(resid @ resid) / (len(stage) - 2) / denom)


def layout_qc(
    layout: Layout[TileId], stage: Mapping[TileId, tuple[float, float]], *, seam_px: float = SEAM_PX
) -> LayoutQC[TileId]:
    """QC figures of ``layout`` solved from the stage prior ``stage`` (px, the same frame)."""
    residuals = layout.edge_residuals
    seams = sorted(((a, b, r) for (a, b), r in residuals.items() if r >= seam_px), key=lambda e: -e[2])
    connected = [t for t in layout.positions if t in stage and t not in set(layout.disconnected)]
    if len(connected) >= 2:
        st = np.array([stage[t] for t in connected], dtype=float)
        so = np.array([layout.positions[t] for t in connected], dtype=float)
        (sx, ex), (sy, ey) = _slope(st[:, 0], so[:, 0]), _slope(st[:, 1], so[:, 1])
        errors = [e for e in (ex, ey) if e is not None]
        scale, uncertainty = (sx, sy), max(errors, default=0.0)
    else:
        scale, uncertainty = (1.0, 1.0), math.inf
    values = np.array(list(residuals.values()), dtype=float)
    return LayoutQC(
        tiles=len(layout.positions),
        edges=len(residuals),
        rejected=len(layout.rejected),
        disconnected=list(layout.disconnected),
        seams=seams,
        rms_residual_px=layout.rms_residual(),
        max_residual_px=float(values.max()) if values.size else 0.0,
        scale=scale,
        scale_distortion=max(abs(scale[0] - 1.0), abs(scale[1] - 1.0)),
        scale_uncertainty=uncertainty,
    )
