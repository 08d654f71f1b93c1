"""A minimal, read-only N5 array reader over any fsspec file system (zarr-python 3 cannot read N5).

N5 (https://github.com/saalfeldlab/n5) keeps an array's header in ``attributes.json`` (``dimensions``,
``blockSize``, ``dataType``, ``compression``) and each block as one object at ``{i_x}/{i_y}/{i_z}``: a
big-endian header (mode, ndim, the block's own dims, and for mode 1 an element count) then the compressed
big-endian payload, x fastest. Dimensions are listed fastest-first (x, y, z); this reader exposes the numpy
(z, y, x) view. Edge blocks may be stored smaller than ``blockSize``; a block never written reads as 0.

Sizes are the store's claims and are bounded before they are used: ``dimensions`` and ``blockSize`` positive
whole numbers, one block at most :data:`MAX_BLOCK_BYTES`; a block object is read only up to the largest
encoding of a ``blockSize`` block, and decompressed only up to the size its header states, itself at most
``blockSize`` × data type (a decompression bomb is refused, never inflated).

Also here: the voxel size of a level as OpenOrganelle/COSEM publish it (the array's ``transform`` or
``pixelResolution``; the group's COSEM ``multiscales`` or Neuroglancer ``scales``).
"""

from __future__ import annotations

import bz2
import json
import lzma
import math
import posixpath
import struct
import zlib
from typing import Any

import numpy as np

from em_platform.formats.volume import UNIT_TO_NM, FormatError, normalise_unit
from em_platform.lazy_import import LazyModule
from em_platform.sources.bounds import MAX_METADATA_BYTES, cat_limited

da = LazyModule("dask.array")
numcodecs = LazyModule("numcodecs")

ATTRIBUTES = "attributes.json"

MAX_BLOCK_BYTES = 2**31 - 1
"""One N5 block, decoded: the N5 Java library holds a block in one Java array, which cannot pass 2³¹ − 1
elements, so no N5 writer makes a bigger one; a ``blockSize`` claiming more is refused at open."""


def _stored_bound(decoded: int) -> int:
    """The most bytes a block object encoding ``decoded`` bytes can take: the header (mode, ndim, up to
    16 dims, element count) and the payload with the worst-case growth of the codecs (incompressible data:
    zlib/gzip +0.03 %, bzip2 +1 %, xz and zstd < 0.1 %, blosc +16 bytes) under 1/64 + 4 KiB."""
    return 4 + 4 * 16 + 4 + decoded + decoded // 64 + 4096


DTYPES = {
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


def n5_codec(compression: dict[str, Any] | None, where: str = "N5 array") -> Any:
    """The numcodecs codec for an N5 ``compression`` entry (None for raw).

    The N5 Java library and tensorstore write gzip as a gzip stream (``useZlib``: a zlib one), bzip2 and
    xz as their stream formats, and blosc/zstd as the frames their C libraries write.
    """
    kind = (compression or {}).get("type", "raw")
    if kind == "raw":
        return None
    if kind == "gzip":
        return numcodecs.Zlib() if compression.get("useZlib") else numcodecs.GZip()
    if kind == "bzip2":
        return numcodecs.BZ2()
    if kind == "xz":
        return numcodecs.LZMA()
    if kind == "blosc":
        return numcodecs.Blosc()
    if kind == "zstd":
        return numcodecs.Zstd()
    raise FormatError(
        f"{where}: N5 compression {kind!r} is not supported (raw, gzip, bzip2, xz, blosc, zstd are); "
        "convert the array or ask for it to be supported"
    )


class N5Array:
    """One N5 dataset (array), opened from its ``attributes.json``; geometry in numpy (z, y, x) order."""

    def __init__(self, fs: Any, path: str):
        self.fs = fs
        self.path = path.rstrip("/")
        header = posixpath.join(self.path, ATTRIBUTES)
        try:
            attrs = json.loads(cat_limited(fs, header, MAX_METADATA_BYTES, field="attributes.json"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{header}: no N5 array here (no attributes.json)") from None
        except ValueError as exc:
            raise FormatError(f"{header}: not valid JSON ({exc})") from exc
        if "dimensions" not in attrs or "blockSize" not in attrs or "dataType" not in attrs:
            raise FormatError(f"{header}: an N5 group, not an array (no dimensions/blockSize/dataType)")
        if attrs["dataType"] not in DTYPES:
            raise FormatError(f"{header}: N5 data type {attrs['dataType']!r} is not supported")
        if len(attrs["dimensions"]) != len(attrs["blockSize"]):
            raise FormatError(f"{header}: dimensions and blockSize have different lengths")
        self.attributes: dict[str, Any] = attrs
        self.shape: tuple[int, ...] = _positive(attrs["dimensions"], "dimensions", header)[::-1]
        self.chunks: tuple[int, ...] = _positive(attrs["blockSize"], "blockSize", header)[::-1]
        self.stored_dtype = np.dtype(DTYPES[attrs["dataType"]])  # big-endian, as in the blocks
        self.dtype = self.stored_dtype.newbyteorder("=")  # what read_block returns
        self.block_bytes = math.prod(self.chunks) * self.stored_dtype.itemsize  # exact: no wrap
        if self.block_bytes > MAX_BLOCK_BYTES:
            raise FormatError(
                f"{header}: blockSize {attrs['blockSize']} of {attrs['dataType']} is {self.block_bytes} bytes a "
                f"block, more than the {MAX_BLOCK_BYTES} an N5 block can hold (MAX_BLOCK_BYTES)"
            )
        self.compression: dict[str, Any] = attrs.get("compression") or {"type": "raw"}
        self.codec = n5_codec(self.compression, header)

    def __repr__(self) -> str:
        return f"N5Array({self.path!r}, shape={self.shape}, chunks={self.chunks}, dtype={self.dtype})"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def grid(self) -> tuple[int, ...]:
        """Blocks per axis, (z, y, x)."""
        return tuple(-(-n // c) for n, c in zip(self.shape, self.chunks, strict=True))

    def block_key(self, idx: tuple[int, ...]) -> str:
        """The block object's path for a (z, y, x) grid index (N5 names it x first)."""
        return posixpath.join(self.path, *(str(int(i)) for i in reversed(idx)))

    def block_region(self, idx: tuple[int, ...]) -> tuple[slice, ...]:
        """The voxels a block covers, clipped at the array's edge."""
        if len(idx) != self.ndim or any(not 0 <= i < g for i, g in zip(idx, self.grid, strict=True)):
            raise IndexError(f"{self.path}: block {tuple(idx)} is outside the grid {self.grid}")
        return tuple(
            slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, self.chunks, self.shape, strict=True)
        )

    def read_raw(self, idx: tuple[int, ...]) -> bytes | None:
        """The block object's bytes as stored, or None when the block was never written."""
        self.block_region(idx)
        key = self.block_key(idx)
        try:
            raw = self.fs.cat_file(key, start=0, end=_stored_bound(self.block_bytes) + 1)
        except FileNotFoundError:
            return None
        if len(raw) > _stored_bound(self.block_bytes):
            raise FormatError(
                f"{key}: N5 block object of more than {_stored_bound(self.block_bytes)} bytes, the largest a "
                f"blockSize {list(self.chunks[::-1])} block of {self.stored_dtype.name} can be stored in"
            )
        return raw

    def decode_block(self, raw: bytes | None, idx: tuple[int, ...]) -> np.ndarray:
        """A block's voxels (native byte order, clipped to the array's edge) from its stored bytes."""
        want = tuple(s.stop - s.start for s in self.block_region(idx))
        if raw is None:
            return np.zeros(want, dtype=self.dtype)
        key = self.block_key(idx)
        try:
            mode, ndim = struct.unpack_from(">HH", raw, 0)
            if mode not in (0, 1):
                raise FormatError(f"{key}: N5 block mode {mode} (object blocks) is not supported")
            dims = struct.unpack_from(f">{ndim}I", raw, 4)
            start = 4 + 4 * ndim
            count = math.prod(dims)  # exact: four dims of 2³² wrap numpy's product
            if mode == 1:
                (count,) = struct.unpack_from(">I", raw, start)
                start += 4
            nbytes = count * self.stored_dtype.itemsize
            if nbytes > self.block_bytes:
                raise FormatError(
                    f"{key}: N5 block header claims {count} elements ({nbytes} bytes), more than blockSize "
                    f"{list(self.chunks[::-1])} × {self.stored_dtype.name} = {self.block_bytes} bytes"
                )
            data = decode_at_most(self.compression, raw[start:], nbytes, key)
            flat = np.frombuffer(data, dtype=self.stored_dtype, count=count)
        except FormatError:
            raise
        except Exception as exc:
            raise FormatError(
                f"{key}: N5 block cannot be decoded ({type(exc).__name__}: {exc}); the object is corrupt or "
                "truncated: fetch it again, and tell the source's maintainers if it persists"
            ) from exc
        shape = tuple(reversed(dims))  # the block's own (z, y, x) size: smaller than blockSize at an edge
        if (
            ndim != self.ndim
            or count < math.prod(shape)
            or any(b < w for b, w in zip(shape, want, strict=True))
        ):
            raise FormatError(f"{key}: N5 block holds {shape} voxels ({count} elements), expected {want}")
        block = flat[: math.prod(shape)].reshape(shape)[tuple(slice(0, w) for w in want)]
        return np.ascontiguousarray(block, dtype=self.dtype)

    def read_block(self, idx: tuple[int, ...]) -> np.ndarray:
        """One block's voxels in (z, y, x) order, native byte order, clipped at the edge (0 if never written)."""
        return self.decode_block(self.read_raw(idx), idx)

    def to_dask(self) -> da.Array:
        """The whole array, lazily: one dask chunk per N5 block."""
        chunks = tuple(
            tuple(min(c, n - i * c) for i in range(g))
            for c, n, g in zip(self.chunks, self.shape, self.grid, strict=True)
        )

        def block(block_id: tuple[int, ...] | None = None) -> np.ndarray:
            return self.read_block(block_id)

        return da.map_blocks(
            block, chunks=chunks, dtype=self.dtype, meta=np.empty((0,) * self.ndim, self.dtype)
        )


def read_attributes(fs: Any, path: str) -> dict[str, Any]:
    """A group's or array's ``attributes.json`` ({} when there is none), at most MAX_METADATA_BYTES."""
    try:
        return json.loads(
            cat_limited(
                fs, posixpath.join(path.rstrip("/"), ATTRIBUTES), MAX_METADATA_BYTES, field="attributes.json"
            )
        )
    except FileNotFoundError:
        return {}


def _positive(values: Any, field: str, where: str) -> tuple[int, ...]:
    ok = isinstance(values, list) and all(type(v) is int and v >= 1 for v in values)  # noqa: E721
    if not ok or not values:
        raise FormatError(f"{where}: {field} {values!r} must be a list of whole numbers ≥ 1")
    return tuple(values)


def decode_at_most(compression: dict[str, Any] | None, payload: bytes, nbytes: int, where: str) -> bytes:
    """A block's payload decompressed to exactly ``nbytes`` (what its header states), never inflating more:
    the stream codecs stop at ``nbytes`` + 1 and blosc/zstd decode into an ``nbytes`` buffer (they refuse
    before decompressing when their frame states more). FormatError naming ``where`` if it is not ``nbytes``."""
    kind = (compression or {}).get("type", "raw")
    if kind == "raw":
        data = payload
    elif kind in ("gzip", "bzip2", "xz"):
        data = _inflate(kind, compression, payload, nbytes)
    else:
        out = np.empty(nbytes, np.uint8)
        try:
            n5_codec(compression, where).decode(payload, out=out)
        except ValueError as exc:  # "destination buffer too small; expected at least ..."
            raise FormatError(f"{where}: N5 block decodes to more than its {nbytes} bytes ({exc})") from None
        stated = _blosc_nbytes(payload) if kind == "blosc" else _zstd_content_size(payload)
        if stated not in (None, nbytes):
            raise FormatError(
                f"{where}: N5 block's {kind} frame holds {stated} bytes, its header states {nbytes}"
            )
        data = out.tobytes()
    if len(data) > nbytes:
        raise FormatError(f"{where}: N5 block decodes to more than the {nbytes} bytes its header states")
    if len(data) < nbytes:
        raise FormatError(f"{where}: N5 block decodes to {len(data)} bytes, its header states {nbytes}")
    return data


def _inflate(kind: str, compression: dict[str, Any], payload: bytes, nbytes: int) -> bytes:
    """zlib/gzip, bzip2 or xz, at most ``nbytes`` + 1 bytes out (one more tells a longer stream)."""

    def decompressor():
        if kind == "gzip":
            return zlib.decompressobj(zlib.MAX_WBITS if compression.get("useZlib") else 16 + zlib.MAX_WBITS)
        return bz2.BZ2Decompressor() if kind == "bzip2" else lzma.LZMADecompressor()

    out = bytearray()
    while payload and len(out) <= nbytes:  # stream after stream: a gzip file may hold several members
        d = decompressor()
        out += d.decompress(payload, nbytes + 1 - len(out))
        payload = d.unused_data if d.eof else b""
    return bytes(out)


def _blosc_nbytes(payload: bytes) -> int:
    """The decompressed size a blosc frame states (its header's bytes 4-8, little-endian)."""
    return struct.unpack_from("<I", payload, 4)[0] if len(payload) >= 16 else -1


def _zstd_content_size(payload: bytes) -> int | None:
    """The Frame_Content_Size a zstd frame header states (RFC 8878 3.1.1.1), None when it states none.

    Decoding into an ``nbytes`` buffer refuses a longer frame; this tells a shorter one, which would leave
    the buffer's tail unwritten. (A frame without it is checked by the decoder: its length must be exact.)"""
    if len(payload) < 6 or payload[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = payload[4]
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    at = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(payload) < at + size:
        return None
    value = int.from_bytes(payload[at : at + size], "little")
    return value + 256 if size == 2 else value


def scale_to_nm(values: dict[str, float], units: list[Any] | None, where: str) -> dict[str, float]:
    """Per-axis sizes in nm from values in the given units (None: nm, as COSEM metadata means)."""
    units = list(units) if units else ["nm"] * len(values)
    out = {}
    for (axis, value), unit in zip(values.items(), units, strict=True):
        name = normalise_unit(unit) if isinstance(unit, str) else None
        if name is None:
            raise FormatError(f"{where}: unknown unit {unit!r} for axis {axis} in its multiscale metadata")
        out[axis] = float(value) * UNIT_TO_NM[name]
    return out


def level_voxel_size_nm(
    array_attrs: dict[str, Any], group_attrs: dict[str, Any], level: str, where: str
) -> dict[str, float] | None:
    """The voxel size of one level in nm, by axis name, as COSEM/OpenOrganelle N5 metadata states it.

    In order of precedence: the array's COSEM ``transform`` {axes, scale, units}; its ``pixelResolution``
    ({dimensions, unit} or a bare list; x first); the group's COSEM ``multiscales`` (datasets with a
    ``transform``); the group's Neuroglancer ``scales`` (x-first factors per level) times its
    ``pixelResolution``/``resolution``. None when none of them is there.
    """
    t = array_attrs.get("transform")
    if isinstance(t, dict) and "scale" in t:
        return scale_to_nm(dict(zip(t["axes"], t["scale"], strict=True)), t.get("units"), where)
    res = array_attrs.get("pixelResolution")
    if isinstance(res, dict) and "dimensions" in res:
        dims = res["dimensions"]
        return scale_to_nm(dict(zip("xyz", dims, strict=True)), [res.get("unit", "nm")] * len(dims), where)
    if isinstance(res, list):
        return scale_to_nm(dict(zip("xyz", res, strict=True)), None, where)
    for ms in group_attrs.get("multiscales", []) or []:
        for ds in ms.get("datasets", []):
            t = ds.get("transform")
            if ds.get("path") == level and isinstance(t, dict) and "scale" in t:
                return scale_to_nm(dict(zip(t["axes"], t["scale"], strict=True)), t.get("units"), where)
    scales = group_attrs.get("scales")
    base = group_attrs.get("pixelResolution") or group_attrs.get("resolution")
    if scales and base and level.startswith("s") and level[1:].isdigit() and int(level[1:]) < len(scales):
        factors = scales[int(level[1:])]
        if isinstance(base, dict):
            units, base = [base.get("unit", "nm")] * len(base["dimensions"]), base["dimensions"]
        else:
            units = group_attrs.get("units")
        axes = group_attrs.get("axes") or list("xyz")
        return scale_to_nm({a: b * f for a, b, f in zip(axes, base, factors, strict=True)}, units, where)
    return None
