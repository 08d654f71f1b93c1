"""How freely a montage's tiles may deviate from their solved turn: the spreads that predict pairs the solve
did not see.

The spreads of the separable models' linear entries are first measured by type-II maximum likelihood
(:mod:`em_platform.stitch.solve_affine`), which takes every pair's error to be independent. A real scope's
pairs are not: the 10 template matches along one TEMCA edge share its lens and matcher bias, the likelihood
then calls the tiles' real deformation noise, and the spreads it measures (rotation ~1·10⁻⁴) left the
4,969-tile montage 2 % above em_stitch's near-free solve on its pairs and 5 % worse on held-out ones than a
looser prior. So, as the lens order is chosen, the measured spreads are scaled by the factor (1, 4, 16, 64)
whose solve best predicts held-out pairs: each edge's pairs split alternately into two folds, each fold
solved without the other and scored on it. On synthetic montages with independent noise the factor stays
at 1 (the likelihood was right); on the TEMCA montage it rises until the spreads reach their cap.
Dagster-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["held_out_scale"]

STEP = 4.0  # the factors tried: 1, 4, 16, 64 (each costs two solves; finer steps change the residual < 1 %)
MAX_STEPS = 3  # at most 64× the measured spreads (the caps bind first)
MIN_GAIN = 0.002  # a step is taken when it lowers the held-out mean square by more than this (relative)
MIN_SHARED_EDGES = 0.5  # fraction of edges with ≥ 2 pairs below which there is nothing to hold out


def _folds(edge_of: np.ndarray, weights: np.ndarray, n_edges: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's fold (0/1, alternating within its edge) and whether its edge has a pair in both folds."""
    order = np.argsort(edge_of, kind="stable")
    starts = np.searchsorted(edge_of[order], np.arange(n_edges))
    rank = np.empty(len(edge_of), np.int64)
    rank[order] = np.arange(len(edge_of)) - starts[edge_of[order]]
    fold = rank % 2
    live = weights > 0
    both = (np.bincount(edge_of, live & (fold == 0), minlength=n_edges) > 0) & (
        np.bincount(edge_of, live & (fold == 1), minlength=n_edges) > 0
    )
    return fold, both[edge_of]


def held_out_scale(
    solve: Callable[[np.ndarray, dict[str, float]], Any],
    residuals: Callable[[Any], np.ndarray],
    edge_of: np.ndarray,
    weights: np.ndarray,
    spreads: Mapping[str, float],
    caps: Mapping[str, float],
    n_edges: int,
) -> tuple[dict[str, float], dict[str, Any]]:
    """``spreads`` scaled (each within its cap) by the factor whose solve best predicts held-out pairs:
    (scaled spreads, a summary of the search). ``solve(weights, spreads)`` → solution, ``residuals(solution)``
    → (m, 2) px."""
    spreads = dict(spreads)
    fold, shared = _folds(edge_of, weights, n_edges)
    if (
        not n_edges
        or np.count_nonzero(np.bincount(edge_of[shared], minlength=n_edges)) < MIN_SHARED_EDGES * n_edges
    ):
        return spreads, {"scale": 1.0, "reason": "too few edges with two pairs to hold one out"}

    def scaled(factor: float) -> dict[str, float]:
        return {k: min(v * factor, caps[k]) for k, v in spreads.items()}

    def score(factor: float) -> float:
        total, count = 0.0, 0
        for held in (0, 1):
            out = shared & (fold == held) & (weights > 0)
            r = residuals(solve(np.where(out, 0.0, weights), scaled(factor)))
            total += float(np.sum(r[out] ** 2))
            count += int(np.count_nonzero(out))
        return total / max(count, 1)

    factor, best = 1.0, score(1.0)
    tried = [[1.0, round(best, 4)]]
    for _ in range(MAX_STEPS):
        if scaled(factor) == scaled(STEP * factor):  # every spread at its cap
            break
        candidate = score(STEP * factor)
        tried.append([STEP * factor, round(candidate, 4)])
        if candidate >= best * (1 - MIN_GAIN):
            break
        factor, best = STEP * factor, candidate
    return scaled(factor), {"scale": factor, "held_out_mean_square_px2": tried}
