"""A minimal, read-only N5 array reader over any fsspec file system (zarr-python 3 cannot read N5).

N5 (https://github.com/saalfeldlab/n5) keeps an array's header in ``attributes.json`` (``dimensions``,
``blockSize``, ``dataType``, ``compression``) and each block as one object at ``{i_x}/{i_y}/{i_z}``: a
big-endian header (mode, ndim, the block's own dims, and for mode 1 an element count) then the compressed
big-endian payload, x fastest. Dimensions are listed fastest-first (x, y, z); this reader exposes the numpy
(z, y, x) view. Edge blocks may be stored smaller than ``blockSize``; a block never written reads as 0.

Sizes and types are the store's claims and are bounded before they are used: ``dataType`` one of
:data:`DTYPES` (each on the allow-list of :mod:`em_platform.formats.dtypes`), ``dimensions`` and ``blockSize``
positive whole numbers, one block at most :data:`~em_platform.sources.chunk_codecs.MAX_CHUNK_BYTES`; a block
object is read only up to the largest encoding of a ``blockSize`` block, and decompressed only up to the size
its header states, itself at most ``blockSize`` × data type (:mod:`em_platform.sources.chunk_codecs`: a
decompression bomb is refused, never inflated).

Also here: the voxel size of a level as OpenOrganelle/COSEM publish it (the array's ``transform`` or
``pixelResolution``; the group's COSEM ``multiscales`` or Neuroglancer ``scales``).
"""

from __future__ import annotations

import json
import math
import posixpath
import struct
from typing import TYPE_CHECKING, Any

import numpy as np

from em_platform.formats.dtypes import checked_dtype
from em_platform.formats.errors import FormatError
from em_platform.formats.volume import UNIT_TO_NM, normalise_unit
from em_platform.lazy_import import LazyModule
from em_platform.sources.bounds import MAX_METADATA_BYTES, cat_limited
from em_platform.sources.chunk_codecs import chunk_nbytes, decode_at_most, positive_sizes, read_chunk_object

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    import dask.array as da
else:
    da = LazyModule("dask.array")

ATTRIBUTES = "attributes.json"

BLOCK_HEADER_BYTES = 4 + 4 * 16 + 4
"""The most an N5 block header takes: mode and ndim, up to 16 dimensions, the element count of mode 1."""


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


def n5_codec(
    compression: dict[str, Any] | None, where: str = "N5 array"
) -> tuple[str | None, dict[str, Any]]:
    """The codec (an id of :data:`~em_platform.sources.chunk_codecs.CODECS`, None for raw) and its settings
    for an N5 ``compression`` entry.

    The N5 Java library and tensorstore write gzip as a gzip stream (``useZlib``: a zlib one), bzip2 and
    xz as their stream formats, and blosc/zstd as the frames their C libraries write. N5's lz4 (lz4-java's
    block stream) is refused by name.
    """
    entry = compression or {}
    kind = entry.get("type", "raw")
    if kind == "raw":
        return None, {}
    if kind == "gzip":
        return ("zlib" if entry.get("useZlib") else "gzip"), {}
    if kind in ("bzip2", "xz", "blosc", "zstd"):
        return {"bzip2": "bz2", "xz": "lzma"}.get(kind, kind), {}
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
            raise FormatError(
                f"{header}: N5 data type {attrs['dataType']!r} is not supported ({', '.join(DTYPES)} are)"
            )
        if len(attrs["dimensions"]) != len(attrs["blockSize"]):
            raise FormatError(f"{header}: dimensions and blockSize have different lengths")
        self.attributes: dict[str, Any] = attrs
        self.shape: tuple[int, ...] = positive_sizes(attrs["dimensions"], where=header, field="dimensions")[
            ::-1
        ]
        # big-endian, as in the blocks
        self.stored_dtype = checked_dtype(DTYPES[attrs["dataType"]], where=header, field="dataType")
        self.dtype = self.stored_dtype.newbyteorder("=")  # what read_block returns
        self.block_bytes = chunk_nbytes(
            attrs["blockSize"], self.stored_dtype.itemsize, where=header, field="blockSize"
        )
        self.chunks: tuple[int, ...] = tuple(attrs["blockSize"])[::-1]
        self.compression: dict[str, Any] = attrs.get("compression") or {"type": "raw"}
        self.codec, self.codec_config = n5_codec(self.compression, header)

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
        return read_chunk_object(
            self.fs, self.block_key(idx), self.block_bytes, header=BLOCK_HEADER_BYTES, what="N5 block object"
        )

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
            data = decode_at_most(
                self.codec,
                raw[start:],
                nbytes,
                key,
                config=self.codec_config,
                what="N5 block",
                declared="its header states",
            )
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
            assert block_id is not None  # map_blocks passes each block's index to a block_id parameter
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
        units: list[Any] | None
        if isinstance(base, dict):
            units, base = [base.get("unit", "nm")] * len(base["dimensions"]), base["dimensions"]
        else:
            units = group_attrs.get("units")
        axes = group_attrs.get("axes") or list("xyz")
        return scale_to_nm({a: b * f for a, b, f in zip(axes, base, factors, strict=True)}, units, where)
    return None
