"""What the montage solvers take and return: measured offsets and point pairs between tiles, and the
solved layout with the evidence for it.

:mod:`em_platform.stitch.solve` (translations) fills a :class:`Layout`, :mod:`em_platform.stitch.solve_affine`
(a transform per tile) a :class:`TransformLayout`, whose :meth:`~TransformLayout.as_layout` gives one.
Residuals are reported per point pair as em_stitch reports them (:func:`residual_stats`). Dagster-free.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import numpy as np

# A tile's id: the caller's choice, kept through a solve. Tile names (``str``) from a tile folder, the
# journal and em-platform stitch; grid positions (``tuple[int, int]``) from the montage asset and the tests.
# The layouts are generic over it, so a ``Layout[tuple[int, int]]`` gives back the keys its stage had.
TileId = TypeVar("TileId", bound=Hashable)
EdgeKey = tuple[TileId, TileId]
Model = Literal["translation", "rigid", "affine", "polynomial"]


@dataclass(frozen=True)
class Edge(Generic[TileId]):
    """A measured offset between two tiles: ``position(tile) − position(neighbour) = (dx, dy)`` in px."""

    tile: TileId
    neighbour: TileId
    dx: float
    dy: float
    weight: float = 1.0  # e.g. the match quality


@dataclass
class Layout(Generic[TileId]):
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


@dataclass(frozen=True, eq=False)
class PointEdge(Generic[TileId]):
    """Point pairs between two tiles: ``p[k]`` in the tile and ``q[k]`` in the neighbour are one specimen point.

    Coordinates are ``(x, y)`` px from each tile's top-left corner (a matcher ``Match``'s ``pX, pY`` and
    ``qX, qY``, or a render point match's ``p`` and ``q``). ``weight`` (e.g. the match quality) applies to
    every pair, so an edge with more agreeing patches counts for more.
    """

    tile: TileId
    neighbour: TileId
    p: np.ndarray
    q: np.ndarray
    weight: float = 1.0


def residual_stats(residuals: np.ndarray) -> dict[str, float]:
    """em_stitch's residual summary of point pairs ``(n, 2)`` (x, y px): the mean and standard deviation of
    the distance, and of each axis."""
    r = np.asarray(residuals, np.float64).reshape(-1, 2)
    if not len(r):
        return {"pairs": 0}
    d = np.hypot(r[:, 0], r[:, 1])
    return {
        "pairs": int(len(r)),
        "mean_px": float(d.mean()),
        "std_px": float(d.std()),
        "median_px": float(np.median(d)),
        "max_px": float(d.max()),
        "x_mean_px": float(r[:, 0].mean()),
        "x_std_px": float(r[:, 0].std()),
        "y_mean_px": float(r[:, 1].mean()),
        "y_std_px": float(r[:, 1].std()),
    }


@dataclass
class TransformLayout(Generic[TileId]):
    """Solved per-tile transforms to montage px (the stage frame) with the evidence for them."""

    transforms: dict[TileId, np.ndarray]  # 2×3 [A | t]: montage (x, y) = A @ tile (x, y) + t
    tile_size: tuple[float, float]  # (width, height) px
    model: Model
    edge_residuals: dict[EdgeKey[TileId], float]  # accepted edges: RMS over their accepted point pairs (px)
    rejected: dict[EdgeKey[TileId], float]  # rejected edges: RMS over all their pairs against the final solve
    rejected_points: dict[EdgeKey[TileId], int]  # accepted edges that lost point pairs: how many they lost
    disconnected: list[TileId]  # tiles no accepted edge ties to the largest connected group
    iterations: int
    components: list[list[TileId]] = field(default_factory=list)  # the smaller groups, largest first
    residual_stats: dict[str, float] = field(default_factory=dict)  # accepted pairs
    # every pair its edge's consensus keeps, accepted or not (em_stitch's figures: its RANSAC inliers, 10 px)
    inlier_residual_stats: dict[str, float] = field(default_factory=dict)
    # per edge, which of its pairs (in the order given) are among them: agree with the edge's consensus
    # (em_platform.stitch.consensus) on an edge its loops do not refuse
    inlier_pairs: dict[EdgeKey[TileId], np.ndarray] = field(default_factory=dict)
    # edges whose consensus pairs the solve leaves beyond max(TORN_PX, TORN_SIGMAS·σ_match): a tear
    torn: dict[EdgeKey[TileId], float] = field(default_factory=dict)
    polynomials: dict[TileId, np.ndarray] | None = None  # model "polynomial": (2, 6) per tile, raw px
    stage: dict[str, Any] = field(default_factory=dict)  # the stage frame, priors' weights, tile spreads
    loops: dict[str, Any] = field(default_factory=dict)  # what the loops said (loops.LoopVerdicts.summary)
    model_choice: dict[str, Any] = field(default_factory=dict)  # model "auto": why (model_choice.solve_auto)
    tile_residuals: dict[TileId, float] = field(init=False)  # worst accepted edge of the tile (px)
    scale_distortion: dict[TileId, float] = field(init=False)  # max |s − 1|, s = singular values of A
    anisotropy: dict[TileId, float] = field(init=False)  # s_max / s_min (1 = no stretch)
    translations: dict[TileId, tuple[float, float]] = field(init=False)  # top-left corner, centre kept
    translation_error: dict[TileId, float] = field(init=False)  # px at the corners, translation vs transform

    def __post_init__(self) -> None:
        worst: dict[TileId, float] = {t: 0.0 for t in self.transforms}
        for (a, b), r in self.edge_residuals.items():
            worst[a] = max(worst[a], r)
            worst[b] = max(worst[b], r)
        self.tile_residuals = worst
        ids = list(self.transforms)
        m = np.array([self.transforms[t] for t in ids], np.float64).reshape(len(ids), 2, 3)
        linear = m[:, :, :2]
        s = np.linalg.svd(linear, compute_uv=False) if ids else np.zeros((0, 2))
        self.scale_distortion = {t: float(np.abs(s[i] - 1).max()) for i, t in enumerate(ids)}
        self.anisotropy = {t: float(s[i, 0] / s[i, 1]) for i, t in enumerate(ids)}
        c = np.array(self.tile_size, np.float64) / 2
        centres = np.einsum("kij,j->ki", linear, c) + m[:, :, 2]  # where each transform puts the centre
        self.translations = {
            t: (float(centres[i, 0] - c[0]), float(centres[i, 1] - c[1])) for i, t in enumerate(ids)
        }
        corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]]) * c
        bend = np.einsum("kij,cj->kci", linear - np.eye(2), corners)
        self.translation_error = {t: float(np.hypot(*bend[i].T).max()) for i, t in enumerate(ids)}

    def rms_residual(self) -> float:
        r = np.array(list(self.edge_residuals.values()))
        return float(np.sqrt(np.mean(r**2))) if r.size else 0.0

    @property
    def positions(self) -> dict[TileId, tuple[float, float]]:
        """Where each transform puts its tile's pixel (0, 0): the top-left corner, rotated or not."""
        return {t: (float(m[0, 2]), float(m[1, 2])) for t, m in self.transforms.items()}

    def is_translation(self, tolerance: float = 1e-9) -> bool:
        """Every linear part the identity: fusion can paste tiles instead of resampling them."""
        return all(np.abs(m[:, :2] - np.eye(2)).max() <= tolerance for m in self.transforms.values())

    def as_layout(self) -> Layout[TileId]:
        """The translation-only :class:`Layout` (positions = :attr:`translations`); residuals stay the model's."""
        return Layout(
            positions=dict(self.translations),
            edge_residuals=dict(self.edge_residuals),
            rejected=dict(self.rejected),
            disconnected=list(self.disconnected),
            iterations=self.iterations,
            components=list(self.components),
            residual_stats=dict(self.residual_stats),
            stage=dict(self.stage),
            loops=dict(self.loops),
        )
