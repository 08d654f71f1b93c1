"""How far each tile's linear part may stray from the identity: the spreads the priors hold it to, measured.

Per part (scale, rotation, anisotropy, shear; per image axis for the separable models) the spread is
estimated by EM, a type-II maximum likelihood (the mean of solved deviation² plus its posterior variance),
kept below what real tiles may have (a stage's turn between tiles; one camera, where only a focus change
scales a tile) and above ``MIN_TILE_SPREAD``. A deviation ``δ`` costs ``(δ/spread)²`` where a pair
``σ_match`` off costs 1. Measuring it is not cosmetic: held to the largest spread, the matcher's noise left
the tiles of a montage without deformation scaled by ~5·10⁻⁴ and their centres 0.4 px off; measured, the
spread is ±0.5 % where tiles are scaled that much and the floor where they are not. Dagster-free.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from em_platform.stitch.normal_equations import NormalEquations, trace_probes
from em_platform.stitch.point_pairs import PointPairs
from em_platform.stitch.separable import SeparableSolver

STAGE_CALIBRATION = 0.02  # how far (relative) a stage's frame may be from the one the first pass measured
MIN_TILE_SPREAD = 1e-4  # a spread of tile deformations no montage is told to be below (0.1 px over 2k px)
SPREAD_ITERATIONS = 8
EM_RELAXATION = 1.8  # over-relaxed EM (in log spread): < 2 keeps it monotone where plain EM is


def prior_links(
    rigid_weight: float, tile_spread: Mapping[str, float], match_sigma_px: float, radius: float
) -> dict[str, float]:
    """The priors' weights against one pair, from the tiles' spreads and σ_match."""
    link = {"rigid": rigid_weight}
    link.update({k: (match_sigma_px / (v * radius)) ** 2 for k, v in tile_spread.items()})
    link["frame"] = (match_sigma_px / STAGE_CALIBRATION) ** 2
    return link


def _seen_tiles(pairs: PointPairs, weights: np.ndarray) -> np.ndarray:
    """The tiles some weighted pair touches: the ones whose spread the pairs say anything about."""
    return np.bincount(np.concatenate([pairs.a, pairs.b])[np.tile(weights, 2) > 0], minlength=pairs.n) > 0


def fit_spreads(
    solver: NormalEquations,
    kind: str,
    pairs: PointPairs,
    weights: np.ndarray,
    tile_spread: dict[str, float],
    largest: Mapping[str, float],
    match_sigma_px: float,
    rigid_weight: float,
) -> tuple[dict[str, float], dict[str, float], int]:
    """EM for the spreads of the tiles' linear parts (type-II maximum likelihood), each kept between
    ``MIN_TILE_SPREAD`` and ``largest``: (spreads, the priors' weights from them, solves spent)."""
    tile_spread = dict(tile_spread)
    link = prior_links(rigid_weight, tile_spread, match_sigma_px, pairs.radius)
    seen = _seen_tiles(pairs, weights)
    spent = 0
    for _ in range(SPREAD_ITERATIONS):
        spent += 1
        moments = solver.spread_moments(kind, link, weights, seen, match_sigma_px)
        if not moments:
            break
        new, settled = _em_step(tile_spread, moments, largest)
        tile_spread.update(new)
        link = prior_links(rigid_weight, tile_spread, match_sigma_px, pairs.radius)
        if settled:
            break
    return tile_spread, link, spent


def _em_step(
    spreads: Mapping[str, float], moments: Mapping[str, float], caps: Mapping[str, float]
) -> tuple[dict[str, float], bool]:
    """One over-relaxed EM step for the spreads (EM for variances crawls where the data say little: 8 plain
    steps left a montage without deformation 60 % above the floor), each kept between ``MIN_TILE_SPREAD``
    and its cap: (new spreads, whether every spread moved by less than 5 %: one held at its floor or cap
    has settled)."""
    new = {}
    for k, v in moments.items():
        em = max(float(np.sqrt(v)), 1e-12)
        new[k] = float(np.clip(spreads[k] * (em / spreads[k]) ** EM_RELAXATION, MIN_TILE_SPREAD, caps[k]))
    return new, all(abs(new[k] / spreads[k] - 1) < 0.05 for k in new)


def fit_separable_spreads(
    separable: SeparableSolver,
    pairs: PointPairs,
    weights: np.ndarray,
    spreads: dict[str, float],
    caps: Mapping[str, float],
    match_sigma_px: float,
) -> tuple[dict[str, float], int]:
    """EM for a separable model's spreads (type-II maximum likelihood), each kept between
    ``MIN_TILE_SPREAD`` and its cap: (spreads, solves spent)."""
    spreads = dict(spreads)
    seen = _seen_tiles(pairs, weights)
    count = int(np.count_nonzero(seen))
    if not count:
        return spreads, 0
    probes = trace_probes(count)
    spent = 0
    for _ in range(SPREAD_ITERATIONS):
        spent += 1
        moments = separable.spread_moments(weights, spreads, match_sigma_px, seen, probes)
        new, settled = _em_step(spreads, moments, caps)
        spreads.update(new)
        if settled:
            break
    return spreads, spent
