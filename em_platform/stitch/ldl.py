"""One cached sparse LDLᵀ factor per system: the montage solves' normal matrices are symmetric positive
definite and keep their sparsity pattern while the pair weights change (a pair weighed 0 keeps its place),
so a reweighting refactors numerically (QDLDL, AMD-ordered, no pivoting) instead of factoring anew:
~20× cheaper than SuperLU's general LU of the same matrix. Dagster-free."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FactorCache", "solve_columns"]


class FactorCache:
    """LDLᵀ factors by key, each refactored in place while its matrix's pattern stays the same."""

    def __init__(self) -> None:
        self._factors: dict[Any, tuple[Any, Any]] = {}

    def factor(self, key: Any, normal) -> Any:
        """The factor of the SPD sparse ``normal`` (its ``solve(b)`` takes one or several right sides)."""
        import qdldl

        normal = normal.tocsc()
        normal.sort_indices()
        known = self._factors.get(key)
        if (
            known is not None
            and known[1].shape == normal.shape
            and np.array_equal(known[1].indptr, normal.indptr)
            and np.array_equal(known[1].indices, normal.indices)
        ):
            known[0].update(normal)
            return known[0]
        factor = qdldl.Solver(normal)
        self._factors[key] = (factor, normal)
        return factor


def solve_columns(factor, rhs: np.ndarray) -> np.ndarray:
    """``factor.solve`` of each column of ``rhs`` (n,) or (n, k)."""
    rhs = np.asarray(rhs, np.float64)
    if rhs.ndim == 1:
        return factor.solve(rhs)
    return np.column_stack([factor.solve(np.ascontiguousarray(rhs[:, j])) for j in range(rhs.shape[1])])
