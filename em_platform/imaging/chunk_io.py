"""Whole chunks written straight into the chunk files of a local zarr v3 array.

zarr's own writer costs, per chunk, an asyncio hop to its I/O loop, a copy through the ``bytes`` codec,
and a temporary file renamed into place. The arrays written here are never read while they are written:
an image is written under a staging name and published whole, a processed tile has one writer. So the
atomic rename buys nothing, and writing the encoded chunk into its file directly costs about a third of
the CPU of a pyramid level (encode and file write stay). Anything zarr's writer would do differently (an
object store, sharding, filters, big-endian, a codec other than Blosc) takes zarr's own path.

The bytes are the ones zarr writes: the chunk padded to the full chunk shape with the fill value, encoded
by the array's own Blosc settings, and a chunk that is all fill value is not stored (zarr's default
``write_empty_chunks=False``).
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Sequence

import numpy as np

from em_platform.lazy_import import LazyModule

zarr = LazyModule("zarr")


def write_region(arr: zarr.Array, start: Sequence[int], data: np.ndarray) -> None:
    """``arr[start : start + data.shape] = data``: directly into the chunk files when the region is a
    union of whole chunks (ending on the grid or at the array's edge) and :func:`_direct_target` allows,
    else through zarr."""
    target = _direct_target(arr)
    if target is None or not _whole_chunks(arr, start, data.shape):
        arr[tuple(slice(s, s + n) for s, n in zip(start, data.shape, strict=True))] = data
        return
    folder, encode = target
    meta = arr.metadata
    chunks = tuple(meta.chunk_grid.chunk_shape)
    fill = np.asarray(meta.fill_value, dtype=arr.dtype)
    buffer: np.ndarray | None = None
    made: set[str] = set()
    counts = [-(-n // c) for n, c in zip(data.shape, chunks, strict=True)]
    for index in itertools.product(*(range(n) for n in counts)):
        block = data[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))]
        key = tuple(s // c + i for s, c, i in zip(start, chunks, index, strict=True))
        path = os.path.join(folder, meta.encode_chunk_key(key))
        if _all_fill(block, fill):
            if os.path.exists(path):
                os.remove(path)
            continue
        if block.shape != chunks or not block.flags.c_contiguous:
            if buffer is None:
                buffer = np.empty(chunks, arr.dtype)
            if block.shape != chunks:
                buffer.fill(fill)
            buffer[tuple(slice(0, n) for n in block.shape)] = block
            block = buffer
        parent = os.path.dirname(path)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        with open(path, "wb") as f:
            f.write(encode(block))


def _whole_chunks(arr: zarr.Array, start: Sequence[int], shape: Sequence[int]) -> bool:
    chunks = arr.metadata.chunk_grid.chunk_shape
    return all(
        s % c == 0 and ((s + n) % c == 0 or s + n == size)
        for s, n, c, size in zip(start, shape, chunks, arr.shape, strict=True)
    )


def _all_fill(block: np.ndarray, fill: np.ndarray) -> bool:
    if fill == 0:
        return not block.any()
    return bool((block == fill).all())


def _direct_target(arr: zarr.Array):
    """``(chunk folder, encode)`` for a local zarr v3 array with a regular chunk grid whose codecs are
    ``bytes`` (little-endian or one-byte values) optionally followed by Blosc; else None."""
    from zarr.codecs import BloscCodec, BytesCodec
    from zarr.storage import LocalStore

    meta = arr.metadata
    if not isinstance(arr.store, LocalStore) or getattr(meta, "zarr_format", None) != 3:
        return None
    if not hasattr(meta.chunk_grid, "chunk_shape"):
        return None
    codecs = tuple(getattr(meta, "codecs", ()))
    if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
        return None
    if arr.dtype.itemsize > 1 and (sys.byteorder != "little" or codecs[0].endian not in (None, "little")):
        return None
    if np.dtype(arr.dtype).kind not in "biuf":
        return None
    folder = os.path.join(str(arr.store.root), arr.path)
    if len(codecs) == 1:
        return folder, lambda block: block.data
    if not isinstance(codecs[1], BloscCodec):
        return None
    blosc = _numcodecs_blosc(codecs[1], arr.dtype)
    return folder, blosc.encode


def _numcodecs_blosc(codec, dtype: np.dtype):
    """The numcodecs Blosc that zarr's ``BloscCodec`` encodes with, from the codec's stored settings."""
    from numcodecs import Blosc

    config = codec.to_dict()["configuration"]
    shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
    return Blosc(
        cname=config["cname"],
        clevel=config["clevel"],
        shuffle=shuffle[config["shuffle"]],
        blocksize=config.get("blocksize", 0),
        typesize=config.get("typesize") or np.dtype(dtype).itemsize,
    )
