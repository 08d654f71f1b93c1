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
   ``model="translation"`` is BigFeta's ``TranslationModel`` (``c, f`` only).

Dagster-free; nothing in the pipeline imports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np

from em_platform.stitch.solve_affine import PointEdge

__all__ = ["EM_STITCH_AFFINE_REGULARIZATION", "bigfeta_montage_solve", "em_stitch_filter"]

EM_STITCH_AFFINE_REGULARIZATION = {"default_lambda": 5e5, "translation_factor": 1e-10}
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
    model: Literal["affine", "translation"] = "affine",
    *,
    default_lambda: float = EM_STITCH_AFFINE_REGULARIZATION["default_lambda"],
    translation_factor: float = EM_STITCH_AFFINE_REGULARIZATION["translation_factor"],
    ransac_px: float | None = EM_STITCH_RANSAC_PX,
) -> dict[Any, np.ndarray]:
    """2×3 ``[A | t]`` per tile of ``stage`` (tile px → montage px), solved as the module docstring says;
    ``ransac_px`` None skips the filter."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import factorized

    if model not in ("affine", "translation"):
        raise ValueError(f"model must be 'affine' or 'translation', got {model!r}")
    edges = [e for e in edges if e.tile != e.neighbour]
    ids = list(stage)
    index = {t: i for i, t in enumerate(ids)}
    k = 3 if model == "affine" else 1  # unknowns per tile and output axis
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
            if model == "affine":
                for j, v in enumerate((pts[:, 0], pts[:, 1], np.ones(n))):
                    rows.append(r)
                    cols.append(np.full(n, base + j))
                    vals.append(sign * v)
            else:
                rows.append(r)
                cols.append(np.full(n, base))
                vals.append(np.full(n, sign))
        row_w.append(w)
        # affine: the points are in the matrix, the rows equal 0; translation: c_tile − c_neighbour = q − p
        targets.append(np.zeros((n, 2)) if model == "affine" else q - p)
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
        else:
            out[t] = np.array([[1.0, 0.0, x[i, 0]], [0.0, 1.0, x[i, 1]]])
    return out
