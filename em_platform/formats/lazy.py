"""Picklable, lazily opened array views of files, so dask graphs can ship to worker processes.

A numpy memmap pickles as a full in-memory copy; these objects pickle as (path, offset, shape, dtype)
and open the file in whichever process first indexes them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from dask.base import tokenize

from em_platform.lazy_import import LazyModule

da = LazyModule("dask.array")


class MemmapSlicer:
    """Array-like over a contiguous block of a file: supports ``shape``, ``dtype``, ``ndim`` and slicing."""

    def __init__(self, path: str | Path, offset: int, shape: tuple[int, ...], dtype: Any, order: str = "C"):
        self.path = str(path)
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
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
    order: str = "C",
    slab_bytes: int = 64 << 20,
) -> da.Array:
    """A dask array over a raw block of a file, chunked in whole slices along the first axis up to ``slab_bytes``."""
    dtype = np.dtype(dtype)
    slicer = MemmapSlicer(path, offset, shape, dtype, order)
    if len(shape) <= 2:
        chunks: tuple[int, ...] = shape
    else:
        slice_bytes = int(np.prod(shape[1:])) * dtype.itemsize
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


def check_size(path: Path, offset: int, shape: tuple[int, ...], dtype: Any) -> None:
    """Raise ValueError if the file is shorter than header + data: the sign of a truncated transfer."""
    need = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    have = path.stat().st_size
    if have < need:
        raise ValueError(f"file is truncated: {have} bytes on disk, header promises {need}")
