"""The phantom: the specimen's true potential (V) on the tomogram grid, the reference for FSC.

Same channels and form factors as the images (particles minus the solvent they displace, gold beads),
without dose damage and without the ice itself (its mean is a constant offset, its fluctuations noise):
trilinear (CIC) deposit per channel, 3-D FFT, × F_c(|q|) / voxel volume, CIC window divided out.
Volume axes (z, y, x), z index increasing = +z (along the beam); the specimen centre is at index n//2.
"""

from __future__ import annotations

import math

import numpy as np

from em_platform.lazy_import import LazyModule
from em_platform.simulation.cryoet.scene import Scene, water_potential_V

sfft = LazyModule("scipy.fft")


def phantom_shape(nx: int, ny: int, binning: int, thickness_A: float, voxel_A: float) -> tuple[int, int, int]:
    """(nz, ny, nx): the detector field binned, and the slab thickness (even number of sections)."""
    nz = max(2, math.ceil(thickness_A / voxel_A))
    return (nz + nz % 2, max(1, ny // binning), max(1, nx // binning))


def trilinear_deposit(pos: np.ndarray, weights: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """CIC in 3-D: ``pos`` (n, 3) in voxel units (z, y, x); one bincount over the 8 corners of every point."""
    base = np.floor(pos).astype(np.int64)
    frac = (pos - base).astype(np.float32)
    keep = np.all((base >= 0) & (base < np.asarray(shape) - 1), axis=1)
    base, frac, w = base[keep], frac[keep], weights[keep]
    nz, ny, nx = shape
    flat = (base[:, 0] * ny + base[:, 1]) * nx + base[:, 2]
    index, share = [], []
    for dz in (0, 1):
        wz = frac[:, 0] if dz else 1 - frac[:, 0]
        for dy in (0, 1):
            wy = frac[:, 1] if dy else 1 - frac[:, 1]
            for dx in (0, 1):
                wx = frac[:, 2] if dx else 1 - frac[:, 2]
                index.append(flat + (dz * ny + dy) * nx + dx)
                share.append(w * wz * wy * wx)
    out = np.bincount(np.concatenate(index), np.concatenate(share), minlength=nz * ny * nx)
    return out.reshape(shape)


def phantom_volume(
    scene: Scene, shape_zyx: tuple[int, int, int], voxel_A: float, *, in_ice: bool
) -> np.ndarray:
    """The potential (V) of every particle and bead, float32 (nz, ny, nx)."""
    nz, ny, nx = shape_zyx
    q = [np.fft.fftfreq(nz, voxel_A), np.fft.fftfreq(ny, voxel_A), np.fft.rfftfreq(nx, voxel_A)]
    qz, qy, qx = q[0][:, None, None], q[1][None, :, None], q[2][None, None, :]
    q2 = (qz**2 + qy**2 + qx**2).astype(np.float32)  # float32: a 512³ grid's arrays are 0.5 GB each
    window = ((np.sinc(qz * voxel_A) * np.sinc(qy * voxel_A) * np.sinc(qx * voxel_A)) ** 2).astype(np.float32)
    solvent = water_potential_V() if in_ice else 0.0
    centre = np.array([nz // 2, ny // 2, nx // 2], np.float64)
    total = np.zeros((nz, ny, nx // 2 + 1), np.complex64)
    for c, ch in enumerate(scene.channels):
        idx = scene.channel_points(c)
        if idx.size == 0:
            continue
        pos = scene.coords[idx][:, ::-1].astype(np.float64) / voxel_A + centre  # (x,y,z) → (z,y,x) voxels
        grid = trilinear_deposit(pos, scene.weights[idx], shape_zyx)
        transfer = ch.transfer(q2, solvent_potential_V=solvent, damage_b=0.0) / window
        total += (sfft.rfftn(grid.astype(np.float32)) * transfer.astype(np.float32)).astype(np.complex64)
    return (sfft.irfftn(total, s=shape_zyx) / voxel_A**3).astype(np.float32)
