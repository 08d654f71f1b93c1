"""Picklable, lazily opened array views of files, so dask graphs can ship to worker processes.

A numpy memmap pickles as a full in-memory copy; these objects pickle as (path, offset, shape, dtype)
and open the file in whichever process first indexes them.

Shapes come from file headers and sidecars, i.e. from outside: :func:`check_size` refuses one that is not
positive or whose bytes the file cannot hold, computing with exact Python integers (numpy's fixed-width
product wraps: 2²¹ × 2²¹ × 2²² voxels is 0 in int64, and a 1 KiB file passed as holding them).
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from dask.base import tokenize

from em_platform.formats.dtypes import checked_dtype
from em_platform.lazy_import import LazyModule

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    import dask.array as da
else:
    da = LazyModule("dask.array")


class MemmapSlicer:
    """Array-like over a contiguous block of a file: supports ``shape``, ``dtype``, ``ndim`` and slicing."""

    def __init__(
        self,
        path: str | Path,
        offset: int,
        shape: tuple[int, ...],
        dtype: Any,
        order: Literal["C", "F"] = "C",
    ):
        self.path = str(path)
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = checked_dtype(dtype, where=self.path)
        self.order = order
        self.ndim = len(self.shape)
        self._mm: np.memmap | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _memmap(self) -> np.memmap:
        with self._lock:
            if self._mm is None:
                self._mm = np.memmap(
                    self.path,
                    mode="r",
                    dtype=self.dtype,
                    offset=self.offset,
                    shape=self.shape,
                    order=self.order,
                )
            return self._mm

    def __getitem__(self, key) -> np.ndarray:
        return np.array(self._memmap()[key])


def memmap_dask(
    path: str | Path,
    offset: int,
    shape: tuple[int, ...],
    dtype: Any,
    order: Literal["C", "F"] = "C",
    slab_bytes: int = 64 << 20,
) -> da.Array:
    """A dask array over a raw block of a file, chunked in whole slices along the first axis up to ``slab_bytes``.

    ValueError (:func:`check_size`) unless the file holds the whole block, and FormatError unless ``dtype`` is
    allowed (:func:`~em_platform.formats.dtypes.checked_dtype`): no array is built over bytes that are not
    there, or as what they cannot be."""
    dtype = checked_dtype(dtype, where=str(path))
    check_size(Path(path), offset, shape, dtype)
    slicer = MemmapSlicer(path, offset, shape, dtype, order)
    if len(shape) <= 2:
        chunks: tuple[int, ...] = shape
    else:
        slice_bytes = math.prod(shape[1:]) * dtype.itemsize
        depth = max(1, min(shape[0], slab_bytes // max(slice_bytes, 1)))
        chunks = (depth, *shape[1:])
    return da.from_array(
        slicer,
        chunks=chunks,
        asarray=False,
        fancy=False,
        meta=np.empty((0,) * len(shape), dtype),
        name="memmap-" + tokenize(str(path), offset, shape, dtype.str, order, os.stat(path).st_mtime_ns),
    )


def check_size(path: Path, offset: int, shape: tuple[int, ...], dtype: Any, what: str = "header") -> None:
    """Raise ValueError unless ``shape`` is positive and the file holds ``offset`` + its bytes.

    The bound on a shape from outside is the file itself: a shorter file is a truncated transfer or a
    header that lies. ``what`` names where the shape came from (header, sidecar) in the message.
    """
    bad = [n for n in shape if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1]
    if not shape or bad:
        raise ValueError(f"{what} shape {tuple(shape)} is not a list of positive whole numbers")
    if isinstance(offset, bool) or not isinstance(offset, int | np.integer) or offset < 0:
        raise ValueError(f"{what} data offset {offset!r} is not a whole number of bytes ≥ 0")
    need = int(offset) + math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize  # exact, never wraps
    have = path.stat().st_size
    if have < need:
        raise ValueError(
            f"file is truncated: {have} bytes on disk, {what} promises {need} "
            f"({'x'.join(map(str, shape))} {np.dtype(dtype).name} from byte {offset}), or the {what} is wrong"
        )
