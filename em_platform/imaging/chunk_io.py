"""Whole chunks written straight into the chunk files of a local zarr v3 array, or a whole array into its
one shard file.

zarr's own writer costs, per chunk, an asyncio hop to its I/O loop, a copy through the ``bytes`` codec,
and a temporary file renamed into place. The arrays written here are never read while they are written:
an image is written under a staging name and published whole, a processed tile has one writer. So the
atomic rename buys nothing, and writing the encoded chunk into its file directly costs about a third of
the CPU of a pyramid level (encode and file write stay). Anything zarr's writer would do differently (an
object store, filters, big-endian, a codec other than Blosc; sharding but for :func:`write_shard_file`'s
one dense shard) takes zarr's own path.

The bytes are the ones zarr writes: the chunk padded to the full chunk shape with the fill value, encoded
by the array's own Blosc settings, and a chunk that is all fill value is not stored (zarr's default
``write_empty_chunks=False``). With ``around_page_cache`` the files are written with ``O_DIRECT``
(:mod:`em_platform.imaging.direct_write`): for data streamed out and not read back soon (processed tiles),
not for a pyramid whose next level is built from the level just written.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from em_platform.lazy_import import LazyModule

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    import zarr
else:
    zarr = LazyModule("zarr")


def write_region(
    arr: zarr.Array, start: Sequence[int], data: np.ndarray, *, around_page_cache: bool = False
) -> None:
    """``arr[start : start + data.shape] = data``: directly into the chunk files when the region is a
    union of whole chunks (ending on the grid or at the array's edge) and :func:`_direct_target` allows,
    else through zarr. ``around_page_cache``: the chunk files written with ``O_DIRECT`` where the file
    system allows (module docstring)."""
    target = _direct_target(arr)
    if target is None or not _whole_chunks(arr.metadata, start, data.shape):
        arr[tuple(slice(s, s + n) for s, n in zip(start, data.shape, strict=True))] = data
        return
    folder, encode = target
    _write_chunks(folder, arr.metadata, arr.dtype, encode, start, data, around_page_cache)


def write_shard_file(folder: str, metadata, data: np.ndarray, *, around_page_cache: bool = False) -> None:
    """A whole array ``data`` that is one shard of uncompressed inner chunks, as that shard's one file in
    ``folder`` (the ``zarr.json`` is the caller's to write): the inner chunks in C order (padded with the
    fill value past the array's edge), then zarr's index (offset and length of each, little-endian uint64)
    and its CRC-32C, as the sharding codec reads it. Every inner chunk is stored, all-fill ones too: a
    dense shard, which zarr reads whole in one step.

    Why one file: an ext4 file system that has just deleted files (a buffer emptied after upload, say)
    looks for a free inode not deleted in the last seconds, and that search cost a 5000² tile's 25 chunk
    files and 6 folders 20-35 ms of the writer's CPU here, the one shard file 6-10 ms. Raises ValueError
    for a layout this function does not write (compressed inner chunks, several shards, ...): use zarr."""
    import google_crc32c

    from em_platform.imaging.direct_write import give_back, take_buffer, write_file

    dtype = np.dtype(data.dtype)
    inner = _single_dense_shard(metadata, dtype, data.shape)
    if inner is None:
        raise ValueError(f"not one shard of uncompressed inner chunks of shape {data.shape}: use zarr")
    counts = tuple(-(-n // c) for n, c in zip(data.shape, inner, strict=True))
    fill = np.asarray(metadata.fill_value, dtype=dtype)
    chunk_bytes = int(np.prod(inner, dtype=np.int64)) * dtype.itemsize
    n_chunks = int(np.prod(counts, dtype=np.int64))
    index = np.empty((*counts, 2), "<u8")
    index_bytes = index.nbytes + 4  # the index, then its checksum
    buffer = take_buffer(n_chunks * chunk_bytes + index_bytes)
    try:
        for k, position in enumerate(np.ndindex(*counts)):
            block = data[tuple(slice(i * c, (i + 1) * c) for i, c in zip(position, inner, strict=True))]
            chunk = buffer.bytes[k * chunk_bytes : (k + 1) * chunk_bytes].view(dtype).reshape(inner)
            if block.shape != inner:
                chunk.fill(fill)
            chunk[tuple(slice(0, n) for n in block.shape)] = block
            index[position] = (k * chunk_bytes, chunk_bytes)
        end = n_chunks * chunk_bytes
        buffer.bytes[end : end + index.nbytes] = index.reshape(-1).view(np.uint8)
        checksum = np.array([google_crc32c.value(index.tobytes())], "<u4")
        buffer.bytes[end + index.nbytes : end + index_bytes] = checksum.view(np.uint8)
        path = os.path.join(folder, metadata.encode_chunk_key((0,) * data.ndim))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if around_page_cache:
            write_file(path, buffer, end + index_bytes)
        else:
            with open(path, "wb") as f:
                f.write(buffer.bytes[: end + index_bytes])
    finally:
        give_back(buffer)


def _single_dense_shard(meta, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The inner chunk shape when ``meta`` is a zarr v3 array of ``shape`` that is one shard of uncompressed
    inner chunks covering it, with the index at the end (``bytes`` little-endian, then ``crc32c``)."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    codecs = tuple(getattr(meta, "codecs", ()))
    if (
        getattr(meta, "zarr_format", None) != 3
        or len(codecs) != 1
        or not isinstance(codecs[0], ShardingCodec)
    ):
        return None
    sharding = codecs[0]
    if tuple(meta.shape) != tuple(shape):
        return None
    inner_codecs, index_codecs = tuple(sharding.codecs), tuple(sharding.index_codecs)
    little = sys.byteorder == "little"

    def plain_bytes(codec, itemsize: int) -> bool:
        return isinstance(codec, BytesCodec) and (itemsize == 1 or _setting(codec.endian) in (None, "little"))

    if not (little and len(inner_codecs) == 1 and plain_bytes(inner_codecs[0], dtype.itemsize)):
        return None
    if dtype.kind not in "biuf" or _setting(sharding.index_location) != "end":
        return None
    index_uint64 = 8
    if (
        len(index_codecs) != 2
        or not plain_bytes(index_codecs[0], index_uint64)
        or not isinstance(index_codecs[1], Crc32cCodec)
    ):
        return None
    inner = tuple(int(c) for c in sharding.chunk_shape)
    shard = tuple(getattr(meta.chunk_grid, "chunk_shape", ()))
    if len(inner) != len(shape) or len(shard) != len(shape):
        return None
    if any(s != -(-n // c) * c for n, c, s in zip(shape, inner, shard, strict=True)):
        return None  # not the one shard of whole inner chunks that just covers the array
    return inner


def _write_chunks(folder, meta, dtype, encode, start, data, around_page_cache: bool) -> None:
    from em_platform.imaging.direct_write import give_back, take_buffer, write_file

    chunks = tuple(meta.chunk_grid.chunk_shape)
    fill = np.asarray(meta.fill_value, dtype=dtype)
    chunk_bytes = int(np.prod(chunks, dtype=np.int64)) * np.dtype(dtype).itemsize
    # around the page cache every chunk's bytes are put together in one page-aligned buffer (for an
    # uncompressed chunk of a larger array that is the copy it needs anyway)
    aligned = take_buffer(chunk_bytes) if around_page_cache else None
    scratch: np.ndarray | None = None
    made: set[str] = set()
    try:
        counts = [-(-n // c) for n, c in zip(data.shape, chunks, strict=True)]
        for index in itertools.product(*(range(n) for n in counts)):
            block = data[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))]
            key = tuple(s // c + i for s, c, i in zip(start, chunks, index, strict=True))
            path = os.path.join(folder, meta.encode_chunk_key(key))
            if _all_fill(block, fill):
                if os.path.exists(path):
                    os.remove(path)
                continue
            encoded = None
            if aligned is not None and encode is _as_bytes:  # the chunk (padded with fill) is the file
                view = aligned.view(chunks, dtype)
                if block.shape != chunks:
                    view.fill(fill)
                view[tuple(slice(0, n) for n in block.shape)] = block
                nbytes = chunk_bytes
            else:
                if block.shape != chunks or not block.flags.c_contiguous:
                    if scratch is None:
                        scratch = np.empty(chunks, dtype)
                    if block.shape != chunks:
                        scratch.fill(fill)
                    scratch[tuple(slice(0, n) for n in block.shape)] = block
                    block = scratch
                encoded = encode(block)
            parent = os.path.dirname(path)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            if aligned is None:
                assert encoded is not None  # without an aligned buffer every chunk is encoded above
                with open(path, "wb") as f:
                    f.write(encoded)
                continue
            if encoded is not None:
                encoded = np.frombuffer(encoded, np.uint8)
                nbytes = encoded.size
                if nbytes > aligned.capacity:
                    give_back(aligned)
                    aligned = take_buffer(nbytes)
                aligned.bytes[:nbytes] = encoded
            write_file(path, aligned, nbytes)
    finally:
        if aligned is not None:
            give_back(aligned)


def _as_bytes(block: np.ndarray) -> memoryview:
    return block.data


def _whole_chunks(meta, start: Sequence[int], shape: Sequence[int]) -> bool:
    chunks = meta.chunk_grid.chunk_shape
    return all(
        s % c == 0 and ((s + n) % c == 0 or s + n == size)
        for s, n, c, size in zip(start, shape, chunks, meta.shape, strict=True)
    )


def _all_fill(block: np.ndarray, fill: np.ndarray) -> bool:
    # a chunk with data usually shows it in its first row: that answer costs nothing (checking the whole of
    # a strided 1000² uint8 chunk costs 0.1 ms)
    if block.size and not _is_fill(block[(0,) * (block.ndim - 1)], fill):
        return False
    return _is_fill(block, fill)


def _is_fill(block: np.ndarray, fill: np.ndarray) -> bool:
    if fill == 0:
        return not block.any()
    return bool((block == fill).all())


def _direct_target(arr: zarr.Array):
    """``(chunk folder, encode)`` for a local zarr v3 array with a regular chunk grid whose codecs are
    ``bytes`` (little-endian or one-byte values) optionally followed by Blosc; else None."""
    from zarr.storage import LocalStore

    if not isinstance(arr.store, LocalStore):
        return None
    encode = _encoder(arr.metadata, arr.dtype)
    if encode is None:
        return None
    return os.path.join(str(arr.store.root), arr.path), encode


def _encoder(meta, dtype: np.dtype):
    """How a chunk of a zarr v3 array with ``meta`` becomes its file's bytes, where this module can do it
    (a regular grid; ``bytes``, little-endian or one-byte values, optionally followed by Blosc); else None."""
    from zarr.codecs import BloscCodec, BytesCodec

    if getattr(meta, "zarr_format", None) != 3 or not hasattr(meta.chunk_grid, "chunk_shape"):
        return None
    codecs = tuple(getattr(meta, "codecs", ()))
    if not codecs or not isinstance(codecs[0], BytesCodec) or len(codecs) > 2:
        return None
    if dtype.itemsize > 1 and (
        sys.byteorder != "little" or _setting(codecs[0].endian) not in (None, "little")
    ):
        return None
    if np.dtype(dtype).kind not in "biuf":
        return None
    if len(codecs) == 1:
        return _as_bytes
    if not isinstance(codecs[1], BloscCodec):
        return None
    return _numcodecs_blosc(codecs[1], dtype).encode


def _setting(value):
    """A codec setting as its name: zarr 3.1 (the image's, on Python 3.11) keeps ``endian`` and
    ``index_location`` as enums, zarr 3.4 as strings."""
    return getattr(value, "value", value)


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
