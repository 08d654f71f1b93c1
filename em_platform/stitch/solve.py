"""Global montage solve: where every tile really sits, from pairwise matches and stage positions.

One sparse least-squares problem per axis (translation model): each accepted match says
``p_tile − p_neighbour = measured offset``; each tile's stage position is a weak prior
(``stage_weight`` relative to a match) that fixes the free translation and places tiles no match
reaches. Bad matches are found the way em_stitch filters point matches, robustly: the solve is
repeated with Tukey-biweight weights, and a match whose residual stays beyond ``max(outlier_px,
k · MAD)`` is rejected and reported, never silently averaged in.

Dagster-free; the montage assets and ``em-platform stitch`` both call :func:`solve_translations`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

TileId = Hashable

__all__ = ["Edge", "Layout", "solve_translations"]


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


def _tukey(r: np.ndarray, c: float) -> np.ndarray:
    u = np.clip(r / c, 0, 1)
    return (1 - u**2) ** 2


def solve_translations(
    stage: Mapping[TileId, tuple[float, float]],
    edges: Iterable[Edge],
    *,
    stage_weight: float = 1e-3,
    outlier_px: float = 3.0,
    mad_factor: float = 6.0,
    max_iterations: int = 20,
) -> Layout:
    """Solve tile positions from ``edges`` anchored softly at the ``stage`` positions (px).

    ``stage_weight`` is a stage prior's weight relative to a match of weight 1: small, because matches
    are good to a tenth of a pixel and stages to a few pixels, but not zero, so the solve is always
    determined. Edges naming a tile not in ``stage`` raise ``KeyError``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import lsqr

    ids = list(stage)
    index = {t: i for i, t in enumerate(ids)}
    edges = [e for e in edges if e.tile != e.neighbour]
    for e in edges:
        for t in (e.tile, e.neighbour):
            if t not in index:
                raise KeyError(f"edge {e.tile!r}–{e.neighbour!r}: tile {t!r} has no stage position")
    n, m = len(ids), len(edges)
    s = np.array([stage[t] for t in ids], np.float64).reshape(n, 2)
    d = np.array([(e.dx, e.dy) for e in edges], np.float64).reshape(m, 2)
    w0 = np.array([e.weight for e in edges], np.float64)
    a = np.array([index[e.tile] for e in edges], np.int64)
    b = np.array([index[e.neighbour] for e in edges], np.int64)
    origin = s.mean(axis=0) if n else np.zeros(2)  # solve near zero: better conditioned

    def solve(weights: np.ndarray) -> np.ndarray:
        sw = np.sqrt(weights)
        rows = np.concatenate([np.arange(m), np.arange(m), m + np.arange(n)])
        cols = np.concatenate([a, b, np.arange(n)])
        vals = np.concatenate([sw, -sw, np.full(n, np.sqrt(stage_weight))])
        matrix = coo_matrix((vals, (rows, cols)), shape=(m + n, n)).tocsr()
        out = np.empty((n, 2))
        for axis in (0, 1):
            rhs = np.concatenate([sw * d[:, axis], np.sqrt(stage_weight) * (s[:, axis] - origin[axis])])
            out[:, axis] = lsqr(matrix, rhs, atol=1e-12, btol=1e-12, iter_lim=20 * (n + m) + 100)[0]
        return out + origin

    def residuals(p: np.ndarray) -> np.ndarray:
        return np.hypot(*(p[a] - p[b] - d).T) if m else np.zeros(0)

    weights = w0.copy()
    accepted = np.ones(m, bool)
    p = solve(weights)
    iterations = 1
    while iterations < max_iterations:
        iterations += 1
        r = residuals(p)
        mad = float(np.median(r[accepted])) * 1.4826 if accepted.any() else 0.0
        limit = max(outlier_px, mad_factor * mad)
        new_accepted = r <= limit
        # Tukey weights within the limit keep a bad match from pulling the solve while it is judged
        new_weights = np.where(new_accepted, w0 * _tukey(r, limit), 0.0)
        done = np.array_equal(new_accepted, accepted) and np.allclose(new_weights, weights, atol=1e-3)
        accepted, weights = new_accepted, new_weights
        p = solve(np.where(accepted, w0, 0.0) if done else weights)
        if done:
            break
    r = residuals(p)
    keys = [(e.tile, e.neighbour) for e in edges]
    return Layout(
        positions={t: (float(p[i, 0]), float(p[i, 1])) for i, t in enumerate(ids)},
        edge_residuals={k: float(r[j]) for j, k in enumerate(keys) if accepted[j]},
        rejected={k: float(r[j]) for j, k in enumerate(keys) if not accepted[j]},
        disconnected=_outside_largest_group(
            ids, [(e.tile, e.neighbour) for e, ok in zip(edges, accepted, strict=True) if ok]
        ),
        iterations=iterations,
    )


def _outside_largest_group(ids: list[TileId], links: list[tuple[TileId, TileId]]) -> list[TileId]:
    parent = {t: t for t in ids}

    def root(t: TileId) -> TileId:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for x, y in links:
        parent[root(x)] = root(y)
    groups: dict[TileId, list[TileId]] = {}
    for t in ids:
        groups.setdefault(root(t), []).append(t)
    if not groups:
        return []
    largest = max(groups.values(), key=len)
    return [t for t in ids if t not in set(largest)]
