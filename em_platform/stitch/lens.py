"""Lens distortion shared by every tile of a scope: a polynomial correction, estimated from one montage's overlaps.

A camera behind a TEM's projector lenses records specimen point ``u`` (ideal, undistorted tile pixels) at
pixel ``x``; the correction maps back: ``u = x + D(x)``, with ``D`` a polynomial of order 2…``order`` in the
normalised coordinates ``ξ = (x − c) / s`` (``c`` the tile centre, ``s`` half the longer side), each
coefficient in pixels. Constant and linear terms are left out: they are a tile's own translation and
linear map, which the montage solve owns (em_stitch's mesh lens correction likewise fixes them by its
regularisation; docs/seed-systems.md §1.4).

Estimation (:func:`estimate_lens`): every matched point pair ``(p, q)`` of two tiles says ``R_tile (p +
D(p) − c) + t_tile = R_neighbour (q + D(q) − c) + t_neighbour`` (a rigid transform per tile about its
centre ``c``, one ``D`` for all). The rotations are small (a scope's tiles are turned by fractions of a
degree), so ``R ≈ I + θ J`` (``J`` the quarter turn; the error, ``θ²/2`` of the radius, is 0.02 px at 0.5°
across a 1024-px tile): linear in the coefficients, the angles and the translations, solved in one sparse
least-squares problem with a small ridge on the coefficients. A translation per tile alone
(``model="translation"``) lets the lens absorb the tiles' rotations: matches of ±0.5° tiles and no lens
(0.2 px noise per point) read as an 8-px "lens" on 50 × 50 tiles of 1024² that way, 0.24 px with rigid
tiles (tests/stitch/test_lens.py).
Overlap strips see only the odd part of ``D`` across each edge (a point at ``+a`` from the centre pairs
with one at ``−a``), so the parts no overlap can tell stay at zero rather than at noise; radial
(barrel/pincushion) and decentering distortion are seen in full. Pair weights are iterated (Tukey) so a
wrong match cannot bend the model.

Stored as JSON (:meth:`LensModel.to_dict`) and exported for render/BigFeta as
``mpicbg.trakem2.transform.PolynomialTransform2D`` (:meth:`LensModel.render_transform`), the leaf
transform em_stitch's polynomial montage solves write. Dagster-free.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LENS_FORMAT", "LensFit", "LensModel", "estimate_lens", "monomials"]

LENS_FORMAT = "em_platform/lens-correction/1"


def monomials(order: int, lowest: int = 2) -> list[tuple[int, int]]:
    """Exponents ``(a, b)`` of ``ξ^a η^b`` for ``lowest ≤ a + b ≤ order``, in render's order (by degree, then
    falling power of x)."""
    return [(d - k, k) for d in range(lowest, order + 1) for k in range(d + 1)]


def _size(values: Iterable[Any]) -> tuple[int, int]:
    """A tile's ``(width, height)`` px as ints."""
    width, height = (int(v) for v in values)
    return width, height


@dataclass(frozen=True, eq=False)
class LensModel:
    """``u = x + D(x)``: the correction from recorded tile pixels ``x`` to undistorted ones ``u``."""

    tile_size: tuple[int, int]  # (width, height) px
    order: int
    coefficients: np.ndarray  # (2, n_terms) px: rows D_x, D_y over monomials(order)

    def __post_init__(self) -> None:
        c = np.asarray(self.coefficients, np.float64)
        n = len(monomials(self.order))
        if c.shape != (2, n):
            raise ValueError(f"a lens model of order {self.order} needs (2, {n}) coefficients, got {c.shape}")
        object.__setattr__(self, "coefficients", c)

    @classmethod
    def identity(cls, tile_size: tuple[int, int], order: int = 3) -> LensModel:
        return cls(_size(tile_size), order, np.zeros((2, len(monomials(order)))))

    @classmethod
    def radial(cls, tile_size: tuple[int, int], k1: float, p1: float = 0.0, p2: float = 0.0) -> LensModel:
        """Brown–Conrady radial ``k1`` and decentering ``p1, p2`` terms (in units of ``s``) as a polynomial."""
        s = max(tile_size) / 2
        terms = monomials(3)
        c = np.zeros((2, len(terms)))
        add = {  # (axis, exponents) → coefficient / s
            (0, (3, 0)): k1, (0, (1, 2)): k1, (1, (2, 1)): k1, (1, (0, 3)): k1,
            (0, (1, 1)): 2 * p1, (0, (2, 0)): 3 * p2, (0, (0, 2)): p2,
            (1, (2, 0)): p1, (1, (0, 2)): 3 * p1, (1, (1, 1)): 2 * p2,
        }  # fmt: skip
        for (axis, e), v in add.items():
            c[axis, terms.index(e)] += v * s
        return cls(_size(tile_size), 3, c)

    @property
    def centre(self) -> np.ndarray:
        return (np.array(self.tile_size, np.float64) - 1) / 2

    @property
    def scale(self) -> float:
        return max(self.tile_size) / 2

    def basis(self, xy: np.ndarray) -> np.ndarray:
        """The monomials at tile points ``xy`` (n, 2): (n, n_terms)."""
        xi = (np.asarray(xy, np.float64) - self.centre) / self.scale
        return np.stack([xi[:, 0] ** a * xi[:, 1] ** b for a, b in monomials(self.order)], axis=1)

    def displacement(self, xy: np.ndarray) -> np.ndarray:
        """``D(x)`` (n, 2) px at tile points ``xy`` (n, 2)."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        return self.basis(xy) @ self.coefficients.T

    def correct(self, xy: np.ndarray) -> np.ndarray:
        """Undistorted coordinates ``x + D(x)`` of recorded tile points."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        return xy + self.displacement(xy)

    def distort(self, uv: np.ndarray, iterations: int = 6) -> np.ndarray:
        """The recorded pixel ``x`` showing undistorted point ``u`` (the inverse, by fixed-point iteration;
        converges for the few-pixel distortions of real lenses)."""
        uv = np.asarray(uv, np.float64).reshape(-1, 2)
        x = uv.copy()
        for _ in range(iterations):
            x = uv - self.displacement(x)
        return x

    def max_displacement(self, grid: int = 33) -> float:
        """Largest ``|D|`` over the tile (px)."""
        w, h = self.tile_size
        gx, gy = np.meshgrid(np.linspace(0, w - 1, grid), np.linspace(0, h - 1, grid))
        return float(np.hypot(*self.displacement(np.column_stack([gx.ravel(), gy.ravel()])).T).max())

    def is_identity(self) -> bool:
        return not np.any(self.coefficients)

    # -- storage and interop ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LENS_FORMAT,
            "model": "polynomial",
            "tile_size": list(self.tile_size),
            "order": self.order,
            "definition": "u = x + D(x); D = sum c * xi^a * eta^b, xi = (x - (w-1)/2) / (max(w,h)/2)",
            "terms": [list(t) for t in monomials(self.order)],
            "coefficients_x": self.coefficients[0].tolist(),
            "coefficients_y": self.coefficients[1].tolist(),
            "max_displacement_px": round(self.max_displacement(), 4),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> LensModel:
        if doc.get("format") != LENS_FORMAT:
            raise ValueError(f"not a lens correction (format {doc.get('format')!r}, expected {LENS_FORMAT})")
        return cls(
            _size(doc["tile_size"]),
            int(doc["order"]),
            np.array([doc["coefficients_x"], doc["coefficients_y"]], np.float64),
        )

    def raw_polynomial(self) -> np.ndarray:
        """The correction ``x + D(x)`` as a full polynomial in raw tile pixels, in render's monomial order
        (1, x, y, x², xy, y², …): (2, n) coefficients of ``mpicbg…PolynomialTransform2D``."""
        order = self.order
        raw = monomials(order, lowest=0)
        out = np.zeros((2, len(raw)))
        cx, cy = self.centre
        s = self.scale
        out[0, raw.index((1, 0))] = 1.0
        out[1, raw.index((0, 1))] = 1.0
        for (a, b), cxy in zip(monomials(order), self.coefficients.T, strict=True):
            # ((x − cx)/s)^a ((y − cy)/s)^b expanded binomially
            for i in range(a + 1):
                for j in range(b + 1):
                    k = math.comb(a, i) * math.comb(b, j) * (-cx) ** (a - i) * (-cy) ** (b - j) / s ** (a + b)
                    out[:, raw.index((i, j))] += k * cxy
        return out

    def render_transform(self) -> dict[str, Any]:
        """The correction as a render tilespec leaf transform (applied before a tile's affine)."""
        data = " ".join(repr(float(v)) for v in self.raw_polynomial().ravel())
        return {
            "type": "leaf",
            "className": "mpicbg.trakem2.transform.PolynomialTransform2D",
            "dataString": data,
        }


@dataclass(frozen=True)
class LensFit:
    """An estimated lens model with the evidence: residual per point pair before and after (px)."""

    model: LensModel
    pairs: int
    tiles: int
    residual_before_px: float  # mean |residual| per point pair, the same solve without correction
    residual_after_px: float  # … with it
    rejected_pairs: int
    held_out_px: dict[int, float] = dataclasses.field(default_factory=dict)  # order="auto": per order

    def summary(self) -> dict[str, Any]:
        return {
            "order": self.model.order,
            "held_out_residual_px_by_order": {str(k): round(v, 4) for k, v in self.held_out_px.items()},
            "pairs": self.pairs,
            "tiles": self.tiles,
            "rejected_pairs": self.rejected_pairs,
            "residual_mean_px_before": round(self.residual_before_px, 4),
            "residual_mean_px_after": round(self.residual_after_px, 4),
            "max_displacement_px": round(self.model.max_displacement(), 4),
        }


LENS_CONSENSUS_PX = 100.0  # how far a lens may move an edge's pairs off one similarity (em_stitch's lens
# example: 64 px at the corners; at the montage solve's 10 px, 78 % of its pairs, the outer ones, were lost)


def _consensus_pairs(edges: list[Any]) -> list[Any]:
    """The edges with only the pairs that agree with their edge's consensus (:mod:`em_platform.stitch.loops`)
    within ``LENS_CONSENSUS_PX``: a wrong pair hundreds of px off would bend the lens before the robust
    weights see it; the robust weights judge the rest."""
    from em_platform.stitch.loops import edge_consensus

    p = np.concatenate([np.asarray(e.p, np.float64) for e in edges])
    q = np.concatenate([np.asarray(e.q, np.float64) for e in edges])
    edge_of = np.repeat(np.arange(len(edges)), [len(e.p) for e in edges])
    _, agree = edge_consensus(p, q, edge_of, len(edges), LENS_CONSENSUS_PX)
    out = []
    for e, keep in zip(edges, np.split(agree, np.cumsum([len(e.p) for e in edges])[:-1]), strict=True):
        if keep.any():
            out.append(dataclasses.replace(e, p=np.asarray(e.p)[keep], q=np.asarray(e.q)[keep]))
    return out


LENS_ORDERS = (2, 3, 4, 5)  # the orders `order="auto"` chooses from


def estimate_lens(
    point_edges: Iterable[Any],
    tile_size: tuple[int, int],
    *,
    order: int | str = "auto",
    ridge: float = 1e-2,
    outlier_px: float = 2.0,
    iterations: int = 6,
    model: str = "rigid",
) -> LensFit:
    """Estimate the scope's lens correction from a montage's matched point pairs (``PointEdge``-like:
    ``tile``, ``neighbour``, ``p``, ``q`` in tile pixels), solving a rigid transform per tile alongside
    (``model="translation"``: a translation only).

    ``order`` ``"auto"`` takes the one of ``LENS_ORDERS`` with the lowest held-out residual: each edge's
    pairs alternate between a half that fits and a half that scores (a higher order always fits its own
    pairs better; only pairs it did not see tell whether it bends to noise). ``ridge`` (px² per coefficient
    px²) keeps what the overlaps cannot see at zero. Needs point pairs on both kinds of edges (left/right
    and top/bottom) of a few tiles; raises ValueError otherwise.
    """
    if model not in ("rigid", "translation"):
        raise ValueError(f"model {model!r}: the lens is estimated with rigid or translation tiles")
    edges = [e for e in point_edges if e.tile != e.neighbour and len(e.p)]
    if len(edges) < 2:
        raise ValueError(
            "a lens correction needs point pairs of at least two tile pairs; match a montage first"
        )
    edges = _consensus_pairs(edges)
    held_out: dict[int, float] = {}
    if order == "auto":
        fitting = [dataclasses.replace(e, p=np.asarray(e.p)[0::2], q=np.asarray(e.q)[0::2]) for e in edges]
        scoring = [
            dataclasses.replace(e, p=np.asarray(e.p)[1::2], q=np.asarray(e.q)[1::2])
            for e in edges
            if len(e.p) > 1
        ]
        if len(scoring) < 2:
            raise ValueError("choosing the lens order needs edges of two point pairs or more: give an order")
        for candidate in LENS_ORDERS:
            fit = _LensSolve(fitting, tile_size, candidate, ridge, model == "rigid")
            x, _ = fit.robust(True, outlier_px, iterations)
            r = fit.residuals_of(scoring, x)
            held_out[candidate] = float(r[r < _outlier_limit(r, outlier_px)].mean())
        order = min(held_out, key=held_out.__getitem__)
    solve = _LensSolve(edges, tile_size, int(order), ridge, model == "rigid")
    _, before = solve.robust(False, outlier_px, iterations)
    x, after = solve.robust(True, outlier_px, iterations)
    kept = after < _outlier_limit(after, outlier_px)
    k = solve.k
    return LensFit(
        model=LensModel(solve.model0.tile_size, int(order), np.vstack([x[:k], x[k : 2 * k]])),
        pairs=solve.m,
        tiles=solve.n,
        residual_before_px=float(before[before < _outlier_limit(before, outlier_px)].mean()),
        residual_after_px=float(after[kept].mean()),
        rejected_pairs=int((~kept).sum()),
        held_out_px=held_out,
    )


def _outlier_limit(residuals: np.ndarray, outlier_px: float) -> float:
    """Beyond this a pair is an outlier: ``outlier_px``, or 4 robust standard deviations if more."""
    return max(outlier_px, 4.0 * 1.4826 * float(np.median(residuals)))


def parse_lens_order(text: str) -> int | str:
    """A lens order as a user writes it (CLI, run config): ``"auto"`` or a degree 2–8; ValueError names it."""
    value = str(text).strip().lower()
    if value == "auto":
        return value
    if not (value.isdigit() and 2 <= int(value) <= 8):
        raise ValueError(f"lens order {text!r} is neither auto nor a degree from 2 to 8")
    return int(value)


class _LensSolve:
    """The lens coefficients and a rigid transform (or a translation) per tile as one sparse least-squares
    problem over a montage's point pairs."""

    def __init__(self, edges: list[Any], tile_size: tuple[int, int], order: int, ridge: float, rigid: bool):
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        self.model0 = LensModel.identity(tile_size, order)
        self.ids = sorted({t for e in edges for t in (e.tile, e.neighbour)}, key=repr)
        self.index = {t: i for i, t in enumerate(self.ids)}
        self.rigid = rigid
        self.n, self.k = len(self.ids), len(monomials(order))
        self.design, self.rhs, self.m = self._design(edges)
        a = np.concatenate([np.full(len(e.p), self.index[e.tile]) for e in edges])
        b = np.concatenate([np.full(len(e.p), self.index[e.neighbour]) for e in edges])
        k, n = self.k, self.n
        # a tile whose every pair the robust weights drop stays where it is (not a singular system)
        gauge = np.full(self.design.shape[1], 1e-9)
        gauge[: 2 * k] = ridge
        # the first tile's translation (and angle) pinned in each group the pairs tie together (blank
        # tiles can split a montage): a group's own translation and rotation are free
        _, group = connected_components(coo_matrix((np.ones(self.m), (a, b)), shape=(n, n)), directed=False)
        first = np.unique(group, return_index=True)[1]
        gauge[2 * k + first] = gauge[2 * k + n + first] = 1.0
        if rigid:
            gauge[2 * k + 2 * n + first] = 1.0
        self.gauge = gauge

    def _design(self, edges: list[Any]):
        """Rows of ``edges``' pairs: x rows then y rows, over [c_x (k), c_y (k), t_x (n), t_y (n), φ (n)]."""
        from scipy.sparse import coo_matrix, hstack, vstack

        model0, k, n = self.model0, self.k, self.n
        p = np.concatenate([np.asarray(e.p, np.float64) for e in edges])
        q = np.concatenate([np.asarray(e.q, np.float64) for e in edges])
        a = np.concatenate([np.full(len(e.p), self.index[e.tile]) for e in edges])
        b = np.concatenate([np.full(len(e.p), self.index[e.neighbour]) for e in edges])
        m = len(p)
        basis = model0.basis(p) - model0.basis(q)  # (m, k): D(p) − D(q)
        rows = np.arange(m)
        both = (np.r_[rows, rows], np.r_[a, b])
        # φ = θ·s: a tile's angle as the px it turns a point at the scale radius s (columns of the size of
        # the translations')
        xi_p, xi_q = (p - model0.centre) / model0.scale, (q - model0.centre) / model0.scale
        blocks = []
        for axis in (0, 1):
            coeff = coo_matrix(basis, shape=(m, k))
            tiles = coo_matrix((np.r_[np.ones(m), -np.ones(m)], both), shape=(m, n))
            zeros_k, zeros_n = coo_matrix((m, k)), coo_matrix((m, n))
            row = [coeff, zeros_k, tiles, zeros_n] if axis == 0 else [zeros_k, coeff, zeros_n, tiles]
            if self.rigid:  # θ J (p − c): (−θ·η, θ·ξ) in px, η and ξ scaled by s
                sign, other = (-1.0, 1) if axis == 0 else (1.0, 0)
                turn = sign * np.r_[xi_p[:, other], -xi_q[:, other]]
                row.append(coo_matrix((turn, both), shape=(m, n)))
            blocks.append(hstack(row))
        return vstack(blocks).tocsr(), np.r_[q[:, 0] - p[:, 0], q[:, 1] - p[:, 1]], m

    def solve(self, weights: np.ndarray, with_lens: bool) -> np.ndarray:
        from scipy.sparse import diags
        from scipy.sparse.linalg import splu

        w2 = np.r_[weights, weights]
        reg = self.gauge.copy()
        if not with_lens:
            reg[: 2 * self.k] = 1e12
        normal = (self.design.T @ diags(w2) @ self.design + diags(reg)).tocsc()
        # symmetric positive definite: diagonal pivots keep the fill-reducing order (partial pivoting on
        # the rigid system's 7,500 unknowns of 50 × 50 tiles fills it 8-fold and takes 6 times as long)
        lu = splu(normal, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        return np.asarray(lu.solve(self.design.T @ (w2 * self.rhs)))

    def residuals(self, x: np.ndarray) -> np.ndarray:
        r = self.design @ x - self.rhs
        return np.hypot(r[: self.m], r[self.m :])

    def residuals_of(self, edges: list[Any], x: np.ndarray) -> np.ndarray:
        """|residual| of other pairs between the same tiles under the solution ``x``."""
        design, rhs, m = self._design(
            [e for e in edges if e.tile in self.index and e.neighbour in self.index]
        )
        r = design @ x - rhs
        return np.hypot(r[:m], r[m:])

    def robust(self, with_lens: bool, outlier_px: float, iterations: int) -> tuple[np.ndarray, np.ndarray]:
        weights = np.ones(self.m)
        x = self.solve(weights, with_lens)
        for _ in range(iterations):
            r = self.residuals(x)
            limit = _outlier_limit(r, outlier_px)
            weights = np.where(r < limit, (1 - np.clip(r / limit, 0, 1) ** 2) ** 2, 0.0)
            x = self.solve(weights, with_lens)
        return x, self.residuals(x)
