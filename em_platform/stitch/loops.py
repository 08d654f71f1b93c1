"""Which matches the montage itself vouches for, before any solve: consensus within an edge, closure of loops.

A wrong match cannot be told from a right one by its residual after a solve: the solve bends to fit it, and
a model's own misfit looks the same (tiles turned by a few tenths of a degree, as a real TEMCA montage's
are, leave tens of pixels at the ends of a translation-only solve's edges; judged as outliers, a whole row of
good edges was torn out, 294 of 9,790 on the 4,969-tile montage em_stitch ships). Two facts need no model:

* **Consensus.** The point pairs of one edge must agree on one similarity transform between the two tiles.
  Pairs off the largest agreeing set (:mod:`em_platform.stitch.consensus`: every two-point hypothesis, not
  a RANSAC that stops early) are outliers, even when several of them agree among themselves.
* **Loop closure.** Around a closed loop of edges (a grid's 2 × 2 squares, found in the match graph) the
  tiles' relative transforms must compose to the identity. A loop that closes vouches for its four edges;
  a loop that does not has at least one wrong edge: the one that no closing loop vouches for, or an edge
  whose every loop fails (a blank tile's random matches).

The solve (:mod:`em_platform.stitch.solve_affine`) starts without the refused edges and pairs, and never
rejects a vouched-for edge for its residual. An edge in no loop (a bridge, a boundary edge beside a bad one)
is neither: the solve's own rejection judges it. Dagster-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from em_platform.stitch.consensus import CONSENSUS_PX, edge_consensus

__all__ = ["CONSENSUS_PX", "LoopVerdicts", "edge_consensus", "loop_verdicts"]

MIN_CLOSURE_PX = 6.0  # a loop within this always closes: twice the solve's outlier limit
CLOSURE_MAD_FACTOR = 6.0


def _squares(n_tiles: int, ends: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Every 4-cycle of the match graph as its four edge indices, in loop order from the first tile."""
    adjacency: list[dict[int, int]] = [{} for _ in range(n_tiles)]
    for k, (a, b) in enumerate(ends):
        adjacency[int(a)].setdefault(int(b), k)
        adjacency[int(b)].setdefault(int(a), k)
    seen: set[frozenset[int]] = set()
    loops = []
    for k, (a, b) in enumerate(ends):
        a, b = int(a), int(b)
        for c, k_bc in adjacency[b].items():
            if c == a:
                continue
            for d, k_da in adjacency[a].items():
                if d in (b, c) or c not in adjacency[d]:
                    continue
                edges = (k, k_bc, adjacency[c][d], k_da)
                key = frozenset(edges)
                if len(key) == 4 and key not in seen:
                    seen.add(key)
                    loops.append(edges)
    return loops


def _affine3(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def _closure(loop, ends, transforms3, inverses3, centre) -> float:
    """How far the composed relative transforms around ``loop`` move its first tile's centre (px)."""
    k0 = loop[0]
    tile = int(ends[k0, 0])
    composite = np.eye(3)
    for k in loop:
        a, b = int(ends[k, 0]), int(ends[k, 1])
        # walking tile -> next: the map from the next tile's frame into this one's
        if a == tile:
            composite = composite @ transforms3[k]
            tile = b
        else:
            composite = composite @ inverses3[k]
            tile = a
    c = np.array([centre[0], centre[1], 1.0])
    return float(np.hypot(*(composite @ c - c)[:2]))


@dataclass(frozen=True)
class LoopVerdicts:
    vouched: np.ndarray  # per edge: a closing loop vouches for it (a solve must not reject it)
    refused: np.ndarray  # per edge: wrong by its loops (left out of the solve)
    loops: int
    closing: int
    tolerance_px: float
    median_closure_px: float

    def summary(self) -> dict[str, float | int]:
        return {
            "loops": self.loops,
            "loops_closing": self.closing,
            "loop_tolerance_px": round(self.tolerance_px, 3),
            "median_closure_px": round(self.median_closure_px, 3),
            "edges_vouched": int(self.vouched.sum()),
            "edges_refused_by_loops": int(self.refused.sum()),
        }


def loop_verdicts(
    n_tiles: int,
    ends: np.ndarray,
    transforms: np.ndarray,
    centre: tuple[float, float],
    usable: np.ndarray | None = None,
    *,
    min_tolerance_px: float = MIN_CLOSURE_PX,
) -> LoopVerdicts:
    """Judge each edge by the loops it closes (module docstring). ``transforms``: per edge tile ← neighbour
    (:func:`edge_consensus`); ``centre``: a tile's centre (x, y) px; ``usable``: edges that may take part
    (e.g. with agreeing pairs). Loops close within ``max(min_tolerance_px, 6 × 1.4826 × median closure)``."""
    ends = np.asarray(ends, np.int64).reshape(-1, 2)
    n_edges = len(ends)
    usable = np.ones(n_edges, bool) if usable is None else np.asarray(usable, bool)
    live_edges = np.flatnonzero(usable)
    loops = [tuple(int(live_edges[k]) for k in lp) for lp in _squares(n_tiles, ends[live_edges])]
    none = np.zeros(n_edges, bool)
    if not loops:
        return LoopVerdicts(none, none.copy(), 0, 0, float(min_tolerance_px), 0.0)
    t3 = np.array([_affine3(m) for m in transforms])
    inv3 = np.linalg.inv(t3)
    closures = np.array([_closure(lp, ends, t3, inv3, centre) for lp in loops])
    median = float(np.median(closures))
    tolerance = max(float(min_tolerance_px), CLOSURE_MAD_FACTOR * 1.4826 * median)
    closes = closures <= tolerance
    members = np.array(loops, np.int64)
    alive = np.ones(len(loops), bool)
    refused = np.zeros(n_edges, bool)
    while True:
        passing = np.bincount(members[alive & closes].ravel(), minlength=n_edges) > 0
        failing_loops = np.flatnonzero(alive & ~closes)
        failing = np.bincount(members[failing_loops].ravel(), minlength=n_edges)
        blame = np.zeros(n_edges, bool)
        for i in failing_loops:
            suspects = [k for k in members[i] if not passing[k]]
            if len(suspects) == 1:  # the other three are vouched for by loops that close
                blame[suspects[0]] = True
        blame |= (failing >= 2) & ~passing  # every loop of this edge fails
        blame &= ~refused
        if not blame.any():
            break
        refused |= blame
        alive &= ~refused[members].any(axis=1)
    vouched = (np.bincount(members[alive & closes].ravel(), minlength=n_edges) > 0) & ~refused
    return LoopVerdicts(vouched, refused, len(loops), int(closes.sum()), tolerance, median)
