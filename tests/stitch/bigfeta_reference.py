"""A REFERENCE, not part of the pipeline: the montage solve as em_stitch runs BigFeta, to compare ours with.

em_stitch/BigFeta cannot be installed here (their Java/render stack), so this re-states what they do with
one section's point matches, for the tests and ``bench/bench_montage.py`` (issue 14: our mean residual
per point pair must be no worse than theirs on the same matches, and no tile block may come loose):

1. **Filter** (em_stitch ``montage_filter_matches`` → ``pointmatch_filter``): per tile pair, a RANSAC
   similarity fit of ``p → q`` (OpenCV ``estimateAffinePartial2D``, ``ransacReprojThreshold`` 10 px as in
   em_stitch's example); pairs off it get weight 0. Nothing else is rejected: no edge, no tile.
2. **Solve** (BigFeta ``solve_type: montage``, ``fullsize_transform: false``, em_stitch's
   ``affine_template.json``): per tile ``x' = a·x + b·y + c``, ``y' = d·x + e·y + f`` on raw tile pixels;
   one sparse linear least-squares problem over every kept point pair (weight ``w``), regularised toward
   the input tile specs (identity + the stage's top-left corner): ``default_lambda`` = 5·10⁵ on ``a, b,
   d, e`` and ``default_lambda · translation_factor`` = 5·10⁻⁵ on ``c, f``. The stage is trusted in its
   own frame (BigFeta has no stage-frame estimate) but held that weakly. Solved as BigFeta does: the
   regularised normal equations ``(AᵀWA + Λ) x = Λ x₀``, x and y as two right-hand sides, with a sparse
   direct solver (``scipy.sparse.linalg.factorized``; an iterative ``lsqr`` of the same system stalls on
   the near-free global modes a weak prior leaves).
   ``model="translation"`` is BigFeta's ``TranslationModel`` (``c, f`` only). ``model="polynomial"`` is
   em_stitch's ``polynomial_template.json`` (BigFeta's ``Polynomial2DTransform``, order 2): per tile and
   axis the coefficients of ``1, x, y, x², xy, y²`` on raw tile pixels, regularised toward the input
   tile spec (the identity, the stage's corner) with ``default_lambda`` 1000 times ``poly_factors``
   ``[1e-5, 1, 1e6]`` for the coefficients of order 0, 1 and 2; it returns those (2, 6) coefficients.

Dagster-free; nothing in the pipeline imports it (it lives with the tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np

from em_platform.stitch.layout import PointEdge

__all__ = [
    "EM_STITCH_AFFINE_REGULARIZATION",
    "EM_STITCH_POLYNOMIAL_REGULARIZATION",
    "bigfeta_montage_solve",
    "em_stitch_filter",
]

EM_STITCH_AFFINE_REGULARIZATION = {"default_lambda": 5e5, "translation_factor": 1e-10}
EM_STITCH_POLYNOMIAL_REGULARIZATION = {"default_lambda": 1e3, "poly_factors": (1e-5, 1.0, 1e6)}
EM_STITCH_RANSAC_PX = 10.0


def em_stitch_filter(
    edges: Iterable[PointEdge], threshold_px: float = EM_STITCH_RANSAC_PX
) -> list[np.ndarray]:
    """Per edge, the weight of each pair after em_stitch's RANSAC similarity filter (1 kept, 0 dropped)."""
    import cv2

    out = []
    for e in edges:
        p, q = np.asarray(e.p, np.float64), np.asarray(e.q, np.float64)
        w = np.ones(len(p))
        if len(p) >= 3:
            _, inliers = cv2.estimateAffinePartial2D(
                p.astype(np.float32), q.astype(np.float32), method=cv2.RANSAC,
                ransacReprojThreshold=threshold_px,
            )  # fmt: skip
            if inliers is not None:
                w = inliers.ravel().astype(np.float64)
        out.append(w * float(e.weight))
    return out


def bigfeta_montage_solve(
    stage: Mapping[Any, tuple[float, float]],
    edges: Iterable[PointEdge],
    model: Literal["affine", "translation", "polynomial"] = "affine",
    *,
    default_lambda: float | None = None,
    translation_factor: float = EM_STITCH_AFFINE_REGULARIZATION["translation_factor"],
    ransac_px: float | None = EM_STITCH_RANSAC_PX,
) -> dict[Any, np.ndarray]:
    """2×3 ``[A | t]`` per tile of ``stage`` (tile px → montage px), or for ``"polynomial"`` the (2, 6)
    coefficients of ``1, x, y, x², xy, y²``, solved as the module docstring says (``default_lambda``: the
    template's when None); ``ransac_px`` None skips the filter."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import factorized

    if model not in ("affine", "translation", "polynomial"):
        raise ValueError(f"model must be 'affine', 'translation' or 'polynomial', got {model!r}")
    if default_lambda is None:
        default_lambda = (
            EM_STITCH_POLYNOMIAL_REGULARIZATION if model == "polynomial" else EM_STITCH_AFFINE_REGULARIZATION
        )["default_lambda"]
    edges = [e for e in edges if e.tile != e.neighbour]
    ids = list(stage)
    index = {t: i for i, t in enumerate(ids)}
    k = {"affine": 3, "polynomial": 6, "translation": 1}[model]  # unknowns per tile and output axis
    weights = (
        em_stitch_filter(edges, ransac_px) if ransac_px else [np.full(len(e.p), e.weight) for e in edges]
    )
    rows, cols, vals, row_w, targets = [], [], [], [], []
    start = 0
    for e, w in zip(edges, weights, strict=True):
        p, q = np.asarray(e.p, np.float64), np.asarray(e.q, np.float64)
        n = len(p)
        r = np.arange(start, start + n)
        start += n
        for tile, pts, sign in ((e.tile, p, 1.0), (e.neighbour, q, -1.0)):
            base = index[tile] * k
            if model != "translation":
                x, y = pts[:, 0], pts[:, 1]
                basis = (x, y, np.ones(n)) if model == "affine" else (np.ones(n), x, y, x * x, x * y, y * y)
                for j, v in enumerate(basis):
                    rows.append(r)
                    cols.append(np.full(n, base + j))
                    vals.append(sign * v)
            else:
                rows.append(r)
                cols.append(np.full(n, base))
                vals.append(np.full(n, sign))
        row_w.append(w)
        # affine, polynomial: the points are in the matrix, the rows equal 0; translation: c_tile − c_neighbour = q − p
        targets.append(q - p if model == "translation" else np.zeros((n, 2)))
    m = start
    a = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m, k * len(ids))
    )
    w = sp.diags(np.concatenate(row_w)) if m else sp.csr_matrix((0, 0))
    # the regularisation toward the input tile specs: identity linear part, the stage's corner
    s = np.array([stage[t] for t in ids], np.float64).reshape(-1, 2)
    if model == "affine":
        reg = np.tile([default_lambda, default_lambda, default_lambda * translation_factor], len(ids))
        x0 = np.zeros((k * len(ids), 2))
        x0[0::3, 0] = 1.0  # a
        x0[1::3, 1] = 1.0  # e (the y column's second unknown)
        x0[2::3] = s
    elif model == "polynomial":
        factors = EM_STITCH_POLYNOMIAL_REGULARIZATION["poly_factors"]
        reg = np.tile(default_lambda * np.array(factors)[[0, 1, 1, 2, 2, 2]], len(ids))
        x0 = np.zeros((k * len(ids), 2))
        x0[0::6] = s  # the constant terms: the stage's corner
        x0[1::6, 0] = 1.0  # x' = x
        x0[2::6, 1] = 1.0  # y' = y
    else:
        reg = np.full(len(ids), default_lambda * translation_factor)
        x0 = s.copy()
    lam = sp.diags(reg)
    normal = (a.T @ w @ a + lam).tocsc() if m else lam.tocsc()
    solve = factorized(normal)
    rhs = lam @ x0 + (a.T @ w @ np.concatenate(targets) if m else 0.0)
    x = np.column_stack([solve(rhs[:, 0]), solve(rhs[:, 1])])
    out = {}
    for i, t in enumerate(ids):
        if model == "affine":
            ax, ay = x[3 * i : 3 * i + 3, 0], x[3 * i : 3 * i + 3, 1]
            out[t] = np.array([[ax[0], ax[1], ax[2]], [ay[0], ay[1], ay[2]]])
        elif model == "polynomial":
            out[t] = x[6 * i : 6 * i + 6].T.copy()
        else:
            out[t] = np.array([[1.0, 0.0, x[i, 0]], [0.0, 1.0, x[i, 1]]])
    return out
