"""Per-tile affine or polynomial maps as one regularised least-squares problem per image axis.

A tile's montage x is a polynomial of its own point, and so is its montage y, with separate coefficients:
``x' = Σ_j X[j]·φ_j(u)``, ``y' = Σ_j Y[j]·φ_j(u)``, ``u = (point − tile centre)/R`` and the basis
``φ = 1, u, v`` (affine) or ``1, u, v, u², uv, v²`` (polynomial, order 2, em_stitch's best model). A point
pair then gives one equation in the tile's and the neighbour's X only and one in their Y only, with the
same coefficients: the two axes are two sparse problems over one data matrix, as BigFeta solves a montage (docs/seed-systems.md
§1.4): 3 or 6 unknowns per tile against the 6 of a coupled affine system, one LDLᵀ factorisation (QDLDL)
for both axes, refactored numerically as the pair weights change.

Priors, each a weight against one point pair:

* **stage**: the constant term at the tile's stage centre in the measured stage frame, plus, for the
  largest connected group, a free correction of that frame (2 unknowns per axis, held within a stage's
  calibration): the stage places the group but does not shape it (:mod:`em_platform.stitch.solve_affine`);
* **linear terms** toward each tile's ``target`` (the turn the coupled similarity pass solved; the identity
  without one), one spread for the diagonal entries (scale, anisotropy) and one for
  the off-diagonal ones (rotation, shear), each measured from the montage (type-II maximum likelihood,
  :meth:`SeparableSolver.spread_moments`) and never above what real tiles may have, so that rows of tiles
  cannot shear together for free and a montage with one pair per edge keeps its tiles square;
* **quadratic terms** toward 0 with their own spread (a tile's bend at its corner, relative), measured too.

The coefficients are in px (``X[j]`` = the change of montage x over a tile half-diagonal R along φ_j).
Dagster-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from em_platform.stitch.ldl import FactorCache

__all__ = ["BASIS_SIZE", "SeparableSolver", "basis", "raw_coefficients"]

BASIS_SIZE = {"translation": 1, "affine": 3, "polynomial": 6}  # translation: the linear part held at I


def basis(u: np.ndarray, size: int) -> np.ndarray:
    """``φ(u)`` (m, size) of points ``u`` (m, 2), normalised about the tile centre."""
    x, y = u[:, 0], u[:, 1]
    cols = [np.ones(len(u)), x, y, x * x, x * y, y * y]
    return np.stack(cols[:size], axis=1)


def spread_class(axis: int, j: int) -> str:
    """Which spread holds coefficient ``j`` of ``axis``: the linear part's diagonal (scale, anisotropy) or
    off-diagonal entries (rotation, shear), or the quadratic terms."""
    return "quadratic" if j >= 3 else ("diagonal" if j == 1 + axis else "off_diagonal")


def raw_coefficients(coefficients: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """Coefficients (n, 2, 6) of normalised basis functions about ``centre`` → the same maps as
    render's Polynomial2DTransform holds them: on raw tile px from the top-left corner, order
    ``1, x, y, x², xy, y²``."""
    c = np.zeros(coefficients.shape[:2] + (6,))
    c[..., : coefficients.shape[2]] = coefficients
    cx, cy, r = float(centre[0]), float(centre[1]), float(radius)
    a0, a1, a2, a3, a4, a5 = (c[..., j] for j in range(6))
    # substitute u = (x − cx)/r, v = (y − cy)/r and collect powers of x and y
    out = np.empty_like(c)
    out[..., 3] = a3 / r**2
    out[..., 4] = a4 / r**2
    out[..., 5] = a5 / r**2
    out[..., 1] = a1 / r - 2 * a3 * cx / r**2 - a4 * cy / r**2
    out[..., 2] = a2 / r - a4 * cx / r**2 - 2 * a5 * cy / r**2
    out[..., 0] = a0 - a1 * cx / r - a2 * cy / r + a3 * cx**2 / r**2 + a4 * cx * cy / r**2 + a5 * cy**2 / r**2
    return out


@dataclass
class SeparableSolver:
    """The montage's two per-axis problems. ``u``, ``v``: each pair's point in its tile and in its neighbour
    (normalised about the centre); ``a``, ``b``: their tile indices; ``stage_centres`` (n, 2) px about
    ``origin`` in the image frame; ``main`` marks the largest connected group (its frame is the tiles')."""

    n: int
    size: int
    u: np.ndarray
    v: np.ndarray
    a: np.ndarray
    b: np.ndarray
    radius: float
    stage_centres: np.ndarray
    stage_weight: float
    origin: np.ndarray
    main: np.ndarray
    frame_weight: float
    target: np.ndarray | None = None  # (n, 2, 2): each tile's linear part is pulled toward it (default I)

    def __post_init__(self) -> None:
        from scipy.sparse import csr_matrix

        n, k, m = self.n, self.size, len(self.a)
        self.n_frame = 2 if int(np.count_nonzero(self.main)) >= 2 else 0
        z = np.zeros((n, 2))
        if self.n_frame:
            z[self.main] = self.stage_centres[self.main] - self.stage_centres[self.main].mean(axis=0)
        self.extent = (
            max(1.0, float(np.sqrt((z[self.main] ** 2).sum(axis=1).mean()))) if self.n_frame else 1.0
        )
        self.z = z / self.extent
        cols = np.concatenate(
            [self.a[:, None] * k + np.arange(k), self.b[:, None] * k + np.arange(k)], axis=1
        )
        vals = np.concatenate([basis(self.u, k), -basis(self.v, k)], axis=1)
        self.data = csr_matrix(
            (vals.ravel(), (np.repeat(np.arange(m), 2 * k), cols.ravel())), shape=(m, n * k + self.n_frame)
        )
        self.correction = np.zeros((2, 2))
        if self.target is None:
            self.target = np.broadcast_to(np.eye(2), (n, 2, 2))

    def _linear_target(self, axis: int, j: int) -> np.ndarray | float:
        """Where coefficient ``j`` of ``axis`` is pulled (px): the tile's target linear part, else 0."""
        assert self.target is not None  # __post_init__ sets it
        return self.radius * self.target[:, axis, j - 1] if j in (1, 2) else 0.0

    def _priors(self, axis: int, spreads: dict[str, float], match_sigma_px: float):
        """Diagonal prior rows of one axis: (normal matrix, vector) over its unknowns."""
        from scipy.sparse import coo_matrix

        n, k, r = self.n, self.size, self.radius
        size = n * k + self.n_frame
        tile = np.arange(n)

        def link(spread: float) -> float:  # a coefficient `spread`·R px off costs as a pair σ_match off
            return (match_sigma_px / (spread * r)) ** 2

        rows, cols, vals, weights, targets = [], [], [], [], []
        # the stage: X[i, 0] − z_i·F = stage centre
        rows.append(np.repeat(tile, 1 + self.n_frame))
        if self.n_frame:
            cols.append(np.stack([tile * k, np.full(n, n * k), np.full(n, n * k + 1)], 1).ravel())
            vals.append(np.stack([np.ones(n), -self.z[:, 0], -self.z[:, 1]], 1).ravel())
        else:
            cols.append(tile * k)
            vals.append(np.ones(n))
        weights.append(np.full(n, self.stage_weight))
        targets.append(self.stage_centres[:, axis])
        row = n
        for j in range(1, k):
            kind = spread_class(axis, j)
            rows.append(row + tile)
            cols.append(tile * k + j)
            vals.append(np.ones(n))
            weights.append(np.full(n, link(spreads[kind])))
            targets.append(np.broadcast_to(self._linear_target(axis, j), (n,)))
            row += n
        if self.n_frame:  # the frame's correction: within a stage's calibration of the measured frame
            rows.append(row + np.arange(2))
            cols.append(n * k + np.arange(2))
            vals.append(np.ones(2))
            weights.append(np.full(2, self.frame_weight / self.extent**2))
            targets.append(np.zeros(2))
            row += 2
        prior = coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(row, size)
        ).tocsr()
        w = np.concatenate(weights)
        t = np.concatenate(targets)
        return (prior.T.multiply(w) @ prior).tocsc(), prior.T @ (w * t)

    def solve(self, weights: np.ndarray, spreads: dict[str, float], match_sigma_px: float):
        """Pair weights → coefficients (n, 2, size), px (the constant term about ``origin``)."""
        # a pair weighed 0 still keeps its place in the matrix (1e-12): the sparsity pattern stays, so
        # each reweighting only refactors numerically
        weights = np.maximum(np.asarray(weights, np.float64), 1e-12)
        data_normal = (self.data.T.multiply(weights) @ self.data).tocsc()
        out = np.zeros((self.n * self.size + self.n_frame, 2))
        priors = [self._priors(axis, spreads, match_sigma_px) for axis in (0, 1)]
        # one spread for every linear entry gives both axes one matrix: one factorisation, two right sides
        same = _equal(priors[0][0], priors[1][0])
        used = []
        for axis, (prior_normal, prior_vector) in enumerate(priors):
            if self.size == 1:  # t_tile − t_neighbour = R·(v − u): the identity's part moved to the right
                prior_vector = prior_vector + self.data.T @ (
                    weights * self.radius * (self.v - self.u)[:, axis]
                )
            if axis == 0 or not same:
                factor = self._factor(axis, (data_normal + prior_normal).tocsc())
            used.append(factor)
            out[:, axis] = factor.solve(np.asarray(prior_vector, np.float64))
        self._factors_used = used
        coefficients = out[: self.n * self.size].reshape(self.n, self.size, 2).transpose(0, 2, 1).copy()
        self.correction = out[self.n * self.size :].T / self.extent if self.n_frame else np.zeros((2, 2))
        coefficients[:, :, 0] += self.origin
        return coefficients

    def spread_moments(
        self,
        weights: np.ndarray,
        spreads: dict[str, float],
        match_sigma_px: float,
        tiles: np.ndarray,
        probes: int | None,
    ) -> dict[str, float]:
        """One EM step for the spreads (type-II maximum likelihood): per class, the mean over ``tiles`` of
        (solved deviation² + its posterior variance) / R². The variances are σ²·diag(N⁻¹), summed by
        Hutchinson's estimator with ``probes`` ±1 vectors on the factor the solve leaves (``None``: exactly,
        one unit vector per tile)."""
        coefficients = self.solve(weights, spreads, match_sigma_px)
        coefficients[:, :, 0] -= self.origin
        k, n, r = self.size, self.n, self.radius
        count = int(np.count_nonzero(tiles))
        rng = np.random.default_rng(0)
        sums: dict[str, list[float]] = {}
        for axis in (0, 1):
            factor = self._factors_used[axis]
            for j in range(1, k):
                kind = spread_class(axis, j)
                target = np.broadcast_to(self._linear_target(axis, j), (n,))[tiles]
                deviation = coefficients[tiles, axis, j] - target
                columns = count if probes is None else probes
                z = np.zeros((n * k + self.n_frame, columns))
                z[np.flatnonzero(tiles) * k + j] = (
                    np.eye(count) if probes is None else rng.choice([-1.0, 1.0], (count, probes))
                )
                trace = sum(float(z[:, c] @ factor.solve(z[:, c])) for c in range(columns)) / (
                    1 if probes is None else probes
                )
                acc = sums.setdefault(kind, [0.0, 0])
                acc[0] += float((deviation**2).sum()) + match_sigma_px**2 * trace
                acc[1] += count
        return {kind: total / max(c, 1) / r**2 for kind, (total, c) in sums.items()}

    def _factor(self, axis: int, normal):
        """The LDLᵀ factor of one axis' normal matrix, refactored numerically when only the values changed."""
        return self.__dict__.setdefault("_factors", FactorCache()).factor(axis, normal)

    def residual_vectors(self, coefficients: np.ndarray) -> np.ndarray:
        """Per pair: where the tile's map puts its point minus where the neighbour's puts its own."""
        k = self.size
        at_tile = np.einsum("mij,mj->mi", coefficients[self.a], basis(self.u, k))
        at_neighbour = np.einsum("mij,mj->mi", coefficients[self.b], basis(self.v, k))
        if k == 1:
            return at_tile - at_neighbour + self.radius * (self.u - self.v)
        return at_tile - at_neighbour


def _equal(a, b) -> bool:
    """Two sparse matrices hold the same entries in the same places."""
    a, b = a.tocsc(), b.tocsc()
    a.sort_indices()
    b.sort_indices()
    return (
        a.shape == b.shape
        and np.array_equal(a.indptr, b.indptr)
        and np.array_equal(a.indices, b.indices)
        and np.array_equal(a.data, b.data)
    )
