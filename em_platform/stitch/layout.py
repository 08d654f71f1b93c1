"""A montage's solved layout and the evidence behind it: the types the solvers share and return.

Dagster-free; :mod:`em_platform.stitch.solve` (translations) and :mod:`em_platform.stitch.solve_affine`
(per-tile transforms, whose :meth:`~em_platform.stitch.solve_affine.TransformLayout.as_layout` gives one) fill it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TileId = Hashable


@dataclass(frozen=True)
class Edge:
    """A measured offset between two tiles: ``position(tile) − position(neighbour) = (dx, dy)`` in px."""

    tile: TileId
    neighbour: TileId
    dx: float
    dy: float
    weight: float = 1.0  # e.g. the match quality


@dataclass
class Layout:
    """Solved top-left corners (px, the stage frame) with the evidence for them."""

    positions: dict[TileId, tuple[float, float]]
    edge_residuals: dict[tuple[TileId, TileId], float]  # accepted edges: |solved − measured| (px)
    rejected: dict[tuple[TileId, TileId], float]  # rejected edges: residual against the final solve
    disconnected: list[TileId]  # tiles no accepted match ties to the largest connected group
    iterations: int
    components: list[list[TileId]] = field(default_factory=list)  # the smaller groups, largest first
    residual_stats: dict[str, float] = field(default_factory=dict)
    stage: dict[str, Any] = field(default_factory=dict)
    loops: dict[str, Any] = field(default_factory=dict)  # what the match loops said (stitch.loops)
    tile_residuals: dict[TileId, float] = field(init=False)

    def __post_init__(self) -> None:
        worst: dict[TileId, float] = {t: 0.0 for t in self.positions}
        for (a, b), r in self.edge_residuals.items():
            worst[a] = max(worst[a], r)
            worst[b] = max(worst[b], r)
        self.tile_residuals = worst

    def rms_residual(self) -> float:
        r = np.array(list(self.edge_residuals.values()))
        return float(np.sqrt(np.mean(r**2))) if r.size else 0.0
