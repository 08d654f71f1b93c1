"""The montage solve: a translation, rigid, affine or polynomial transform per tile, from point pairs.

Each model is solved after stiffer ones have settled the gross outliers (``PASSES``). A first translation
pass, held by a gauge-weak stage prior, places the montage by the matches alone; the stage's frame and its
error per reading are measured against it (:func:`~em_platform.stitch.robust.stage_frame`), so a stage a
few percent off in scale no longer drags a large montage out of shape. Translation, rigid and similarity
are solved coupled (:mod:`em_platform.stitch.normal_equations`); affine and polynomial per image axis
(:mod:`em_platform.stitch.separable`, 3 unknowns per tile and axis, BigFeta's size; coupled, 0.4 s per
reweighting on the 4,969-tile TEMCA montage), each tile's linear part pulled toward the turn the similarity
pass solved: a per-axis prior about the identity cannot tell a turn from a shear (a 50 × 50 montage of
±0.05° tiles bent 18 px). Their spreads are scaled to what predicts held-out pairs
(:mod:`em_platform.stitch.held_out`). ``model="auto"``: :mod:`em_platform.stitch.model_choice`.

Robustness: a pair beyond ``max(outlier_px, mad_factor · MAD)`` is dropped (reported per edge); an edge
whose median pair is beyond it is rejected whole, but only as
:func:`~em_platform.stitch.robust.pick_rejections` allows (worst first around each tile, never a bridge),
and comes back if the next solve fits it, so rejection does not cascade into tears.

The result is a :class:`~em_platform.stitch.layout.TransformLayout`. Dagster-free; the montage assets and
``em-platform stitch`` call :func:`solve_transforms`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from em_platform.stitch.held_out import held_out_scale
from em_platform.stitch.layout import Model, PointEdge, TileId, TransformLayout, residual_stats
from em_platform.stitch.loops import CONSENSUS_PX, edge_consensus, loop_verdicts
from em_platform.stitch.normal_equations import FREED, LINEAR_PARTS, NormalEquations
from em_platform.stitch.point_pairs import PointPairs, edge_medians, flatten_pairs
from em_platform.stitch.robust import (
    StageFrame,
    components,
    pick_rejections,
    prior_weight,
    stage_frame,
)
from em_platform.stitch.separable import BASIS_SIZE, SeparableSolver, raw_coefficients
from em_platform.stitch.tile_priors import fit_separable_spreads, fit_spreads, prior_links

__all__ = ["solve_transforms"]

DEFAULT_MATCH_SIGMA_PX = 0.3  # when the edges carry one pair each and nothing measures the spread
GAUGE_WEIGHT = 1e-6  # the stage prior of the first pass: fixes the free translation, pulls nothing
PRELIMINARY_ITERATIONS = 8  # rejection rounds of a pass before the model's own
# the held-out scale's cap on a linear entry's spread: 1 % is no TEM tile's scale or shear
LOOSEST_LINEAR = 0.01
SPREAD_BLOCK_TILES = 900  # a larger montage's spreads are measured on its central block of this many tiles
SETTLED_PAIRS = 1000  # rejection has settled when at most 1 pair in this many still moves (none in fewer)
REFINING_ITERATIONS = 2  # ... and of a final pass that refines a separable one (polynomial after affine)
TORN_PX = 10.0  # an edge whose consensus pairs the solve leaves this far off (median) is torn ...
TORN_SIGMAS = 6.0  # ... or this many σ_match, if more
PASSES = {  # each model is solved after the stiffer ones have settled the gross outliers
    "translation": ["translation"],
    "rigid": ["translation", "rigid"],
    "affine": ["translation", "similarity", "affine"],
    "polynomial": ["translation", "similarity", "affine", "polynomial"],  # the affine pass judges the pairs
}
# solved per image axis (em_platform.stitch.separable), as translation is, each tile's linear part pulled
# toward the one the coupled similarity pass solved (a turn is not a shear there: module docstring)
SEPARABLE = ("affine", "polynomial")


def _measured_match_sigma(pairs: PointPairs, agree: np.ndarray) -> float:
    """The matcher's error: the scatter of an edge's agreeing pairs about their mean offset (a default where
    too few edges carry more than one such pair to show it). Pairs off their edge's consensus are outliers,
    not the matcher's scatter: counted in, they inflate it and with it the stage prior's weight."""
    edge_of, n_edges = pairs.edge_of, pairs.n_edges
    w = agree.astype(np.float64)
    steps = np.stack(
        [np.bincount(edge_of, w * (pairs.q_raw - pairs.p_raw)[:, k], minlength=n_edges) for k in (0, 1)], 1
    ).astype(np.float64)
    kept = np.bincount(edge_of, w, minlength=n_edges)
    steps /= np.maximum(kept, 1)[:, None]  # mean offset per edge: t_tile − t_neighbour (translation)
    spread = (pairs.q_raw - pairs.p_raw) - steps[edge_of]
    multi = agree & (kept[edge_of] > 1)
    return (
        max(0.05, 1.4826 * float(np.median(np.abs(spread[multi]))) * np.sqrt(2))
        if multi.sum() >= 10
        else DEFAULT_MATCH_SIGMA_PX
    )


def _make_solver(
    pairs: PointPairs, frame: StageFrame, weight: float, edge_ok: np.ndarray, fit_stage_frame: bool
) -> NormalEquations:
    """The normal equations with the stage seen through ``frame`` and held with ``weight``."""
    n = pairs.n
    corners = frame.apply(pairs.s) if n else pairs.s
    origin = corners.mean(axis=0) if n else np.zeros(2)
    # the largest group's frame is left to the tiles (normal_equations): the stage prior of its tiles
    # carries a free linear map about the group's centroid
    main = (components(n, pairs.ends[edge_ok]) == 0) if (fit_stage_frame and n) else np.zeros(n, bool)
    radius = pairs.radius
    return NormalEquations(
        n,
        pairs.m,
        pairs.p / radius,
        pairs.q / radius,
        pairs.a,
        pairs.b,
        radius,
        corners + pairs.centre - origin,
        weight,
        origin,
        main,
    )


def _measured_frame(
    pairs: PointPairs,
    t: np.ndarray,
    edge_ok: np.ndarray,
    match_sigma_px: float,
    fit_stage_frame: bool,
    stage_sigma_px: float | None,
) -> tuple[StageFrame, float]:
    """The stage frame and the stage prior's weight, measured against the tile centres ``t`` the matches
    place in the largest connected group."""
    s = pairs.s
    placed = components(pairs.n, pairs.ends[edge_ok]) == 0
    frame = stage_frame(
        s[placed] - s[placed].mean(axis=0),
        t[placed] - t[placed].mean(axis=0),
        fit=fit_stage_frame,
        sigma_px=stage_sigma_px,
        per_reading=True,
    )
    return frame, prior_weight(match_sigma_px, frame.sigma_px, pairs.n)


def _restore_distorted(
    pairs: PointPairs, edge_ok: np.ndarray, pair_ok: np.ndarray, degree: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Accept again every edge of a tile that lost most of its edges: before a more flexible model, such a
    tile is more likely distorted than all of them wrong."""
    lost = np.bincount(pairs.ends[~edge_ok].ravel(), minlength=pairs.n)
    again = (lost * 2 > degree)[pairs.ends].any(axis=1)
    return edge_ok | again, pair_ok | again[pairs.edge_of]


@dataclass(frozen=True)
class _Block:
    pairs: PointPairs  # the block's own, tiles renumbered
    pair_mask: np.ndarray  # which of the montage's pairs they are
    edge_mask: np.ndarray  # ... and edges
    tiles: np.ndarray  # the montage's indices of its tiles

    def solver(
        self, frame: StageFrame, weight: float, edge_ok: np.ndarray, fit_stage_frame: bool
    ) -> NormalEquations:
        """The block's normal equations, with the montage's stage frame, prior weight and edge verdicts."""
        return _make_solver(self.pairs, frame, weight, edge_ok[self.edge_mask], fit_stage_frame)


def _spread_block(pairs: PointPairs) -> _Block | None:
    """The central ``SPREAD_BLOCK_TILES`` tiles of a larger montage (nearest the stage's median), on which
    the spreads of the separable passes and of a similarity pass before them are measured, at a fifth of
    the factorisations' cost on the 4,969-tile TEMCA montage (its result there unchanged: the held-out
    scale sets the spreads' size). A centre is not a whole montage: its tiles turned half as much as all
    of them, so a final rigid model measures its spread on every tile. None: small enough to measure whole."""
    if pairs.n <= SPREAD_BLOCK_TILES:
        return None
    distance = np.hypot(*(pairs.s - np.median(pairs.s, axis=0)).T)
    tiles = np.sort(np.argsort(distance, kind="stable")[:SPREAD_BLOCK_TILES])
    inside = np.zeros(pairs.n, bool)
    inside[tiles] = True
    new = np.full(pairs.n, -1, np.int64)
    new[tiles] = np.arange(len(tiles))
    edges = inside[pairs.ends[:, 0]] & inside[pairs.ends[:, 1]]
    in_block = edges[pairs.edge_of]
    renumber = np.cumsum(edges) - 1
    ends = new[pairs.ends[edges]]
    block = PointPairs(
        ids=[pairs.ids[i] for i in tiles],
        keys=[k for k, e in zip(pairs.keys, edges, strict=True) if e],
        ends=ends,
        counts=pairs.counts[edges],
        edge_of=renumber[pairs.edge_of[in_block]],
        p_raw=pairs.p_raw[in_block],
        q_raw=pairs.q_raw[in_block],
        p=pairs.p[in_block],
        q=pairs.q[in_block],
        a=new[pairs.a[in_block]],
        b=new[pairs.b[in_block]],
        w0=pairs.w0[in_block],
        s=pairs.s[tiles],
        centre=pairs.centre,
        radius=pairs.radius,
    )
    return _Block(block, in_block, edges, tiles)


def _reject_outliers(
    solve: Callable[[np.ndarray], Any],
    residuals: Callable[[Any], np.ndarray],
    pairs: PointPairs,
    edge_ok: np.ndarray,
    pair_ok: np.ndarray,
    outlier_px: float,
    mad_factor: float,
    max_iterations: int,
    vouched: np.ndarray,
    agree: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Solve, judge the pairs and edges against ``max(outlier_px, mad_factor · MAD)``, and again until the
    verdicts settle (module docstring: robustness): (accepted edges, accepted pairs, solves spent)."""
    edge_of, n_edges = pairs.edge_of, pairs.n_edges
    edge_ok = edge_ok.copy()
    soft = np.ones(pairs.m)  # Tukey weights: a pair far out stops pulling while it is judged
    spent = 0
    for _ in range(max_iterations):
        spent += 1
        solution = solve(pairs.w0 * soft * pair_ok * edge_ok[edge_of])
        if not pairs.m:
            break
        r = np.hypot(*residuals(solution).T)
        live = pair_ok & edge_ok[edge_of]
        mad = 1.4826 * float(np.median(r[live])) if live.any() else 0.0
        limit = max(outlier_px, mad_factor * mad)
        per_edge = edge_medians(r, edge_of, n_edges)
        # a pair is judged within an edge the majority of whose pairs fit; an edge is judged whole
        new_pair_ok = ((r <= limit) | (per_edge[edge_of] > limit)) & agree
        picks = pick_rejections(per_edge, edge_ok, pairs.ends, limit, pairs.n, protected=vouched)
        back = ~edge_ok & (per_edge <= limit / 2)
        new_soft = (1 - np.clip(r / limit, 0, 1) ** 2) ** 2
        # settled: every weight but a few pairs' moved < 0.05 and as few verdicts changed (pairs at the
        # limit of a model that does not fit, e.g. rigid TEMCA tiles, flip back and forth for ever)
        few = pairs.m // SETTLED_PAIRS
        moving = int(np.count_nonzero(np.abs(new_soft - soft) >= 0.05))
        flipped = int(np.count_nonzero(new_pair_ok != pair_ok))
        soft = new_soft
        if not len(picks) and not back.any() and flipped <= few and moving <= few:
            break
        edge_ok[picks] = False
        edge_ok[back] = True
        pair_ok = new_pair_ok
    return edge_ok, pair_ok, spent


def solve_transforms(
    stage: Mapping[TileId, tuple[float, float]],
    point_edges: Iterable[PointEdge[TileId]],
    model: Model = "affine",
    *,
    tile_size: tuple[float, float],
    stage_weight: float | None = None,
    stage_sigma_px: float | None = None,
    fit_stage_frame: bool = True,
    match_sigma_px: float | None = None,
    rotation_sigma: float = 0.01,
    deformation_sigma: float = 0.002,
    fit_spread: bool = True,
    rigid_weight: float = 1e5,
    outlier_px: float = 3.0,
    mad_factor: float = 6.0,
    max_iterations: int = 40,
    consensus_px: float = CONSENSUS_PX,
    bend_sigma: float = 0.01,
) -> TransformLayout[TileId]:
    """Solve each tile's transform from ``point_edges`` anchored softly at the ``stage`` top-left corners (px).

    ``tile_size`` is ``(width, height)`` px of every tile: transforms act about the tile centre.
    ``stage_weight`` fixes the prior's weight against one pair (default: measured, module docstring);
    ``stage_sigma_px`` states the stage's error per reading instead of measuring it; ``fit_stage_frame``
    False trusts the stage's scale and rotation. ``rotation_sigma`` (rad) and ``deformation_sigma`` are the
    largest spreads of a tile's rotation and of its scale/shear the flexible models allow; ``fit_spread``
    measures the montage's own below them (:mod:`~em_platform.stitch.tile_priors`), False uses them as they
    are. Edges naming a tile not in ``stage`` raise ``KeyError``; malformed points or a repeated edge
    ``ValueError``.
    """
    if model not in PASSES:
        raise ValueError(
            f"model must be one of {', '.join(PASSES)} (auto: model_choice.solve_model), got {model!r}"
        )
    width, height = (float(v) for v in tile_size)
    if not (width > 0 and height > 0):
        raise ValueError(f"tile_size must be a positive (width, height) in px, got {tile_size!r}")
    centre = np.array([width, height]) / 2
    radius = float(np.hypot(width, height) / 2)
    pairs = flatten_pairs(stage, point_edges, centre, radius)
    n, m, edge_of = pairs.n, pairs.m, pairs.edge_of
    # the stage in the image frame and how far to trust it: measured on the montage the matches alone place
    # (a first translation solve held by a gauge-weak prior), so pairs the matcher missed bias nothing
    measure = stage_weight is None and n >= 3 and pairs.n_edges >= 2
    frame = stage_frame(np.zeros((0, 2)), np.zeros((0, 2)), fit=False, sigma_px=stage_sigma_px)
    weight_stage = stage_weight if stage_weight is not None else GAUGE_WEIGHT
    # pairs off their edge's consensus and edges their loops refuse start out; loops vouch for the rest
    consensus, agree = edge_consensus(pairs.p_raw, pairs.q_raw, pairs.edge_of, pairs.n_edges, consensus_px)
    pair_ok = agree.copy()
    if match_sigma_px is None:
        match_sigma_px = _measured_match_sigma(pairs, agree)
    agreeing = np.bincount(pairs.edge_of, agree, minlength=pairs.n_edges) > 0
    verdicts = loop_verdicts(n, pairs.ends, consensus, tuple(centre), usable=agreeing)
    edge_ok = agreeing & ~verdicts.refused
    solver = _make_solver(pairs, frame, weight_stage, edge_ok, fit_stage_frame)
    # the spread of the tiles' linear parts about the identity, per part: at most the given sigmas, and
    # measured from the montage before each flexible pass (fit_spread)
    largest = {k: rotation_sigma if k == "rotation" else deformation_sigma for k in LINEAR_PARTS}
    tile_spread = dict(largest)
    link = prior_links(rigid_weight, tile_spread, match_sigma_px, radius)
    iterations = 0
    degree = np.bincount(pairs.ends.ravel(), minlength=n)
    t = np.zeros((n, 2))  # the tile centres of the last pass (the frame is measured against them)
    coefficients = None  # a separable model's maps (em_platform.stitch.separable)
    similarity = None  # the linear parts of the last coupled pass: where the separable passes pull theirs
    held_out: dict[str, Any] = {}  # how the separable spreads were scaled (held_out_scale)
    block = _spread_block(pairs)  # where a large montage's spreads are measured
    # the separable passes' linear entries deviate from each tile's solved turn by a scale or a shear only
    caps = {"diagonal": deformation_sigma, "off_diagonal": deformation_sigma, "quadratic": bend_sigma}
    spreads = dict(caps)  # the separable models' spreads, measured before each of their passes
    passes = (["frame"] if measure else []) + PASSES[model]
    for step, kind in enumerate(passes):
        final = step == len(passes) - 1
        if kind != "frame" and step == 1:  # after the frame pass: the measured stage frame and weight
            frame, weight_stage = _measured_frame(
                pairs, t, edge_ok, match_sigma_px, fit_stage_frame, stage_sigma_px
            )
            solver = _make_solver(pairs, frame, weight_stage, edge_ok, fit_stage_frame)
        kind = "translation" if kind == "frame" else kind
        # a polynomial after an affine pass only refines: the affine's verdicts on pairs and edges stand
        refining = kind in SEPARABLE and step > 0 and passes[step - 1] == "affine"
        if iterations and kind != "translation":
            edge_ok, pair_ok = _restore_distorted(pairs, edge_ok, pair_ok, degree)
        if kind in SEPARABLE or kind == "translation":
            separable = _separable_solver(pairs, solver, kind, link["frame"], similarity)
            sigma = match_sigma_px
            if fit_spread and kind in SEPARABLE and m and not refining:
                # measured on the montage, or on its central block when it is large (_spread_block)
                weights = pairs.w0 * pair_ok * edge_ok[edge_of]
                sample, sample_solver = pairs, separable
                if block is not None:
                    sample, weights = block.pairs, weights[block.pair_mask]
                    sample_solver = _separable_solver(
                        sample,
                        block.solver(frame, weight_stage, edge_ok, fit_stage_frame),
                        kind,
                        link["frame"],
                        None if similarity is None else similarity[block.tiles],
                    )
                spreads, spent = fit_separable_spreads(sample_solver, sample, weights, spreads, caps, sigma)

                def solve_sample(w, s, solver=sample_solver, sigma=sigma):
                    return solver.solve(w, s, sigma)

                # ... scaled to what predicts held-out pairs (em_platform.stitch.held_out)
                spreads, held_out = held_out_scale(
                    solve_sample,
                    sample_solver.residual_vectors,
                    sample.edge_of,
                    weights,
                    spreads,
                    {**caps, "diagonal": LOOSEST_LINEAR, "off_diagonal": LOOSEST_LINEAR},
                    sample.n_edges,
                )
                iterations += spent + 2 * len(held_out.get("held_out_mean_square_px2", ()))

            def solve(weights, separable=separable, spreads=spreads, sigma=sigma):
                return separable.solve(weights, spreads, sigma)

            residuals = separable.residual_vectors
        else:
            if fit_spread and kind != "translation" and m:
                weights = pairs.w0 * pair_ok * edge_ok[edge_of]
                sample, sample_system = pairs, solver
                # a preliminary pass's spreads only shape the separable pass's targets: a block will do;
                # a final model's (rigid) are its own and are measured on the whole montage
                if block is not None and not final:
                    sample, weights = block.pairs, weights[block.pair_mask]
                    sample_system = block.solver(frame, weight_stage, edge_ok, fit_stage_frame)
                tile_spread, link, spent = fit_spreads(
                    sample_system, kind, sample, weights, tile_spread, largest, match_sigma_px, rigid_weight
                )
                iterations += spent
            solve = solver.for_model(kind, link)

            def residuals(solution):
                return pairs.residual_vectors(*solution)

        edge_ok, pair_ok, spent = _reject_outliers(
            solve,
            residuals,
            pairs,
            edge_ok,
            pair_ok,
            outlier_px,
            mad_factor,
            # a stiffer pass before the model's own only settles gross outliers (the loops have judged the
            # edges): iterating it to the end re-weighs the stiffer model's misfit, which the next drops
            min(
                max_iterations,
                PRELIMINARY_ITERATIONS if not final else REFINING_ITERATIONS if refining else max_iterations,
            ),
            verdicts.vouched,
            agree,
        )
        iterations += spent
        solution = solve(pairs.w0 * pair_ok * edge_ok[edge_of])
        if kind == "translation":
            solver.correction = separable.correction
            linear, t = np.broadcast_to(np.eye(2), (n, 2, 2)).copy(), solution[:, :, 0]
        elif kind in SEPARABLE:
            coefficients = solution
            solver.correction = separable.correction
            linear = np.stack([coefficients[:, 0, 1:3], coefficients[:, 1, 1:3]], axis=1) / radius
            t = coefficients[:, :, 0]
        else:
            linear, t = solution
            similarity = _rotations(linear)
        if m and pairs.multi.sum() >= 10 and (pair_ok & edge_ok[edge_of]).sum() >= 10:
            # the next, more flexible model is weighed against the misfit this one leaves
            r = np.hypot(*residuals(solution).T)[pair_ok & edge_ok[edge_of]]
            match_sigma_px = min(match_sigma_px, max(0.05, 1.4826 * float(np.median(r)) / np.sqrt(2)))
            link = prior_links(rigid_weight, tile_spread, match_sigma_px, radius)
    freed = {k: tile_spread[k] for k in FREED["similarity" if model in SEPARABLE else model]}
    if model in SEPARABLE:
        freed.update({k: v for k, v in spreads.items() if model == "polynomial" or k != "quadratic"})
    stage_summary = _stage_summary(frame, solver.correction, weight_stage, match_sigma_px, freed)
    vectors = residuals(solution) if m else np.zeros((0, 2))
    # an edge the loops refuse is a wrong match, rightly apart; any other left apart is a tear
    inliers = agree & ~verdicts.refused[edge_of]
    layout = _transform_layout(
        pairs,
        linear,
        t,
        vectors,
        inliers,
        edge_ok,
        pair_ok,
        (width, height),
        model,
        iterations,
        stage_summary,
    )
    if coefficients is not None and model == "polynomial":
        raw = raw_coefficients(coefficients, centre, radius)
        layout.polynomials = {tid: raw[i] for i, tid in enumerate(pairs.ids)}
    layout.loops = verdicts.summary()
    if held_out:
        layout.stage["held_out"] = held_out
    return layout


def _rotations(linear: np.ndarray) -> np.ndarray:
    """The turn of each tile's linear part (n, 2, 2), without its scale."""
    theta = np.arctan2(linear[:, 1, 0] - linear[:, 0, 1], linear[:, 0, 0] + linear[:, 1, 1])
    cos, sin = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def _separable_solver(
    pairs: PointPairs, solver: NormalEquations, kind: str, frame_link: float, similarity: np.ndarray | None
) -> SeparableSolver:
    """The per-axis problem of a separable model over the same pairs, stage and frame as ``solver``, its
    tiles' linear parts pulled toward ``similarity`` (n, 2, 2; None: the identity)."""
    return SeparableSolver(
        n=pairs.n,
        size=BASIS_SIZE[kind],
        u=pairs.p / pairs.radius,
        v=pairs.q / pairs.radius,
        a=pairs.a,
        b=pairs.b,
        radius=pairs.radius,
        stage_centres=solver.stage_centres,
        stage_weight=solver.stage_weight,
        origin=solver.origin,
        main=solver.main,
        frame_weight=frame_link,
        target=similarity,
    )


def _stage_summary(
    frame: StageFrame,
    correction: np.ndarray,
    weight_stage: float,
    match_sigma_px: float,
    spreads: Mapping[str, float],
) -> dict[str, Any]:
    """What the solve made of the stage and the priors: the frame with the solved correction, the stage
    prior's weight, σ_match and the spreads of the parts the model frees (:attr:`TransformLayout.stage`)."""
    solved_frame = StageFrame((np.eye(2) + correction) @ frame.matrix, frame.sigma_px, frame.edges_used)
    return {
        **solved_frame.summary(),
        "prior_weight": weight_stage,
        "match_sigma_px": round(float(match_sigma_px), 4),
        **{f"{k}_spread": round(v, 6) for k, v in spreads.items()},
    }


def _transform_layout(
    pairs: PointPairs[TileId],
    linear: np.ndarray,
    t: np.ndarray,
    vectors: np.ndarray,
    inliers: np.ndarray,
    edge_ok: np.ndarray,
    pair_ok: np.ndarray,
    tile_size: tuple[float, float],
    model: Model,
    iterations: int,
    stage_summary: dict[str, Any],
) -> TransformLayout[TileId]:
    """The solved centres ``t`` and linear parts as transforms of the top-left corner, with the residuals
    (``vectors``, per pair), rejections and connected groups against the final verdicts; ``inliers``: the
    pairs that agree with their edge's consensus (what a RANSAC filter keeps), kept or not."""
    ids, keys, edge_of, n_edges, counts = pairs.ids, pairs.keys, pairs.edge_of, pairs.n_edges, pairs.counts
    n, m = pairs.n, pairs.m
    r = np.hypot(*vectors.T) if m else np.zeros(0)
    inlier_median = edge_medians(r[inliers], edge_of[inliers], n_edges) if m else np.zeros(n_edges)
    sigma = float(stage_summary.get("match_sigma_px", DEFAULT_MATCH_SIGMA_PX))
    torn_limit = max(TORN_PX, TORN_SIGMAS * sigma)
    accepted = pair_ok & edge_ok[edge_of]
    squares = np.bincount(edge_of, np.where(accepted, r**2, 0.0), minlength=n_edges)
    kept = np.bincount(edge_of, accepted, minlength=n_edges)
    all_squares = np.bincount(edge_of, r**2, minlength=n_edges)
    edge_ok = edge_ok & (kept > 0)
    labels = components(n, pairs.ends[edge_ok]) if n else np.zeros(0, np.int64)
    groups: dict[int, list[TileId]] = {}
    for i, tid in enumerate(ids):
        groups.setdefault(int(labels[i]), []).append(tid)
    corner = t - np.einsum("kij,j->ki", linear, pairs.centre)
    return TransformLayout(
        transforms={tid: np.column_stack([linear[i], corner[i]]) for i, tid in enumerate(ids)},
        tile_size=tile_size,
        model=model,
        edge_residuals={k: float(np.sqrt(squares[j] / kept[j])) for j, k in enumerate(keys) if edge_ok[j]},
        rejected={
            k: float(np.sqrt(all_squares[j] / counts[j])) for j, k in enumerate(keys) if not edge_ok[j]
        },
        rejected_points={
            k: int(counts[j] - kept[j]) for j, k in enumerate(keys) if edge_ok[j] and kept[j] < counts[j]
        },
        disconnected=[tid for i, tid in enumerate(ids) if labels[i] != 0],
        iterations=iterations,
        components=[groups[g] for g in sorted(groups) if g != 0],
        residual_stats=residual_stats(vectors[accepted]) if m else residual_stats(np.zeros((0, 2))),
        inlier_residual_stats=residual_stats(vectors[inliers]) if m else residual_stats(np.zeros((0, 2))),
        inlier_pairs=dict(zip(keys, np.split(inliers, np.cumsum(counts)[:-1]), strict=True)) if m else {},
        torn={k: float(inlier_median[j]) for j, k in enumerate(keys) if inlier_median[j] > torn_limit},
        stage=stage_summary,
    )
