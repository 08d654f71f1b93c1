"""Multiscale pyramid planning and mean (area) downsampling by 2, on plain numpy arrays.

The plan decides, level by level, which axes are halved:

* y and x are halved at every level (an axis of size 1 is left alone) until the largest y/x side of
  the level is <= ``min_size``;
* z is halved only when that keeps the level closer to isotropic: with ``t`` the y/x voxel size the
  new level will have, z is halved when its current voxel size ``z < 2/3 * t``, i.e. when ``2 z`` is
  nearer to ``t`` than ``z`` is. This is the test neuroglancer's precomputed downsampling
  (``compute_near_isotropic_downsampling_scales``) applies to the axes it may halve along with the
  finest one (here y/x are always halved, as the pyramid is for y/x viewing first). An isotropic
  volume is halved in z at every level, an 8x4x4 nm FIB-SEM stack keeps z at level 1 (8x8x8 nm) and
  halves it from level 2 on, and a 40x4x4 nm serial-section stack keeps z until y/x reach 64 nm;
* t and c are never downsampled.

Downsampling is the mean over each 2 (or 2x2, 2x2x2) window. At an odd edge the window holds only the
voxels that exist (the output size is the ceiling of half the input) and their mean is taken, so no
dark border appears; this equals the mean over the edge-replicated window. Integer means are exact and
rounded half up to the source dtype; float means are computed in float64 and cast back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# z is halved when its voxel size is below this fraction of the y/x voxel size of the new level.
Z_DOWNSAMPLE_FRACTION = 2.0 / 3.0


@dataclass(frozen=True)
class LevelPlan:
    """One pyramid level: its shape, its voxel size per axis and the factor from the level above."""

    shape: tuple[int, ...]
    scale: tuple[float, ...]
    factors: tuple[int, ...]  # per axis, 1 or 2, relative to the previous level (all 1 for level 0)


def level_translation(scale0: Sequence[float], scale: Sequence[float]) -> tuple[float, ...]:
    """Offset of a level's first voxel centre, so every level lines up with level 0.

    A mean-downsampled voxel covers voxels 0..f-1 of level 0, so its centre sits at (f - 1) / 2 level-0
    voxels, i.e. ``(scale - scale0) / 2`` in physical units (the convention ome-zarr's own writer uses).
    """
    return tuple((s - s0) / 2.0 for s, s0 in zip(scale, scale0, strict=True))


def plan_pyramid(
    shape: Sequence[int], axes: Sequence[str], scale: Sequence[float], min_size: int = 256
) -> list[LevelPlan]:
    """Plan the levels of a mean pyramid (see the module docstring for the rule)."""
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    axes = list(axes)
    shape = tuple(int(s) for s in shape)
    cur_scale = tuple(float(s) for s in scale)
    iy, ix = axes.index("y"), axes.index("x")
    iz = axes.index("z") if "z" in axes else None
    levels = [LevelPlan(shape=shape, scale=cur_scale, factors=(1,) * len(shape))]
    cur_shape = shape
    while max(cur_shape[iy], cur_shape[ix]) > min_size:
        factors = [1] * len(shape)
        for i in (iy, ix):
            if cur_shape[i] > 1:
                factors[i] = 2
        if iz is not None and cur_shape[iz] > 1:
            new_yx = [cur_scale[i] * factors[i] for i in (iy, ix)]
            target = min(new_yx)
            if cur_scale[iz] < Z_DOWNSAMPLE_FRACTION * target:
                factors[iz] = 2
        cur_shape = tuple(math.ceil(s / f) for s, f in zip(cur_shape, factors, strict=True))
        cur_scale = tuple(s * f for s, f in zip(cur_scale, factors, strict=True))
        levels.append(LevelPlan(shape=cur_shape, scale=cur_scale, factors=tuple(factors)))
    return levels


def _accumulator(dtype: np.dtype) -> np.dtype:
    """A dtype that holds the sum of 8 values of ``dtype`` exactly (64-bit integers: see below)."""
    wider: dict[int, np.dtype]
    if dtype.kind == "u":
        wider = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32), 4: np.dtype(np.uint64), 8: dtype}
        return wider[dtype.itemsize]
    if dtype.kind == "i":
        wider = {1: np.dtype(np.int16), 2: np.dtype(np.int32), 4: np.dtype(np.int64), 8: dtype}
        return wider[dtype.itemsize]
    if dtype.kind == "f":
        return np.dtype(np.float64)
    raise ValueError(f"cannot mean-downsample dtype {dtype}: use an integer or floating-point image")


def check_downsample_dtype(dtype: np.dtype) -> None:
    """Raise ValueError if :func:`downsample_mean` cannot handle ``dtype``."""
    _accumulator(np.dtype(dtype))


def _pair_sums(x: np.ndarray, axes: list[int], acc: np.dtype) -> np.ndarray:
    """Sum ``x`` over windows of 2 along each of ``axes`` (outermost first), in ``acc``."""
    first = True
    for ax in axes:
        even = [slice(None)] * x.ndim
        odd = [slice(None)] * x.ndim
        even[ax] = slice(0, None, 2)
        odd[ax] = slice(1, None, 2)
        a, b = x[tuple(even)], x[tuple(odd)]
        if first:
            x = np.add(a, b, dtype=acc)
            first = False
        else:
            np.add(a, b, out=a)
            x = a
    return x


def downsample_mean(block: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Mean over windows of ``factors`` (each 1 or 2) with ceil sizes; same dtype as ``block``.

    Sums pairs axis by axis, outermost first (contiguous slabs are cheap to add, and each step halves
    what the next, strided, step reads), in a wide enough accumulator. Integer means are exact and
    rounded half up; 64-bit integers, which have no wider type, are split as ``v = q * n + r``
    (``n`` the window size) so that neither sum can overflow.
    """
    dtype = block.dtype
    acc = _accumulator(dtype)
    if any(f not in (1, 2) for f in factors) or len(factors) != block.ndim:
        raise ValueError(f"factors must be 1 or 2 for each of the {block.ndim} axes, got {tuple(factors)}")
    axes = [i for i, f in enumerate(factors) if f == 2]
    if not axes:
        return block.copy()
    pad = [(0, block.shape[i] % 2 if factors[i] == 2 else 0) for i in range(block.ndim)]
    x = np.pad(block, pad, mode="edge") if any(p for _, p in pad) else block
    k = len(axes)
    n = 1 << k
    if dtype.kind in "iu" and dtype.itemsize == 8:
        q = _pair_sums(x >> k, axes, acc)  # floor(v / n), summed: at most n * (max / n), no overflow
        r = _pair_sums(x & (n - 1), axes, acc)  # v - n * floor(v / n), in [0, n)
        r += n // 2
        r >>= k
        q += r
        return q.astype(dtype, copy=False)
    x = _pair_sums(x, axes, acc)
    if acc.kind == "u":
        x += n // 2
        x >>= k
    elif acc.kind == "i":
        x += n // 2
        x //= n
    else:
        x /= n
    return x.astype(dtype)
