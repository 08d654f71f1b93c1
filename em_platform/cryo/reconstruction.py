"""Tomogram reconstruction from an aligned single-axis tilt series: weighted back-projection and SIRT.

The stack is first brought to the reference geometry (tilt axis along y, shifts removed; see
``alignment.aligned_stack``). A single-axis parallel-beam tomogram is then separable: every row y of the
projections is the sinogram of the slice (z, x) at that y. All slices share one projection operator, a
sparse matrix A (linear interpolation, two entries per voxel and tilt) mapping a slice to its sinogram,
so a slab of rows is reconstructed by sparse × dense products with the rows as the dense columns —
SciPy's compiled kernel does the arithmetic, Dask runs slabs in parallel and bounds the memory.

Geometry (the simulator contract): a point (x, z) of the slice, origin at the centre, appears at
x' = x·cos θ + z·sin θ in the projection at tilt θ. z index increasing = +z.

- WBP: each projection row is ramp-filtered (|k| with a Hamming-like roll-off above ``cutoff`` of Nyquist,
  IMOD's radial filter in spirit), weighted by the angular spacing of its tilt, and back-projected (Aᵀ).
- SIRT: x ← x + λ·C·Aᵀ·R·(b − A·x) with R, C the inverse row and column sums of A (the standard
  simultaneous iterative reconstruction), from x = 0, non-negativity not imposed (cryo data is contrast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import dask
import numpy as np

from em_platform.lazy_import import LazyModule

if TYPE_CHECKING:  # the module itself for the type checker; at run time it is imported on first use
    import scipy.sparse as sp
else:
    sp = LazyModule("scipy.sparse")


@dataclass(frozen=True)
class Geometry:
    angles_deg: tuple[float, ...]  # one per projection, in stack order (any order)
    nx: int  # projection width (perpendicular to the axis)
    nz: int  # slice thickness of the tomogram
    z_offset: float = 0.0  # z (voxels) of the tomogram's central slice: centres the volume on the specimen


@lru_cache(maxsize=8)
def projector(geom: Geometry) -> sp.csr_matrix:
    """A: slice (nz·nx, row-major z then x) → sinogram (n_tilts·nx), linear interpolation."""
    nx, nz = geom.nx, geom.nz
    cx, cz = float(nx // 2), float(nz // 2)  # origin at pixel n//2 (0-based), as the contract says
    zz, xx = np.mgrid[0:nz, 0:nx]
    x = (xx - cx).ravel()
    z = (zz - cz + geom.z_offset).ravel()
    voxel = np.arange(nz * nx)
    rows, cols, vals = [], [], []
    for t, ang in enumerate(geom.angles_deg):
        th = math.radians(ang)
        u = x * math.cos(th) + z * math.sin(th) + cx
        i0 = np.floor(u).astype(np.int64)
        w = u - i0
        for idx, weight in ((i0, 1.0 - w), (i0 + 1, w)):
            ok = (idx >= 0) & (idx < nx) & (weight > 0)
            rows.append(t * nx + idx[ok])
            cols.append(voxel[ok])
            vals.append(weight[ok])
    a = sp.csr_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(geom.angles_deg) * nx, nz * nx),
    )
    a.sum_duplicates()
    return a


@lru_cache(maxsize=8)
def backprojector(geom: Geometry) -> sp.csr_matrix:
    return projector(geom).T.tocsr()


def angular_weights(angles_deg) -> np.ndarray:
    """Each tilt's share of the angular range (half the gap to each neighbour), in radians."""
    a = np.radians(np.asarray(angles_deg, float))
    order = np.argsort(a)
    s = a[order]
    if len(s) == 1:
        return np.array([math.pi])
    gaps = np.diff(s)
    w = np.empty_like(s)
    w[1:-1] = (gaps[:-1] + gaps[1:]) / 2
    w[0], w[-1] = gaps[0], gaps[-1]
    out = np.empty_like(w)
    out[order] = w
    return out


def ramp_filter(nx: int, cutoff: float = 0.8, falloff: float = 0.1) -> np.ndarray:
    """|k| (cycles/px, rfft layout) rolled off smoothly (Gaussian) above ``cutoff``·Nyquist."""
    k = np.fft.rfftfreq(2 * nx)  # zero-padded to 2·nx against wrap-around
    f = np.abs(k).astype(np.float64)
    edge = cutoff * 0.5
    sigma = max(falloff * 0.5, 1e-6)
    f[k > edge] *= np.exp(-((k[k > edge] - edge) ** 2) / (2 * sigma**2))
    f[0] = 0.25 / (2 * nx)  # the DC term of a discrete ramp (avoids a lost mean)
    return f


def filter_projections(slab: np.ndarray, angles_deg, cutoff: float = 0.8) -> np.ndarray:
    """Ramp-filter rows of a (n_tilts, ny, nx) slab and weight each tilt by its angular spacing."""
    nx = slab.shape[-1]
    filt = ramp_filter(nx, cutoff)
    ft = np.fft.rfft(slab, n=2 * nx, axis=-1) * filt
    out = np.fft.irfft(ft, axis=-1)[..., :nx]
    return (out * angular_weights(angles_deg)[:, None, None]).astype(np.float32)


def _to_columns(slab: np.ndarray) -> np.ndarray:
    """(n_tilts, ny, nx) → (n_tilts·nx, ny): every row y becomes one dense column."""
    return np.ascontiguousarray(slab.transpose(0, 2, 1).reshape(-1, slab.shape[1]))


def _from_columns(cols: np.ndarray, nz: int, nx: int) -> np.ndarray:
    """(nz·nx, ny) → (nz, ny, nx)."""
    return np.ascontiguousarray(cols.reshape(nz, nx, -1).transpose(0, 2, 1))


def wbp_slab(slab: np.ndarray, geom: Geometry, cutoff: float = 0.8) -> np.ndarray:
    """Weighted back-projection of a slab of projection rows (n_tilts, ny_slab, nx) → (nz, ny_slab, nx)."""
    filtered = filter_projections(np.asarray(slab, np.float32), geom.angles_deg, cutoff)
    vol = backprojector(geom) @ _to_columns(filtered)
    return _from_columns(vol / 2.0, geom.nz, geom.nx)


def sirt_slab(slab: np.ndarray, geom: Geometry, iterations: int = 20, relaxation: float = 1.0) -> np.ndarray:
    """SIRT of a slab of projection rows (n_tilts, ny_slab, nx) → (nz, ny_slab, nx)."""
    a, at = projector(geom), backprojector(geom)
    b = _to_columns(np.asarray(slab, np.float32))
    row_sum = np.asarray(a.sum(axis=1)).ravel()
    col_sum = np.asarray(a.sum(axis=0)).ravel()
    r = np.where(row_sum > 0, 1.0 / np.maximum(row_sum, 1e-12), 0.0).astype(np.float32)[:, None]
    c = np.where(col_sum > 0, 1.0 / np.maximum(col_sum, 1e-12), 0.0).astype(np.float32)[:, None]
    x = np.zeros((a.shape[1], b.shape[1]), np.float32)
    for _ in range(iterations):
        x += relaxation * c * (at @ (r * (b - a @ x)))
    return _from_columns(x, geom.nz, geom.nx)


def project(volume: np.ndarray, angles_deg) -> np.ndarray:
    """Forward projection of a volume (nz, ny, nx) → (n_tilts, ny, nx) with the same operator."""
    nz, ny, nx = volume.shape
    geom = Geometry(tuple(float(a) for a in angles_deg), nx, nz)
    cols = np.ascontiguousarray(np.asarray(volume, np.float32).transpose(0, 2, 1).reshape(nz * nx, ny))
    sino = projector(geom) @ cols
    return np.ascontiguousarray(sino.reshape(len(geom.angles_deg), nx, ny).transpose(0, 2, 1))


def reconstruct(
    stack,
    angles_deg,
    thickness: int,
    method: str = "wbp",
    slab_rows: int = 64,
    out: np.ndarray | None = None,
    iterations: int = 20,
    cutoff: float = 0.8,
    z_offset: float = 0.0,
) -> np.ndarray:
    """Tomogram (nz, ny, nx) of an aligned stack (n_tilts, ny, nx) (numpy, memmap or dask), slab by slab.

    ``out`` may be a writable memmap (an MRC opened with ``mrcfile.new_mmap``): slabs are written into it as
    they finish, so the volume never has to fit in memory twice. ``z_offset``: the z (voxels, in the
    alignment's frame) the volume's central slice sits at.
    """
    n, ny, nx = stack.shape
    if len(angles_deg) != n:
        raise ValueError(f"{len(angles_deg)} tilt angles for a stack of {n} projections")
    geom = Geometry(tuple(float(a) for a in angles_deg), nx, int(thickness), float(z_offset))
    projector(geom)  # build the operators once, before the threads need them
    backprojector(geom)
    if out is None:
        out = np.zeros((thickness, ny, nx), np.float32)
    if method not in ("wbp", "sirt"):
        raise ValueError(f"reconstruction method {method!r}: use 'wbp' or 'sirt'")

    def run(y0: int, y1: int) -> None:
        slab = np.asarray(stack[:, y0:y1, :], np.float32)
        vol = wbp_slab(slab, geom, cutoff) if method == "wbp" else sirt_slab(slab, geom, iterations)
        out[:, y0:y1, :] = vol

    tasks = [dask.delayed(run, pure=False)(y0, min(ny, y0 + slab_rows)) for y0 in range(0, ny, slab_rows)]
    dask.compute(*tasks, scheduler="threads")
    return out
