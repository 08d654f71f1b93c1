"""Global montage solve with a translation, rigid or affine transform per tile, from matched point pairs.

Each accepted point pair says: tile point ``p`` and neighbour point ``q`` land on the same montage point,
``T_tile(p) = T_neighbour(q)``. With ``T(x) = A·(x − c) + t`` about the tile centre ``c`` every such
equation is linear in the six numbers of ``(A, t)``, so the montage is one sparse linear least-squares
problem (6 unknowns per tile, solved directly from the normal equations, as BigFeta solves em_stitch's
montages, seed-systems.md §1.4). Weak priors make it determined everywhere:

* ``stage_weight``: each tile centre is tied to its stage position, as in :func:`solve_translations`:
  it fixes the montage's free translation and places tiles no match reaches.
* ``linear_weight``: the linear part is pulled toward the identity (BigFeta's regularisation toward the
  starting transform), measured as the displacement it causes at the tile's corners, so the weight
  compares directly with a point pair's: a deviation ``δ`` costs as much as ``δ·R`` px of misfit,
  ``R`` = half the tile diagonal. It is needed, not cosmetic: the matcher's patches lie along the
  middle of each overlap strip, so a strip sees how the tiles map the direction *along* it but hardly
  the one across it, and an affine row or column of tiles may shear together at almost no cost in
  residual. The regularisation settles that; on synthetic truth it leaves tile corners about 1 px from
  their true places (residuals stay at the noise), where the translation model leaves about 2.5 px.
* ``model="rigid"``: scale, anisotropy and shear are held to zero by ``rigid_weight`` while rotation
  keeps the weak ``linear_weight``; the solved linear part is then projected to the nearest rotation
  (polar decomposition). A linearised small-rotation model (``cos θ ≈ 1``) would be off by about
  ``θ²/2·R`` (0.5 px for 1° at the corner of a 5000 px tile) and need Gauss–Newton iterations; here
  the solve stays linear and exact, and the projection only removes what the strong weight left
  (≤ 0.02 px at the corners even beside a tile mis-scaled by 3 %), so the translations need no re-solve.
* ``model="translation"``: ``A ≡ I``, the :func:`solve_translations` model at the level of points, so its
  residuals show what rotation or scale between tiles costs.

Bad point pairs are rejected as :func:`solve_translations` rejects edges: the solve is repeated with
Tukey-biweight weights, and a pair whose residual stays beyond ``max(outlier_px, mad_factor · MAD)`` is
dropped. An edge keeping fewer than ``min_edge_fraction`` of its pairs is wrong as a whole (wrong
neighbour, repeated texture) and is rejected with all of them; both are reported per edge. A flexible
tile can absorb a wrong edge by bending, so the judging goes from stiff to flexible models
(translation, then rigid; translation, similarity, then affine). A tile with only three edges (on the
montage border) can still bend to one wrong edge when other wrong ones are near; the QC's seam and
scale-distortion checks are the backstop.

Fusion places tiles by integer translation only: :attr:`TransformLayout.translations` (and
:meth:`TransformLayout.as_layout`) give the top-left corner that puts each tile's centre where its
transform does, and :attr:`TransformLayout.translation_error` how far a corner then is from where the
transform puts it; the rotation and scale of a tile are not applied to its pixels.

Dagster-free; the montage assets call :func:`solve_transforms`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from em_platform.stitch.solve import Layout, TileId, _outside_largest_group, _tukey

__all__ = ["Model", "PointEdge", "TransformLayout", "solve_transforms"]

Model = Literal["translation", "rigid", "affine"]
EdgeKey = tuple[TileId, TileId]
Solve = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # pair weights → (linear parts, centres)


@dataclass(frozen=True, eq=False)
class PointEdge:
    """Point pairs between two tiles: ``p[k]`` in the tile and ``q[k]`` in the neighbour are one specimen point.

    Coordinates are ``(x, y)`` px from each tile's top-left corner (a matcher ``Match``'s ``pX, pY`` and
    ``qX, qY``). ``weight`` (e.g. the match quality) applies to every pair, so an edge with more
    agreeing patches counts for more.
    """

    tile: TileId
    neighbour: TileId
    p: np.ndarray
    q: np.ndarray
    weight: float = 1.0


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
    tile_residuals: dict[TileId, float] = field(init=False)  # worst accepted edge of the tile (px)
    scale_distortion: dict[TileId, float] = field(init=False)  # max |s − 1|, s = singular values of A
    anisotropy: dict[TileId, float] = field(init=False)  # s_max / s_min (1 = no stretch)
    translations: dict[TileId, tuple[float, float]] = field(init=False)  # top-left corner for fusion
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

    def as_layout(self) -> Layout:
        """The translation-only :class:`Layout` fusion uses; residuals stay the model's own."""
        return Layout(
            positions=dict(self.translations),
            edge_residuals=dict(self.edge_residuals),
            rejected=dict(self.rejected),
            disconnected=list(self.disconnected),
            iterations=self.iterations,
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


def solve_transforms(
    stage: Mapping[TileId, tuple[float, float]],
    point_edges: Iterable[PointEdge],
    model: Model = "affine",
    *,
    tile_size: tuple[float, float],
    stage_weight: float = 1e-3,
    linear_weight: float = 0.1,
    rigid_weight: float = 1e5,
    outlier_px: float = 3.0,
    mad_factor: float = 6.0,
    min_edge_fraction: float = 0.5,
    max_iterations: int = 20,
) -> TransformLayout:
    """Solve each tile's transform from ``point_edges`` anchored softly at the ``stage`` top-left corners (px).

    Weights are relative to one point pair of weight 1. ``tile_size`` is ``(width, height)`` px of every
    tile: transforms act about the tile centre and the fusion translation keeps it in place.
    ``max_iterations`` bounds the solves of each judging stage; the result counts them all. Edges
    naming a tile not in ``stage`` raise ``KeyError``; malformed points or a repeated edge ``ValueError``.
    """
    from scipy.sparse import coo_matrix, diags, vstack
    from scipy.sparse.linalg import spsolve

    if model not in ("translation", "rigid", "affine"):
        raise ValueError(f"model must be 'translation', 'rigid' or 'affine', got {model!r}")
    width, height = (float(v) for v in tile_size)
    if not (width > 0 and height > 0):
        raise ValueError(f"tile_size must be a positive (width, height) in px, got {tile_size!r}")
    centre = np.array([width, height]) / 2
    radius = float(np.hypot(width, height) / 2)

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
    p = (np.concatenate([p for p, _ in pairs]) if m else np.zeros((0, 2))) - centre
    q = (np.concatenate([q for _, q in pairs]) if m else np.zeros((0, 2))) - centre
    a = np.array([index[e.tile] for e in edges], np.int64)[edge_of]
    b = np.array([index[e.neighbour] for e in edges], np.int64)[edge_of]
    w0 = np.array([e.weight for e in edges], np.float64)[edge_of]
    s = np.array([stage[t] for t in ids], np.float64).reshape(n, 2)
    origin = s.mean(axis=0) if n else np.zeros(2)  # solve near zero: better conditioned
    stage_centres = s + centre - origin

    # Unknowns per tile i, columns 6i…6i+5: (B00, B01, tx, B10, B11, ty) with B = R·A, so every column is
    # in px and the point coordinates enter as u / R ∈ [−1, 1]. Pair k: x row 2k, y row 2k+1, each
    # B·u/R + t (tile) − B·v/R − t (neighbour) = 0.
    u, v = p / radius, q / radius
    x_cols = np.stack([6 * a, 6 * b, 6 * a + 1, 6 * b + 1, 6 * a + 2, 6 * b + 2], axis=1)
    vals = np.stack([u[:, 0], -v[:, 0], u[:, 1], -v[:, 1], np.ones(m), -np.ones(m)], axis=1)
    data = coo_matrix(
        (
            np.hstack([vals, vals]).ravel(),
            (
                np.repeat(np.arange(2 * m), 6),
                np.hstack([x_cols, x_cols + 3]).ravel(),
            ),
        ),
        shape=(2 * m, 6 * n),
    ).tocsc()

    tile = np.arange(n)
    half = np.full(n, 0.5)

    def solver(kind: str) -> Solve:
        """Weighted least squares for one model: point weights → (linear parts, centre positions)."""
        # Priors, one row per tile each: the stage (tx, ty of the centre) and the linear part in an
        # orthogonal basis of deviations from the identity: scale, rotation, anisotropy, shear.
        parts = [
            ([6 * tile + 2], [np.ones(n)], stage_centres[:, 0], stage_weight),
            ([6 * tile + 5], [np.ones(n)], stage_centres[:, 1], stage_weight),
        ]
        free = np.ones(6 * n, bool)
        if kind == "translation":  # B held at R·I
            free[:] = False
            free[2::6] = free[5::6] = True
        else:
            scale, anisotropy, shear = {
                "rigid": (rigid_weight, rigid_weight, rigid_weight),
                "similarity": (linear_weight, rigid_weight, rigid_weight),
                "affine": (linear_weight, linear_weight, linear_weight),
            }[kind]
            parts += [
                ([6 * tile, 6 * tile + 4], [half, half], np.full(n, radius), scale),
                ([6 * tile + 3, 6 * tile + 1], [half, -half], np.zeros(n), linear_weight),  # rotation
                ([6 * tile, 6 * tile + 4], [half, -half], np.zeros(n), anisotropy),
                ([6 * tile + 1, 6 * tile + 3], [half, half], np.zeros(n), shear),
            ]
        prior = vstack(
            [
                coo_matrix(
                    (np.concatenate(vs), (np.tile(tile, len(cs)), np.concatenate(cs))), shape=(n, 6 * n)
                )
                for cs, vs, _, _ in parts
            ]
        ).tocsc()[:, free]
        prior_weight = np.concatenate([np.full(n, w) for _, _, _, w in parts])
        prior_normal = (prior.T @ diags(prior_weight) @ prior).tocsc()
        prior_vector = prior.T @ (prior_weight * np.concatenate([g for _, _, g, _ in parts]))
        fixed = np.zeros(6 * n)
        fixed[0::6] = fixed[4::6] = radius
        data_free, data_rhs = data[:, free], -(data[:, ~free] @ fixed[~free])

        def solve(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            w2 = np.repeat(weights, 2)
            normal = (data_free.T @ diags(w2) @ data_free).tocsc() + prior_normal
            x = fixed.copy()
            x[free] = np.atleast_1d(
                spsolve(normal, data_free.T @ (w2 * data_rhs) + prior_vector, permc_spec="MMD_AT_PLUS_A")
            )
            x = x.reshape(n, 6)
            linear = x[:, [0, 1, 3, 4]].reshape(n, 2, 2) / radius
            if kind == "rigid":  # nearest rotation (polar decomposition), no reflection
                left, _, right = np.linalg.svd(linear)
                left[:, :, 1] *= np.sign(np.linalg.det(left @ right))[:, None]
                linear = left @ right
            return linear, x[:, [2, 5]] + origin

        return solve

    def residuals(linear: np.ndarray, t: np.ndarray) -> np.ndarray:
        at_tile = np.einsum("kij,kj->ki", linear[a], p) + t[a]
        at_neighbour = np.einsum("kij,kj->ki", linear[b], q) + t[b]
        return np.hypot(*(at_tile - at_neighbour).T)

    def robust(solve: Solve, weights: np.ndarray, accepted: np.ndarray, budget: int) -> tuple:
        """Reweight and reject until the accepted pairs stop changing (at most ``budget`` solves)."""
        linear, t = solve(weights)
        edge_ok = np.ones(n_edges, bool)
        solves = 1
        while solves < budget and m:
            solves += 1
            r = residuals(linear, t)
            mad = float(np.median(r[accepted])) * 1.4826 if accepted.any() else 0.0
            limit = max(outlier_px, mad_factor * mad)
            within = r <= limit
            edge_ok = np.bincount(edge_of, within, minlength=n_edges) >= np.maximum(
                1.0, min_edge_fraction * counts
            )
            new_accepted = within & edge_ok[edge_of]  # a rejected edge loses all its pairs
            # Tukey weights within the limit keep a bad pair from pulling the solve while it is judged
            new_weights = np.where(new_accepted, w0 * _tukey(r, limit), 0.0)
            done = np.array_equal(new_accepted, accepted) and np.allclose(new_weights, weights, atol=1e-3)
            accepted, weights = new_accepted, new_weights
            linear, t = solve(np.where(accepted, w0, 0.0) if done else weights)
            if done:
                break
        return linear, t, weights, accepted, edge_ok, solves

    # Judge stiff to flexible (module docstring). Each stage starts from the previous stage's weights,
    # except that a tile which lost most of its edges gets them back: when all its neighbours disagree
    # with a tile alike, the tile itself is more likely distorted (which the next model may fit, e.g. a
    # 3 % scale error) than every one of its matches wrong.
    stages = {
        "translation": ["translation"],
        "rigid": ["translation", "rigid"],
        "affine": ["translation", "similarity", "affine"],
    }
    edge_tiles = np.array([[index[e.tile], index[e.neighbour]] for e in edges], np.int64).reshape(n_edges, 2)
    degree = np.bincount(edge_tiles.ravel(), minlength=n)
    weights, accepted, edge_ok = w0.copy(), np.ones(m, bool), np.ones(n_edges, bool)
    iterations = 0
    for kind in stages[model]:
        if iterations:
            lost = np.bincount(edge_tiles[~edge_ok].ravel(), minlength=n)
            again = (lost * 2 > degree)[edge_tiles].any(axis=1)[edge_of]
            weights, accepted = np.where(again, w0, weights), accepted | again
        linear, t, weights, accepted, edge_ok, solves = robust(
            solver(kind), weights, accepted, max_iterations
        )
        iterations += solves

    r = residuals(linear, t)
    squares = np.bincount(edge_of, np.where(accepted, r**2, 0.0), minlength=n_edges)
    kept = np.bincount(edge_of, accepted, minlength=n_edges)
    all_squares = np.bincount(edge_of, r**2, minlength=n_edges)
    corner = t - np.einsum("kij,j->ki", linear, centre)
    return TransformLayout(
        transforms={tid: np.column_stack([linear[i], corner[i]]) for i, tid in enumerate(ids)},
        tile_size=(width, height),
        model=model,
        edge_residuals={k: float(np.sqrt(squares[j] / kept[j])) for j, k in enumerate(keys) if edge_ok[j]},
        rejected={
            k: float(np.sqrt(all_squares[j] / counts[j])) for j, k in enumerate(keys) if not edge_ok[j]
        },
        rejected_points={
            k: int(counts[j] - kept[j]) for j, k in enumerate(keys) if edge_ok[j] and kept[j] < counts[j]
        },
        disconnected=_outside_largest_group(ids, [k for k, ok in zip(keys, edge_ok, strict=True) if ok]),
        iterations=iterations,
    )
