"""Global montage solve with a translation, rigid, affine or polynomial transform per tile, from point pairs.

Each accepted point pair says: tile point ``p`` and neighbour point ``q`` land on the same montage point,
``T_tile(p) = T_neighbour(q)``. With ``T(x) = A·(x − c) + t`` about the tile centre ``c`` every such
equation is linear in the six numbers of ``(A, t)``, so the montage is one sparse linear least-squares
problem (6 unknowns per tile, solved directly from the normal equations, as BigFeta solves em_stitch's
montages, seed-systems.md §1.4). Priors make it determined everywhere, each weighted by what it knows
against one point pair (of measured error ``σ_match``):

* **stage**: each tile centre is tied to its stage position *in the image frame*: the stage's own scale
  and rotation against the images, and its error per reading, are measured from the matches first
  (:func:`~em_platform.stitch.robust.stage_frame`), and the weight is ``(σ_match/σ_stage)²``, weaker for
  large montages (:func:`~em_platform.stitch.robust.prior_weight`). A stage a few percent off in scale
  then no longer drags a large montage out of shape, and tiles no match reaches sit where it puts them.
  Within the largest connected group the stage holds the position only, not the shape: its prior carries
  a free linear map ``F`` (the frame's correction, within ``STAGE_CALIBRATION`` of the measured frame).
  A common scale, shear or rotation of every tile, with the tile centres moved along, changes no point
  pair: it is a null space of the matches, and without ``F`` the stage's noise would set it (the scatter
  of 100 readings of σ 2 px over a 10 × 10 montage fits a shear of ~3·10⁻⁴ that rows of affine tiles
  followed, 1.6 px at the far corner: the montage was measured in the stage's frame, not the images').
  With ``F`` the group's frame is the images' own: its tiles' linear parts average to the identity.
* **linear part**: pulled toward the identity, each part (scale, rotation, anisotropy, shear) with the
  spread the montage's tiles show, measured before each flexible pass (``fit_spread``: EM for the
  spreads, a type-II maximum likelihood: mean of solved deviation² plus its posterior variance, a few
  solves) and never above the spreads real tiles may have: rotation ``σ_rotation`` (a stage's turn
  between tiles), scale and shear ``σ_deformation`` (one camera: only a focus change scales a tile), nor
  below ``MIN_TILE_SPREAD``. A deviation ``δ`` costs ``(δ/spread)²`` where a pair ``σ_match`` off costs 1.
  It is needed, not cosmetic: the matcher's patches lie along the middle of each overlap strip, so a
  strip sees how tiles map the direction along it but hardly the one across it, and the centre of a
  tile is placed by its matches through a lever of half a tile: unregularised, rows of affine
  tiles shear together at almost no cost (the 1.8 px drift of issue 14), and regularised with the largest
  spread, the matcher's noise leaves tiles of a montage that has no deformation scaled by ~5·10⁻⁴ and
  their centres 0.4 px off. Measured, the spread is what the montage shows: ±0.5 % where tiles are
  scaled that much, the floor where they are not, and the translation model's accuracy then.
* ``model="rigid"``: scale, anisotropy and shear held to zero (``rigid_weight``); the solved linear part is
  projected to the nearest rotation (polar decomposition), exact where ``cos θ ≈ 1`` would be off by
  ``θ²/2·R``. ``model="translation"``: ``A ≡ I``. A similarity or rigid tile is solved with 4 unknowns
  (``A = [[a, −b], [b, a]]``, :meth:`_Solver._reduction`): a sparse factor ~⅓ of 6 unknowns' cost.
* ``model="affine"`` (and ``"polynomial"``) is solved in two steps: the coupled similarity pass above (the
  spreads of scale and rotation measured), then per image axis (:mod:`em_platform.stitch.separable`, 3
  unknowns per tile and axis, BigFeta's size) with each tile's linear part pulled toward its solved turn,
  a spread for the diagonal entries (scale, anisotropy) and one for the off-diagonal ones (shear, and what
  the turn still needs), each measured, then scaled to what predicts held-out pairs
  (:mod:`em_platform.stitch.held_out`: a real scope's pairs share their edge's errors). Coupled, the four parts cost a 6-unknown factor per reweighting
  (0.4 s on the 4,969-tile TEMCA montage, ~30 of them); a per-axis prior about the identity cannot tell a
  turn from a shear (a 50 × 50 montage of ±0.05° tiles bent 18 px); about the solved turn it need not.
* ``model="auto"``: :mod:`em_platform.stitch.model_choice` takes the model the matches pay for.

Robustness: a pair beyond ``max(outlier_px, mad_factor · MAD)`` is dropped (reported per edge); an edge
whose median pair is beyond it is rejected whole, but only as
:func:`~em_platform.stitch.robust.pick_rejections` allows (worst first around each tile, never a bridge),
and comes back if the next solve fits it, so rejection does not cascade into tears. Flexible models are
judged after the translation solve has settled the gross outliers.

Residuals are reported per point pair as em_stitch reports them (mean and spread of the distance, and
per axis: :attr:`TransformLayout.residual_stats`); after rejection the montage's connected components are
listed (:attr:`TransformLayout.components`): a tile outside the largest is placed by the stage alone.

Fusion places tiles by their full transform (:mod:`em_platform.stitch.fuse` resamples);
:attr:`TransformLayout.translations` give the top-left corner that puts each tile's centre where its
transform does and :attr:`TransformLayout.translation_error` how far a corner then is from it.

Dagster-free; the montage assets and ``em-platform stitch`` call :func:`solve_transforms`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from em_platform.stitch.held_out import held_out_scale
from em_platform.stitch.layout import Layout, TileId
from em_platform.stitch.ldl import FactorCache, solve_columns
from em_platform.stitch.loops import CONSENSUS_PX, edge_consensus, loop_verdicts
from em_platform.stitch.robust import (
    StageFrame,
    components,
    pick_rejections,
    prior_weight,
    stage_frame,
)
from em_platform.stitch.separable import BASIS_SIZE, SeparableSolver, raw_coefficients

__all__ = ["Model", "PointEdge", "TransformLayout", "residual_stats", "solve_transforms"]

Model = Literal["translation", "rigid", "affine", "polynomial"]
EdgeKey = tuple[TileId, TileId]
DEFAULT_MATCH_SIGMA_PX = 0.3  # when the edges carry one pair each and nothing measures the spread
GAUGE_WEIGHT = 1e-6  # the stage prior of the first pass: fixes the free translation, pulls nothing
STAGE_CALIBRATION = 0.02  # how far (relative) a stage's frame may be from the one the first pass measured
MIN_TILE_SPREAD = 1e-4  # a spread of tile deformations no montage is told to be below (0.1 px over 2k px)
SPREAD_ITERATIONS = 8
EM_RELAXATION = 1.8  # over-relaxed EM (in log spread): < 2 keeps it monotone where plain EM is
PRELIMINARY_ITERATIONS = 8  # rejection rounds of a pass before the model's own
# the held-out scale's cap on a linear entry's spread: 1 % is no TEM tile's scale or shear
LOOSEST_LINEAR = 0.01
SPREAD_BLOCK_TILES = 900  # a larger montage's spreads are measured on its central block of this many tiles
SETTLED_PAIRS = 1000  # rejection has settled when at most 1 pair in this many still moves (none in fewer)
REFINING_ITERATIONS = 2  # ... and of a final pass that refines a separable one (polynomial after affine)
TRACE_PROBES = 16  # Hutchinson probes for the posterior variances of a large montage's tile parameters
TRACE_PROBE_TILES = 400  # ... up to this many tiles; fewer beyond (the 4,969-tile TEMCA montage: 4)
MIN_TRACE_PROBES = 4
TORN_PX = 10.0  # an edge whose consensus pairs the solve leaves this far off (median) is torn ...
TORN_SIGMAS = 6.0  # ... or this many σ_match, if more
EXACT_TRACE_TILES = 64  # up to this many tiles the posterior variances are summed exactly
LINEAR_PARTS = ("scale", "rotation", "anisotropy", "shear")
FREED = {
    "translation": (),
    "rigid": ("rotation",),
    "similarity": ("scale", "rotation"),
    "affine": LINEAR_PARTS,
}
PASSES = {  # each model is solved after the stiffer ones have settled the gross outliers
    "translation": ["translation"],
    "rigid": ["translation", "rigid"],
    "affine": ["translation", "similarity", "affine"],
    "polynomial": ["translation", "similarity", "affine", "polynomial"],  # the affine pass judges the pairs
}
# solved per image axis (em_platform.stitch.separable), as translation is, each tile's linear part pulled
# toward the one the coupled similarity pass solved (a turn is not a shear there: module docstring)
SEPARABLE = ("affine", "polynomial")


@dataclass(frozen=True, eq=False)
class PointEdge:
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
class TransformLayout:
    """Solved per-tile transforms to montage px (the stage frame) with the evidence for them."""

    transforms: dict[TileId, np.ndarray]  # 2×3 [A | t]: montage (x, y) = A @ tile (x, y) + t
    tile_size: tuple[float, float]  # (width, height) px
    model: Model
    edge_residuals: dict[EdgeKey, float]  # accepted edges: RMS over their accepted point pairs (px)
    rejected: dict[EdgeKey, float]  # rejected edges: RMS over all their pairs against the final solve
    rejected_points: dict[EdgeKey, int]  # accepted edges that lost point pairs: how many they lost
    disconnected: list[TileId]  # tiles no accepted edge ties to the largest connected group
    iterations: int
    components: list[list[TileId]] = field(default_factory=list)  # the smaller groups, largest first
    residual_stats: dict[str, float] = field(default_factory=dict)  # accepted pairs
    # every pair its edge's consensus keeps, accepted or not (em_stitch's figures: its RANSAC inliers, 10 px)
    inlier_residual_stats: dict[str, float] = field(default_factory=dict)
    # per edge, which of its pairs (in the order given) are among them: agree with the edge's consensus
    # (em_platform.stitch.consensus) on an edge its loops do not refuse
    inlier_pairs: dict[EdgeKey, np.ndarray] = field(default_factory=dict)
    # edges whose consensus pairs the solve leaves beyond max(TORN_PX, TORN_SIGMAS·σ_match): a tear
    torn: dict[EdgeKey, float] = field(default_factory=dict)
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

    def as_layout(self) -> Layout:
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


def _points(e: PointEdge) -> tuple[np.ndarray, np.ndarray]:
    p, q = np.asarray(e.p, np.float64), np.asarray(e.q, np.float64)
    if p.ndim != 2 or p.shape[1:] != (2,) or p.shape != q.shape or len(p) == 0:
        raise ValueError(
            f"edge {e.tile!r}–{e.neighbour!r}: p and q must be matching (n, 2) arrays of (x, y) points "
            f"with n ≥ 1, got shapes {p.shape} and {q.shape}"
        )
    if not (np.isfinite(p).all() and np.isfinite(q).all()):
        raise ValueError(f"edge {e.tile!r}–{e.neighbour!r}: points must be finite (NaN or inf found)")
    if not (np.isfinite(e.weight) and e.weight > 0):
        raise ValueError(
            f"edge {e.tile!r}–{e.neighbour!r}: weight must be a positive number, got {e.weight!r}"
        )
    return p, q


def _edge_medians(values: np.ndarray, edge_of: np.ndarray, n_edges: int) -> np.ndarray:
    """The median of ``values`` (≥ 0, finite) over each edge's pairs (edges without pairs: 0)."""
    # one float sort key (edge, then value) sorts 100k pairs ~4× faster than lexsort on two keys
    span = float(values.max(initial=0.0)) * 1.01 + 1.0
    order = np.argsort(edge_of * span + values)
    counts = np.bincount(edge_of, minlength=n_edges)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sorted_values = values[order]
    lo = starts + (np.maximum(counts, 1) - 1) // 2
    hi = starts + np.maximum(counts, 1) // 2
    out = np.zeros(n_edges)
    has = counts > 0
    out[has] = (sorted_values[lo[has]] + sorted_values[hi[has]]) / 2
    return out


@dataclass(frozen=True, eq=False)
class _Pairs:
    """The montage's point pairs, flattened: pair k lies on edge ``edge_of[k]`` from tile ``a[k]`` to tile
    ``b[k]``, with ``p[k]``, ``q[k]`` about the tile centre (``p_raw``, ``q_raw`` from the top-left corner)."""

    ids: list[TileId]
    keys: list[EdgeKey]
    ends: np.ndarray  # (edges, 2) tile indices
    counts: np.ndarray  # pairs per edge
    edge_of: np.ndarray
    p_raw: np.ndarray
    q_raw: np.ndarray
    p: np.ndarray
    q: np.ndarray
    a: np.ndarray
    b: np.ndarray
    w0: np.ndarray  # the edge's weight, per pair
    s: np.ndarray  # stage top-left corners, per tile
    centre: np.ndarray
    radius: float

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def n_edges(self) -> int:
        return len(self.keys)

    @property
    def m(self) -> int:
        return len(self.edge_of)

    @property
    def multi(self) -> np.ndarray:
        """Pairs on edges with more than one: only those show the matcher's scatter."""
        return self.counts[self.edge_of] > 1

    def residual_vectors(self, linear: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Per pair: where the tile's transform puts ``p`` minus where the neighbour's puts ``q``."""
        a, b = self.a, self.b
        at_tile = np.einsum("kij,kj->ki", linear[a], self.p) + t[a]
        at_neighbour = np.einsum("kij,kj->ki", linear[b], self.q) + t[b]
        return at_tile - at_neighbour


def _flatten_pairs(
    stage: Mapping[TileId, tuple[float, float]],
    point_edges: Iterable[PointEdge],
    centre: np.ndarray,
    radius: float,
) -> _Pairs:
    """Check the edges against ``stage`` and lay their pairs out as flat arrays (self-edges dropped)."""
    ids = list(stage)
    index = {t: i for i, t in enumerate(ids)}
    edges = [e for e in point_edges if e.tile != e.neighbour]
    keys = [(e.tile, e.neighbour) for e in edges]
    if len(set(keys)) != len(keys):
        raise ValueError("point_edges repeat an edge (tile, neighbour): merge its points into one PointEdge")
    for e in edges:
        for t in (e.tile, e.neighbour):
            if t not in index:
                raise KeyError(f"edge {e.tile!r}–{e.neighbour!r}: tile {t!r} has no stage position")
    pairs = [_points(e) for e in edges]
    n, n_edges = len(ids), len(edges)
    counts = np.array([len(p) for p, _ in pairs], np.int64)
    m = int(counts.sum())
    edge_of = np.repeat(np.arange(n_edges), counts)
    p_raw = np.concatenate([p for p, _ in pairs]) if m else np.zeros((0, 2))
    q_raw = np.concatenate([q for _, q in pairs]) if m else np.zeros((0, 2))
    ends = np.array([[index[e.tile], index[e.neighbour]] for e in edges], np.int64).reshape(n_edges, 2)
    return _Pairs(
        ids=ids,
        keys=keys,
        ends=ends,
        counts=counts,
        edge_of=edge_of,
        p_raw=p_raw,
        q_raw=q_raw,
        p=p_raw - centre,
        q=q_raw - centre,
        a=ends[edge_of, 0],
        b=ends[edge_of, 1],
        w0=np.array([e.weight for e in edges], np.float64)[edge_of],
        s=np.array([stage[t] for t in ids], np.float64).reshape(n, 2),
        centre=centre,
        radius=radius,
    )


def _measured_match_sigma(pairs: _Pairs, agree: np.ndarray) -> float:
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
    pairs: _Pairs, frame: StageFrame, weight: float, edge_ok: np.ndarray, fit_stage_frame: bool
) -> _Solver:
    """The normal equations with the stage seen through ``frame`` and held with ``weight``."""
    n = pairs.n
    corners = frame.apply(pairs.s) if n else pairs.s
    origin = corners.mean(axis=0) if n else np.zeros(2)
    # the largest group's frame is left to the tiles (module docstring): the stage prior of its tiles
    # carries a free linear map about the group's centroid
    main = (components(n, pairs.ends[edge_ok]) == 0) if (fit_stage_frame and n) else np.zeros(n, bool)
    radius = pairs.radius
    return _Solver(
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


def _prior_links(
    rigid_weight: float, tile_spread: Mapping[str, float], match_sigma_px: float, radius: float
) -> dict[str, float]:
    """The priors' weights against one pair, from the tiles' spreads and σ_match."""
    link = {"rigid": rigid_weight}
    link.update({k: (match_sigma_px / (v * radius)) ** 2 for k, v in tile_spread.items()})
    link["frame"] = (match_sigma_px / STAGE_CALIBRATION) ** 2
    return link


def _measured_frame(
    pairs: _Pairs,
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
    pairs: _Pairs, edge_ok: np.ndarray, pair_ok: np.ndarray, degree: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Accept again every edge of a tile that lost most of its edges: before a more flexible model, such a
    tile is more likely distorted than all of them wrong."""
    lost = np.bincount(pairs.ends[~edge_ok].ravel(), minlength=pairs.n)
    again = (lost * 2 > degree)[pairs.ends].any(axis=1)
    return edge_ok | again, pair_ok | again[pairs.edge_of]


def _seen_tiles(pairs: _Pairs, weights: np.ndarray) -> np.ndarray:
    """The tiles some weighted pair touches: the ones whose spread the pairs say anything about."""
    return np.bincount(np.concatenate([pairs.a, pairs.b])[np.tile(weights, 2) > 0], minlength=pairs.n) > 0


def _trace_probes(count: int) -> int | None:
    """Hutchinson probes for the posterior variances of ``count`` tiles (None: sum them exactly). The
    estimate's relative error shrinks as 1/√(probes · tiles): a large montage needs few."""
    if count <= EXACT_TRACE_TILES:
        return None
    return int(np.clip(np.ceil(TRACE_PROBES * TRACE_PROBE_TILES / count), MIN_TRACE_PROBES, TRACE_PROBES))


def _fit_spreads(
    solver: _Solver,
    kind: str,
    pairs: _Pairs,
    weights: np.ndarray,
    tile_spread: dict[str, float],
    largest: Mapping[str, float],
    match_sigma_px: float,
    rigid_weight: float,
) -> tuple[dict[str, float], dict[str, float], int]:
    """EM for the spreads of the tiles' linear parts (type-II maximum likelihood), each kept between
    ``MIN_TILE_SPREAD`` and ``largest``: (spreads, the priors' weights from them, solves spent)."""
    tile_spread = dict(tile_spread)
    link = _prior_links(rigid_weight, tile_spread, match_sigma_px, pairs.radius)
    seen = _seen_tiles(pairs, weights)
    spent = 0
    for _ in range(SPREAD_ITERATIONS):
        spent += 1
        moments = solver.spread_moments(kind, link, weights, seen, match_sigma_px)
        if not moments:
            break
        new, settled = _em_step(tile_spread, moments, largest)
        tile_spread.update(new)
        link = _prior_links(rigid_weight, tile_spread, match_sigma_px, pairs.radius)
        if settled:
            break
    return tile_spread, link, spent


@dataclass(frozen=True)
class _Block:
    pairs: _Pairs  # the block's own, tiles renumbered
    pair_mask: np.ndarray  # which of the montage's pairs they are
    edge_mask: np.ndarray  # ... and edges
    tiles: np.ndarray  # the montage's indices of its tiles

    def solver(self, frame: StageFrame, weight: float, edge_ok: np.ndarray, fit_stage_frame: bool) -> _Solver:
        """The block's normal equations, with the montage's stage frame, prior weight and edge verdicts."""
        return _make_solver(self.pairs, frame, weight, edge_ok[self.edge_mask], fit_stage_frame)


def _spread_block(pairs: _Pairs) -> _Block | None:
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
    block = _Pairs(
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


def _reject_outliers(
    solve: Callable[[np.ndarray], Any],
    residuals: Callable[[Any], np.ndarray],
    pairs: _Pairs,
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
        per_edge = _edge_medians(r, edge_of, n_edges)
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
    point_edges: Iterable[PointEdge],
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
) -> TransformLayout:
    """Solve each tile's transform from ``point_edges`` anchored softly at the ``stage`` top-left corners (px).

    ``tile_size`` is ``(width, height)`` px of every tile: transforms act about the tile centre.
    ``stage_weight`` fixes the prior's weight against one pair (default: measured, module docstring);
    ``stage_sigma_px`` states the stage's error per reading instead of measuring it; ``fit_stage_frame``
    False trusts the stage's scale and rotation. ``rotation_sigma`` (rad) and ``deformation_sigma`` are the
    largest spreads of a tile's rotation and of its scale/shear the flexible models allow; ``fit_spread``
    measures the montage's own below them (module docstring), False uses them as they are. Edges naming a
    tile not in ``stage`` raise ``KeyError``; malformed points or a repeated edge ``ValueError``.
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
    pairs = _flatten_pairs(stage, point_edges, centre, radius)
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
    link = _prior_links(rigid_weight, tile_spread, match_sigma_px, radius)
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
                spreads, spent = _fit_separable_spreads(sample_solver, sample, weights, spreads, caps, sigma)
                # ... scaled to what predicts held-out pairs (em_platform.stitch.held_out)
                spreads, held_out = held_out_scale(
                    lambda w, s, solver=sample_solver, sigma=sigma: solver.solve(w, s, sigma),
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
                sample, sample_solver = pairs, solver
                # a preliminary pass's spreads only shape the separable pass's targets: a block will do;
                # a final model's (rigid) are its own and are measured on the whole montage
                if block is not None and not final:
                    sample, weights = block.pairs, weights[block.pair_mask]
                    sample_solver = block.solver(frame, weight_stage, edge_ok, fit_stage_frame)
                tile_spread, link, spent = _fit_spreads(
                    sample_solver, kind, sample, weights, tile_spread, largest, match_sigma_px, rigid_weight
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
            link = _prior_links(rigid_weight, tile_spread, match_sigma_px, radius)
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


def _fit_separable_spreads(
    separable: SeparableSolver,
    pairs: _Pairs,
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
    probes = _trace_probes(count)
    spent = 0
    for _ in range(SPREAD_ITERATIONS):
        spent += 1
        moments = separable.spread_moments(weights, spreads, match_sigma_px, seen, probes)
        new, settled = _em_step(spreads, moments, caps)
        spreads.update(new)
        if settled:
            break
    return spreads, spent


def _rotations(linear: np.ndarray) -> np.ndarray:
    """The turn of each tile's linear part (n, 2, 2), without its scale."""
    theta = np.arctan2(linear[:, 1, 0] - linear[:, 0, 1], linear[:, 0, 0] + linear[:, 1, 1])
    cos, sin = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def _separable_solver(
    pairs: _Pairs, solver: _Solver, kind: str, frame_link: float, similarity: np.ndarray | None
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
    pairs: _Pairs,
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
) -> TransformLayout:
    """The solved centres ``t`` and linear parts as transforms of the top-left corner, with the residuals
    (``vectors``, per pair), rejections and connected groups against the final verdicts; ``inliers``: the
    pairs that agree with their edge's consensus (what a RANSAC filter keeps), kept or not."""
    ids, keys, edge_of, n_edges, counts = pairs.ids, pairs.keys, pairs.edge_of, pairs.n_edges, pairs.counts
    n, m = pairs.n, pairs.m
    r = np.hypot(*vectors.T) if m else np.zeros(0)
    inlier_median = _edge_medians(r[inliers], edge_of[inliers], n_edges) if m else np.zeros(n_edges)
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


class _Solver:
    """The normal equations of one montage: point rows (built once) plus per-model priors.

    Unknowns per tile i, columns 6i…6i+5: (B00, B01, tx, B10, B11, ty) with B = R·A, so every column is in
    px and the point coordinates enter as u / R ∈ [−1, 1]. Pair k: x row 2k, y row 2k+1, each
    B·u/R + t (tile) − B·v/R − t (neighbour) = 0. Then, with tiles in ``main`` (the largest group), four
    columns 6n…6n+3: the stage frame's correction ``F`` (2×2, times the group's RMS extent ``L`` so that
    it too is in px); a main tile's stage prior reads ``t = g + F·z/L``, ``z`` its stage centre about the
    group's centroid, so the stage holds the group's position but neither its scale, shear nor rotation.
    """

    def __init__(self, n, m, u, v, a, b, radius, stage_centres, stage_weight, origin, main):
        self.n, self.radius, self.origin = n, radius, origin
        self.stage_centres, self.stage_weight = stage_centres, stage_weight
        self.main = np.asarray(main, bool)
        self.n_frame = 4 if self.main.sum() >= 2 else 0
        z = np.zeros((n, 2))
        if self.n_frame:
            z[self.main] = stage_centres[self.main] - stage_centres[self.main].mean(axis=0)
        self.extent = (
            max(1.0, float(np.sqrt((z[self.main] ** 2).sum(axis=1).mean()))) if self.n_frame else 1.0
        )
        self.z = z / self.extent  # RMS length 1 over the main group
        self.correction = np.zeros((2, 2))  # F / L of the last solve: the stage frame is (I + F/L)·G
        self._pairs = (m, u, v, a, b)
        self._factors = FactorCache()  # per model: its normal matrix keeps one pattern across reweightings

    @functools.cached_property
    def data(self):
        """The point rows (built on first use: the separable models never need them)."""
        from scipy.sparse import coo_matrix

        m, u, v, a, b = self._pairs
        x_cols = np.stack([6 * a, 6 * b, 6 * a + 1, 6 * b + 1, 6 * a + 2, 6 * b + 2], axis=1)
        vals = np.stack([u[:, 0], -v[:, 0], u[:, 1], -v[:, 1], np.ones(m), -np.ones(m)], axis=1)
        return coo_matrix(
            (
                np.hstack([vals, vals]).ravel(),
                (np.repeat(np.arange(2 * m), 6), np.hstack([x_cols, x_cols + 3]).ravel()),
            ),
            shape=(2 * m, 6 * self.n + self.n_frame),
        ).tocsc()

    def _system(self, kind: str, link: Mapping[str, float]):
        """The priors of one model (normal matrix and vector over the free unknowns) and the data part."""
        from scipy.sparse import coo_matrix, diags, vstack

        n, radius, size = self.n, self.radius, 6 * self.n + self.n_frame
        tile = np.arange(n)
        half = np.full(n, 0.5)
        # priors, one row per tile each: the stage (centre, with the frame's correction for the main
        # group) and the linear part in an orthogonal basis of deviations from the identity: scale,
        # rotation, anisotropy, shear
        if self.n_frame:
            f = 6 * n + np.arange(4)
            zx, zy = -self.z[:, 0], -self.z[:, 1]
            parts = [
                (
                    [6 * tile + 2, np.full(n, f[0]), np.full(n, f[1])],
                    [np.ones(n), zx, zy],
                    self.stage_centres[:, 0],
                    self.stage_weight,
                ),
                (
                    [6 * tile + 5, np.full(n, f[2]), np.full(n, f[3])],
                    [np.ones(n), zx, zy],
                    self.stage_centres[:, 1],
                    self.stage_weight,
                ),
            ]
        else:
            parts = [
                ([6 * tile + 2], [np.ones(n)], self.stage_centres[:, 0], self.stage_weight),
                ([6 * tile + 5], [np.ones(n)], self.stage_centres[:, 1], self.stage_weight),
            ]
        if kind != "translation":
            weight = {k: link[k] if k in FREED[kind] else link["rigid"] for k in LINEAR_PARTS}
            parts += [
                ([6 * tile, 6 * tile + 4], [half, half], np.full(n, radius), weight["scale"]),
                ([6 * tile + 3, 6 * tile + 1], [half, -half], np.zeros(n), weight["rotation"]),
                ([6 * tile, 6 * tile + 4], [half, -half], np.zeros(n), weight["anisotropy"]),
                ([6 * tile + 1, 6 * tile + 3], [half, half], np.zeros(n), weight["shear"]),
            ]
        blocks = [
            coo_matrix((np.concatenate(vs), (np.tile(tile, len(cs)), np.concatenate(cs))), shape=(n, size))
            for cs, vs, _, _ in parts
        ]
        weights = [np.full(n, w) for _, _, _, w in parts]
        targets = [g for _, _, g, _ in parts]
        if self.n_frame:  # the frame's correction: within a stage's calibration of the measured frame
            blocks.append(coo_matrix((np.ones(4), (np.arange(4), 6 * n + np.arange(4))), shape=(4, size)))
            weights.append(np.full(4, link["frame"] / self.extent**2))
            targets.append(np.zeros(4))
        reduce, fixed = self._reduction(kind)
        full_prior = vstack(blocks).tocsr()
        prior = (full_prior @ reduce).tocsr()
        prior_weight = np.concatenate(weights)
        target = np.concatenate(targets) - full_prior @ fixed
        data = self._reduced_data(kind)
        return _System(
            reduce=reduce,
            fixed=fixed,
            prior=prior,
            target=target,
            prior_normal=(prior.T @ diags(prior_weight) @ prior).tocsc(),
            prior_vector=prior.T @ (prior_weight * target),
            data=data,
            data_rhs=-(self.data @ fixed),
        )

    def _reduction(self, kind: str):
        """The model's unknowns ``y`` in the full ones: ``x = P·y + x₀`` (P sparse). A translation holds
        B at R·I (2 unknowns per tile); a similarity or rigid tile has B = [[a, −b], [b, a]] (4: a
        factor of 4² against 6² unknowns per tile costs ~30 % of the affine's); an affine frees all 6."""
        from scipy.sparse import coo_matrix, identity

        n, nf, size = self.n, self.n_frame, 6 * self.n + self.n_frame
        tile = np.arange(n)
        fixed = np.zeros(size)
        if kind == "affine":
            return identity(size, format="csr"), fixed
        frame_rows, frame_cols = 6 * n + np.arange(nf), np.arange(nf)
        if kind == "translation":
            fixed[0 : 6 * n : 6] = fixed[4 : 6 * n : 6] = self.radius
            rows = [6 * tile + 2, 6 * tile + 5, frame_rows]
            cols = [2 * tile, 2 * tile + 1, 2 * n + frame_cols]
            vals = [np.ones(n), np.ones(n), np.ones(nf)]
            k = 2 * n + nf
        else:  # (a, b, tx, ty) per tile
            rows = [
                6 * tile,
                6 * tile + 4,
                6 * tile + 1,
                6 * tile + 3,
                6 * tile + 2,
                6 * tile + 5,
                frame_rows,
            ]
            cols = [
                4 * tile,
                4 * tile,
                4 * tile + 1,
                4 * tile + 1,
                4 * tile + 2,
                4 * tile + 3,
                4 * n + frame_cols,
            ]
            vals = [np.ones(n), np.ones(n), -np.ones(n), np.ones(n), np.ones(n), np.ones(n), np.ones(nf)]
            k = 4 * n + nf
        reduce = coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(size, k)
        ).tocsr()
        return reduce, fixed

    def _reduced_data(self, kind: str):
        """The point rows over the model's unknowns (built once per model)."""
        cache = self.__dict__.setdefault("_reduced", {})
        if kind not in cache:
            cache[kind] = (self.data @ self._reduction(kind)[0]).tocsc()
        return cache[kind]

    def _unknowns(self, kind: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, radius = self.n, self.radius
        self.correction = x[6 * n :].reshape(2, 2) / self.extent if self.n_frame else np.zeros((2, 2))
        x = x[: 6 * n].reshape(n, 6)
        linear = x[:, [0, 1, 3, 4]].reshape(n, 2, 2) / radius
        if kind == "rigid":  # nearest rotation (polar decomposition), no reflection
            left, _, right = np.linalg.svd(linear)
            left[:, :, 1] *= np.sign(np.linalg.det(left @ right))[:, None]
            linear = left @ right
        return linear, x[:, [2, 5]] + self.origin

    def for_model(self, kind: str, link: Mapping[str, float]):
        """Weighted least squares for one model: pair weights → (linear parts, centre positions)."""
        system = self._system(kind, link)

        def solve(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            normal, vector = system.normal(weights)
            x = system.fixed.copy()
            if self.n:
                x += system.reduce @ self._factors.factor(kind, normal).solve(np.asarray(vector, np.float64))
            return self._unknowns(kind, x)

        return solve

    def spread_moments(
        self, kind: str, link: Mapping[str, float], weights: np.ndarray, tiles: np.ndarray, sigma: float
    ) -> dict[str, float]:
        """One EM step for the spreads of the linear parts the model frees: per part, the mean over
        ``tiles`` of (solved deviation² + its posterior variance), relative (divided by R²). The posterior
        variances are σ² · the diagonal of the inverse normal matrix: summed exactly for up to
        ``EXACT_TRACE_TILES`` tiles, else by Hutchinson's estimator (one factorisation either way)."""
        names = FREED[kind]
        count = int(np.count_nonzero(tiles))
        if not names or not count:
            return {}
        system = self._system(kind, link)
        normal, vector = system.normal(weights)
        k = _trace_probes(count)
        if k is None:
            probes, scale = np.eye(count), 1.0
        else:
            probes = np.random.default_rng(0).choice([-1.0, 1.0], (count, k))
            scale = 1.0 / k
        blocks = []
        for name in names:
            k = 2 + LINEAR_PARTS.index(name)  # the part's block of prior rows (after the stage's two)
            blocks.append(system.prior[k * self.n : (k + 1) * self.n][tiles])
        v = np.column_stack([vector] + [np.asarray(rows.T @ probes) for rows in blocks])
        x = solve_columns(self._factors.factor(kind, normal), v).reshape(len(vector), -1)
        out = {}
        for j, (name, rows) in enumerate(zip(names, blocks, strict=True)):
            k = 2 + LINEAR_PARTS.index(name)
            deviation = rows @ x[:, 0] - system.target[k * self.n : (k + 1) * self.n][tiles]
            columns = slice(1 + j * probes.shape[1], 1 + (j + 1) * probes.shape[1])
            trace = float(np.sum(v[:, columns] * x[:, columns])) * scale
            out[name] = (float(np.mean(deviation**2)) + sigma**2 * trace / count) / self.radius**2
        return out


@dataclass(frozen=True)
class _System:
    """One model's least-squares system over its free unknowns; ``normal`` adds the weighted pairs."""

    reduce: Any  # the full unknowns x = reduce·y + fixed (Solver._reduction)
    fixed: np.ndarray
    prior: Any  # sparse rows (tiles × parts, free columns)
    target: np.ndarray
    prior_normal: Any
    prior_vector: np.ndarray
    data: Any
    data_rhs: np.ndarray

    def normal(self, weights: np.ndarray):
        from scipy.sparse import diags

        # a pair weighed 0 keeps its place (1e-12): the pattern stays, a reweighting refactors numerically
        w2 = np.repeat(np.maximum(np.asarray(weights, np.float64), 1e-12), 2)
        normal = (self.data.T @ diags(w2) @ self.data).tocsc() + self.prior_normal
        return normal, self.data.T @ (w2 * self.data_rhs) + self.prior_vector
