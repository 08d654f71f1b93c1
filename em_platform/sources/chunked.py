"""Zarr v2 and N5 arrays on any fsspec file system, read one raw chunk object at a time.

Reading the stored objects ourselves (rather than through a zarr library) gives the sha256 of every
object as received, lets a download resume chunk by chunk, and covers N5, which zarr-python 3 cannot
read. Both formats are simple: a JSON header (``.zarray`` / ``attributes.json``) and one compressed
object per chunk, keyed by its grid index (N5: x first, with a small big-endian header per block).
"""

from __future__ import annotations

import json
import posixpath
import struct
from dataclasses import dataclass
from typing import Any

import numcodecs
import numpy as np

from em_platform.formats import FormatError

_N5_DTYPES = {
    "uint8": "u1",
    "uint16": ">u2",
    "uint32": ">u4",
    "uint64": ">u8",
    "int8": "i1",
    "int16": ">i2",
    "int32": ">i4",
    "int64": ">i8",
    "float32": ">f4",
    "float64": ">f8",
}


def _n5_codec(compression: dict[str, Any] | None):
    kind = (compression or {"type": "raw"}).get("type", "raw")
    if kind == "raw":
        return None
    if kind == "gzip":
        return numcodecs.Zlib() if compression.get("useZlib") else numcodecs.GZip()
    if kind == "zstd":
        return numcodecs.Zstd()
    if kind == "blosc":
        return numcodecs.Blosc()
    if kind == "bzip2":
        return numcodecs.BZ2()
    if kind == "xz":
        return numcodecs.LZMA()
    if kind == "lz4":
        return numcodecs.LZ4()
    raise FormatError(
        f"N5 compression {kind!r} is not supported (raw, gzip, zstd, blosc, bzip2, xz, lz4 are)"
    )


@dataclass(frozen=True)
class ChunkedArray:
    """One stored array: its geometry in numpy (z, y, x) order, its codec, and how chunk objects are named."""

    fs: Any
    path: str  # the array's folder on ``fs`` (no protocol)
    format: str  # "zarr2" or "n5"
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype  # as stored (N5: big-endian)
    codec: Any  # numcodecs codec, or None for raw
    fill_value: Any
    separator: str = "."  # zarr v2 dimension_separator
    attributes: dict[str, Any] | None = None  # N5 attributes.json, or zarr .zattrs

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-n // c) for n, c in zip(self.shape, self.chunks, strict=True))

    def key(self, index: tuple[int, ...]) -> str:
        """The chunk object's path for a (z, y, x) grid index."""
        if self.format == "n5":
            return posixpath.join(self.path, *(str(i) for i in reversed(index)))
        return posixpath.join(self.path, self.separator.join(str(i) for i in index))

    def region(self, index: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(
            slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.chunks, self.shape, strict=True)
        )

    def decode(self, raw: bytes | None, index: tuple[int, ...]) -> np.ndarray:
        """The chunk's voxels, native byte order, clipped to the array's edge (None = a chunk never written)."""
        want = tuple(s.stop - s.start for s in self.region(index))
        native = self.dtype.newbyteorder("=")
        if raw is None:
            return np.full(want, self.fill_value or 0, dtype=native)
        try:
            if self.format == "n5":
                block = self._decode_n5(raw)
            else:
                data = self.codec.decode(raw) if self.codec else raw
                block = np.frombuffer(data, dtype=self.dtype).reshape(self.chunks)
        except FormatError:
            raise
        except Exception as exc:
            raise FormatError(
                f"{self.key(index)}: chunk cannot be decoded ({type(exc).__name__}: {exc}); the object is corrupt "
                "or truncated — re-run to fetch it again, and report it to the source if it persists"
            ) from exc
        if block.ndim != len(want) or any(b < w for b, w in zip(block.shape, want, strict=True)):
            raise FormatError(f"{self.key(index)}: chunk holds {block.shape} voxels, expected {want}")
        return np.ascontiguousarray(block[tuple(slice(0, w) for w in want)], dtype=native)

    def _decode_n5(self, raw: bytes) -> np.ndarray:
        mode, ndim = struct.unpack(">HH", raw[:4])
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        offset = 4 + 4 * ndim + (4 if mode == 1 else 0)
        payload = raw[offset:]
        data = self.codec.decode(payload) if self.codec else payload
        count = int(np.prod(dims))
        arr = np.frombuffer(data, dtype=self.dtype, count=count)
        return arr.reshape(tuple(reversed(dims)))


def open_chunked(fs, path: str) -> ChunkedArray:
    """Open the zarr v2 (``.zarray``) or N5 (``attributes.json`` with ``dimensions``) array at ``path``."""
    path = path.rstrip("/")
    zarray = posixpath.join(path, ".zarray")
    n5 = posixpath.join(path, "attributes.json")
    if fs.exists(zarray):
        meta = json.loads(fs.cat(zarray))
        if meta.get("order", "C") != "C" or meta.get("filters"):
            raise FormatError(f"{zarray}: only C-order arrays without filters are supported")
        zattrs = posixpath.join(path, ".zattrs")
        return ChunkedArray(
            fs=fs,
            path=path,
            format="zarr2",
            shape=tuple(meta["shape"]),
            chunks=tuple(meta["chunks"]),
            dtype=np.dtype(meta["dtype"]),
            codec=numcodecs.get_codec(meta["compressor"]) if meta.get("compressor") else None,
            fill_value=meta.get("fill_value", 0),
            separator=meta.get("dimension_separator", "."),
            attributes=json.loads(fs.cat(zattrs)) if fs.exists(zattrs) else {},
        )
    if fs.exists(n5):
        attrs = json.loads(fs.cat(n5))
        if "dimensions" not in attrs:
            raise FormatError(f"{n5}: an N5 group, not an array (no 'dimensions')")
        dtype = _N5_DTYPES.get(attrs["dataType"])
        if dtype is None:
            raise FormatError(f"{n5}: N5 data type {attrs['dataType']!r} is not supported")
        return ChunkedArray(
            fs=fs,
            path=path,
            format="n5",
            shape=tuple(reversed(attrs["dimensions"])),
            chunks=tuple(reversed(attrs["blockSize"])),
            dtype=np.dtype(dtype),
            codec=_n5_codec(attrs.get("compression")),
            fill_value=0,
            attributes=attrs,
        )
    raise FileNotFoundError(f"no zarr v2 (.zarray) or N5 (attributes.json) array at {path}")
