"""The normal equations of a montage's per-tile transforms, with the priors that make them determined.

A point pair says tile point ``p`` and neighbour point ``q`` are one specimen point, ``T_tile(p) =
T_neighbour(q)``. With ``T(x) = A·(x − c) + t`` about the tile centre ``c`` that is linear in the six numbers
of ``(A, t)``, so the montage is one sparse least-squares problem, solved directly from its normal
equations as BigFeta solves em_stitch's montages (docs/seed-systems.md §1.4). Priors, each weighted against
one point pair:

* **stage**: each tile centre is tied to its stage position in the image frame. Within the largest
  connected group the prior carries a free linear map ``F`` (the frame's correction): a common scale,
  shear or rotation of every tile changes no point pair, and without ``F`` the stage's noise sets it
  (100 readings of σ 2 px fit a shear of ~3·10⁻⁴ that rows of affine tiles followed, 1.6 px at the far
  corner). With ``F`` the group's frame is the images' own.
* **linear part**: pulled toward the identity, per part (scale, rotation, anisotropy, shear) with the
  spread the montage shows (:mod:`em_platform.stitch.tile_priors`). The matcher's patches lie along each
  overlap strip, which hardly sees how a tile maps the direction across it: unregularised, rows of affine
  tiles shear together at almost no cost (the 1.8 px drift of issue 14).

A translation has 2 unknowns per tile, a rigid or similarity tile 4 (``A = [[a, −b], [b, a]]``: a factor
~⅓ of 6 unknowns' cost); a rigid tile's solved linear part is projected to the nearest rotation. Dagster-free.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from em_platform.stitch.ldl import FactorCache, solve_columns

LINEAR_PARTS = ("scale", "rotation", "anisotropy", "shear")
FREED = {
    "translation": (),
    "rigid": ("rotation",),
    "similarity": ("scale", "rotation"),
    "affine": LINEAR_PARTS,
}
TRACE_PROBES = 16  # Hutchinson probes for the posterior variances of a large montage's tile parameters
TRACE_PROBE_TILES = 400  # ... up to this many tiles; fewer beyond (the 4,969-tile TEMCA montage: 4)
MIN_TRACE_PROBES = 4
EXACT_TRACE_TILES = 64  # up to this many tiles the posterior variances are summed exactly


def trace_probes(count: int) -> int | None:
    """Hutchinson probes for the posterior variances of ``count`` tiles (None: sum them exactly). The
    estimate's relative error shrinks as 1/√(probes · tiles): a large montage needs few."""
    if count <= EXACT_TRACE_TILES:
        return None
    return int(np.clip(np.ceil(TRACE_PROBES * TRACE_PROBE_TILES / count), MIN_TRACE_PROBES, TRACE_PROBES))


class NormalEquations:
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
        k = trace_probes(count)
        probes: np.ndarray
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

    reduce: Any  # the full unknowns x = reduce·y + fixed (NormalEquations._reduction)
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
