"""What the montage solves share: the stage's frame and error measured from the matches, and edge rejection
that does not tear a montage apart.

**Stage frame.** A stage calibrated a few percent off in scale, or turned against the camera, puts far
tiles hundreds of pixels from where the images put them: a prior that trusts it drags a large montage out
of shape (the real 5,000-tile montage of issue 14). :func:`stage_frame` fits the linear map ``G`` from
stage steps to measured steps over all edges (robustly) and the scatter left around it: that scatter is
the stage's own error, ``σ_stage`` per tile and axis. The prior is then ``G``·stage, weighted
``(σ_match / σ_stage)² / √(n / 100)`` against one match: the measured ratio of variances, and weaker as
the montage grows, where a stage's errors are correlated over the extent the prior would hold together.
``G`` is kept at the identity unless the montage measures a difference, so a scatter that happens to fit
a small shear or scale stays in the readings: the solve (:mod:`em_platform.stitch.solve_affine`) leaves
the largest group's linear frame free in its stage prior, so the stage holds where the montage is, never
its shape; ``G`` places the tiles outside that group.

**Rejection** (:func:`pick_rejections`). Rejecting every edge beyond a limit at once cascades: a bad
edge drags its tiles, their other edges look bad, those go too, and whole rows come loose (issue 14: 70
rejected edges, blocks 776 px off). Here an edge is rejected only when it is the worst beyond the limit
around both of its tiles in this round, and never when it is the last tie of a block to the rest (a
bridge: no other edge can contradict it, so its residual is no evidence). Rejected edges that fit the
next solve come back. Dagster-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["StageFrame", "bridges", "components", "pick_rejections", "prior_weight", "stage_frame"]

MIN_STAGE_SIGMA_PX = 0.25  # a stage read to better than this is not believed: it would pin the solve


@dataclass(frozen=True)
class StageFrame:
    """``G`` maps stage steps (px) to image steps; ``sigma_px`` is one stage reading's error (per axis)."""

    matrix: np.ndarray  # 2×2
    sigma_px: float
    edges_used: int

    @property
    def scale(self) -> tuple[float, float]:
        """Scale of the image frame against the stage along x and y (1 = calibrated)."""
        return float(np.hypot(*self.matrix[:, 0])), float(np.hypot(*self.matrix[:, 1]))

    @property
    def rotation_deg(self) -> float:
        """Rotation of the image frame against the stage (mean of the two axes' angles)."""
        g = self.matrix
        return float(np.degrees((math.atan2(g[1, 0], g[0, 0]) + math.atan2(-g[0, 1], g[1, 1])) / 2))

    def apply(self, stage: np.ndarray) -> np.ndarray:
        """Stage positions (n, 2) in the image frame, about their centroid (which stays)."""
        stage = np.asarray(stage, np.float64).reshape(-1, 2)
        if not len(stage):
            return stage
        centre = stage.mean(axis=0)
        return (stage - centre) @ self.matrix.T + centre

    def summary(self) -> dict[str, float | int]:
        sx, sy = self.scale
        return {
            "stage_scale_x": round(sx, 6),
            "stage_scale_y": round(sy, 6),
            "stage_rotation_deg": round(self.rotation_deg, 5),
            "stage_sigma_px": round(self.sigma_px, 3),
            "stage_edges_used": self.edges_used,
        }


def stage_frame(
    stage_steps: np.ndarray,
    measured_steps: np.ndarray,
    *,
    fit: bool = True,
    sigma_px: float | None = None,
    per_reading: bool = False,
) -> StageFrame:
    """Fit ``measured ≈ G · stage`` (rows: an edge's step, or a tile's position about the centroid with
    ``per_reading``, px) by Tukey-reweighted least squares, and the stage's error per reading from the
    scatter (an edge's step error is the difference of two readings: √2 σ). Too few rows, or rows along
    one direction only, keep ``G`` = I. ``sigma_px`` given is used as it is (a stage's specification)."""
    s = np.asarray(stage_steps, np.float64).reshape(-1, 2)
    d = np.asarray(measured_steps, np.float64).reshape(-1, 2)
    g = np.eye(2)
    w = np.ones(len(s))
    spans_both = len(s) >= 6 and np.linalg.matrix_rank(s[np.abs(s).max(axis=1) > 0], tol=1e-6) == 2
    if fit and spans_both:
        for _ in range(8):
            sw = s * w[:, None]
            normal = sw.T @ s
            if np.linalg.cond(normal) > 1e8:
                g = np.eye(2)
                break
            g = np.linalg.solve(normal, sw.T @ d).T
            r = np.hypot(*(d - s @ g.T).T)
            c = max(1.0, 4.685 * 1.4826 * float(np.median(r)))
            w = (1 - np.clip(r / c, 0, 1) ** 2) ** 2
    r = d - s @ g.T
    if fit and spans_both and not np.array_equal(g, np.eye(2)):
        # keep the stage's own frame unless the montage measures a difference (5 standard errors)
        sw = s * w[:, None]
        dof = max(1.0, float(w.sum()) - 4)
        variance = float((w[:, None] * r**2).sum()) / (2 * dof)
        stderr = np.sqrt(np.maximum(np.diag(np.linalg.inv(sw.T @ s)), 0) * variance)
        if np.all(np.abs(g - np.eye(2)) <= 5 * stderr[None, :]):
            g = np.eye(2)
            r = d - s
    if sigma_px is None:
        if len(r) >= 2:
            mad = float(np.median(np.abs(r - np.median(r, axis=0))))
            sigma_px = 1.4826 * mad / (1.0 if per_reading else math.sqrt(2))
        else:
            sigma_px = math.inf
    return StageFrame(g, max(MIN_STAGE_SIGMA_PX, float(sigma_px)), int((w > 0).sum()) if fit else 0)


def prior_weight(match_sigma_px: float, stage_sigma_px: float, n_tiles: int) -> float:
    """A stage reading's weight against one match (see the module docstring)."""
    if not math.isfinite(stage_sigma_px):
        return 1e-6  # nothing measured the stage: a gauge only
    ratio = (max(match_sigma_px, 0.05) / stage_sigma_px) ** 2
    return float(min(1.0, ratio) / math.sqrt(max(1.0, n_tiles / 100.0)))


# ----------------------------------------------------------------------------------------------------
# Graph helpers


def components(n: int, ends: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` tiles linked by ``ends`` (m, 2) index pairs; label 0 is
    the largest component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ends = np.asarray(ends, np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(ends)), (ends[:, 0], ends[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels, minlength=labels.max() + 1 if n else 0)
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[labels]


def bridges(n: int, ends: np.ndarray) -> np.ndarray:
    """Indices (into ``ends``) of the edges whose removal splits their component (iterative Tarjan)."""
    ends = np.asarray(ends, np.int64).reshape(-1, 2)
    adjacency: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for k, (a, b) in enumerate(ends):
        if a != b:
            adjacency[a].append((b, k))
            adjacency[b].append((a, k))
    order = np.full(n, -1)
    low = np.zeros(n, np.int64)
    out = []
    counter = 0
    for root in range(n):
        if order[root] >= 0:
            continue
        order[root] = low[root] = counter
        counter += 1
        stack = [(root, -1, iter(adjacency[root]))]
        while stack:
            v, via, it = stack[-1]
            advanced = False
            for w, k in it:
                if k == via:
                    continue
                if order[w] < 0:
                    order[w] = low[w] = counter
                    counter += 1
                    stack.append((w, k, iter(adjacency[w])))
                    advanced = True
                    break
                low[v] = min(low[v], order[w])
            if not advanced:
                stack.pop()
                if stack:
                    parent = stack[-1][0]
                    low[parent] = min(low[parent], low[v])
                    if low[v] > order[parent]:
                        out.append(via)
    return np.array(sorted(out), np.int64)


def pick_rejections(
    residuals: np.ndarray,
    accepted: np.ndarray,
    ends: np.ndarray,
    limit: float,
    n_tiles: int,
    protected: np.ndarray | None = None,
) -> np.ndarray:
    """The edges to reject this round: beyond ``limit``, the worst around both their tiles, not a bridge
    of the accepted graph, not ``protected`` (edges closing loops vouch for: :mod:`em_platform.stitch.loops`)
    and not splitting it together with the others picked."""
    residuals = np.asarray(residuals, np.float64)
    eligible = accepted if protected is None else accepted & ~np.asarray(protected, bool)
    candidates = np.flatnonzero(eligible & (residuals > limit))
    if not len(candidates):
        return candidates
    live = np.flatnonzero(accepted)
    bridge_edges = set(live[bridges(n_tiles, ends[live])].tolist())
    # rank by the residual the edge would have if left out: r / (1 − h), h its leverage, about
    # 1/degree + 1/degree of its tiles (exact, ½, for a grid's interior edge)
    degree = np.bincount(ends[live].ravel(), minlength=n_tiles).astype(np.float64)
    leverage = np.minimum(0.95, 1 / np.maximum(degree[ends[:, 0]], 1) + 1 / np.maximum(degree[ends[:, 1]], 1))
    deleted = residuals / (1 - leverage)
    touched: set[int] = set()
    picked: list[int] = []
    for e in candidates[np.argsort(-deleted[candidates], kind="stable")]:
        a, b = (int(v) for v in ends[e])
        if e in bridge_edges or a in touched or b in touched:
            continue
        picked.append(int(e))
        touched.update((a, b))
    before = int(components(n_tiles, ends[live]).max()) if len(live) else 0
    while picked:
        keep = accepted.copy()
        keep[picked] = False
        if int(components(n_tiles, ends[keep]).max()) <= before:
            break
        picked.pop()  # together they split the montage: reject fewer this round
    return np.array(picked, np.int64)


def group_sizes(labels: Sequence[int]) -> list[int]:
    return np.bincount(np.asarray(labels, np.int64)).tolist() if len(labels) else []
