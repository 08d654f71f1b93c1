"""A minimal, read-only Zarr v2 array reader over any fsspec file system, for arrays from outside.

zarr-python decodes a chunk however big it inflates and makes arrays of whatever ``dtype`` the metadata
names; a public store's ``.zarray`` is a claim, so this reader checks it first and reads each chunk itself:
``dtype`` on the allow-list (:func:`~em_platform.formats.dtypes.checked_dtype`), ``shape`` and ``chunks``
whole numbers ≥ 1 with a chunk of at most :data:`~em_platform.sources.chunk_codecs.MAX_CHUNK_BYTES`, the
compressor one of :data:`~em_platform.sources.chunk_codecs.CODECS` and no filters; each chunk object read
and decompressed within its declared size (:mod:`em_platform.sources.chunk_codecs`).

Layout (https://zarr-specs.readthedocs.io/en/latest/v2/v2.0.html): ``.zarray`` holds the metadata, ``.zattrs``
the attributes, each chunk is one object named by its grid index joined with ``dimension_separator``, always
a whole chunk (edge chunks padded) in ``order`` C or F; a chunk never written reads as ``fill_value``.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Any

import numpy as np

from em_platform.formats.dtypes import checked_dtype
from em_platform.formats.errors import FormatError
from em_platform.sources.bounds import MAX_METADATA_BYTES, cat_limited
from em_platform.sources.chunk_codecs import (
    CODECS,
    chunk_nbytes,
    decode_at_most,
    positive_sizes,
    read_chunk_object,
    refuse_codec,
)

ZARRAY = ".zarray"
ZATTRS = ".zattrs"
_FLOAT_FILLS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class ZarrV2Array:
    """One Zarr v2 array at ``path`` on ``fs``, opened from its checked ``.zarray``."""

    def __init__(self, fs: Any, path: str):
        self.fs = fs
        self.path = path.rstrip("/")
        header = posixpath.join(self.path, ZARRAY)
        try:
            meta = json.loads(cat_limited(fs, header, MAX_METADATA_BYTES, field=ZARRAY))
        except FileNotFoundError:
            raise FileNotFoundError(f"{header}: no Zarr v2 array here (no .zarray)") from None
        except ValueError as exc:
            raise FormatError(f"{header}: not valid JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("zarr_format") != 2:
            raise FormatError(f"{header}: not Zarr v2 array metadata (zarr_format is not 2)")
        self.metadata: dict[str, Any] = meta
        self.dtype = checked_dtype(
            meta.get("dtype"),
            where=header,
            hint="this array cannot be ingested: choose another one, or tell the source's maintainers",
        )
        # JSON of any kind until positive_sizes and chunk_nbytes refuse all but lists of whole numbers ≥ 1
        shape: Any = meta.get("shape")
        chunks: Any = meta.get("chunks")
        positive_sizes(shape, where=header, field="shape")
        self.chunk_bytes = chunk_nbytes(chunks, self.dtype.itemsize, where=header, field="chunks")
        if len(chunks) != len(shape):
            raise FormatError(f"{header}: shape {shape} and chunks {chunks} have different lengths")
        self.shape: tuple[int, ...] = tuple(shape)
        self.chunks: tuple[int, ...] = tuple(chunks)
        self.order = meta.get("order", "C")
        if self.order not in ("C", "F"):
            raise FormatError(f'{header}: order {self.order!r} must be "C" or "F"')
        self.separator = meta.get("dimension_separator") or "."
        if self.separator not in (".", "/"):
            raise FormatError(f'{header}: dimension_separator {self.separator!r} must be "." or "/"')
        if meta.get("filters"):
            filters = meta["filters"] if isinstance(meta["filters"], list) else [meta["filters"]]
            raise refuse_codec(
                [f.get("id") if isinstance(f, dict) else f for f in filters], f"{header} filters"
            )
        compressor = meta.get("compressor")
        if compressor is not None and not (isinstance(compressor, dict) and compressor.get("id") in CODECS):
            raise refuse_codec(compressor.get("id") if isinstance(compressor, dict) else compressor, header)
        self.codec: str | None = None if compressor is None else compressor["id"]
        self.codec_config: dict[str, Any] = dict(compressor or {})
        self.fill_value = _fill_value(meta.get("fill_value"), self.dtype, header)

    def __repr__(self) -> str:
        return f"ZarrV2Array({self.path!r}, shape={self.shape}, chunks={self.chunks}, dtype={self.dtype})"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def native_dtype(self) -> np.dtype:
        """What :meth:`decode_chunk` returns: the stored type in this machine's byte order."""
        return self.dtype.newbyteorder("=")

    def attributes(self) -> dict[str, Any]:
        """The array's ``.zattrs`` ({} when there is none), at most MAX_METADATA_BYTES."""
        try:
            attrs = json.loads(
                cat_limited(self.fs, posixpath.join(self.path, ZATTRS), MAX_METADATA_BYTES, field=ZATTRS)
            )
        except FileNotFoundError:
            return {}
        return attrs if isinstance(attrs, dict) else {}

    def chunk_key(self, idx: tuple[int, ...]) -> str:
        """The chunk object's path for a grid index."""
        return posixpath.join(self.path, self.separator.join(str(int(i)) for i in idx))

    def region(self, idx: tuple[int, ...]) -> tuple[slice, ...]:
        """The voxels a chunk covers, clipped at the array's edge."""
        grid = tuple(-(-n // c) for n, c in zip(self.shape, self.chunks, strict=True))
        if len(idx) != self.ndim or any(not 0 <= i < g for i, g in zip(idx, grid, strict=True)):
            raise IndexError(f"{self.path}: chunk {tuple(idx)} is outside the grid {grid}")
        return tuple(
            slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, self.chunks, self.shape, strict=True)
        )

    def read_raw(self, idx: tuple[int, ...]) -> bytes | None:
        """The chunk object's bytes as stored (bounded), or None when the chunk was never written."""
        self.region(idx)
        return read_chunk_object(self.fs, self.chunk_key(idx), self.chunk_bytes)

    def decode_chunk(self, raw: bytes | None, idx: tuple[int, ...]) -> np.ndarray:
        """A chunk's voxels (native byte order, clipped to the array's edge) from its stored bytes."""
        region = self.region(idx)
        want = tuple(s.stop - s.start for s in region)
        if raw is None:
            return np.full(want, self.fill_value, dtype=self.native_dtype)
        key = self.chunk_key(idx)
        try:
            data = decode_at_most(self.codec, raw, self.chunk_bytes, key, config=self.codec_config)
        except FormatError:
            raise
        except Exception as exc:
            raise FormatError(
                f"{key}: chunk cannot be decoded ({type(exc).__name__}: {exc}); the object is corrupt or "
                "truncated: fetch it again, and tell the source's maintainers if it persists"
            ) from exc
        block = np.frombuffer(data, dtype=self.dtype).reshape(self.chunks, order=self.order)
        return np.ascontiguousarray(block[tuple(slice(0, w) for w in want)], dtype=self.native_dtype)

    def read_chunk(self, idx: tuple[int, ...]) -> np.ndarray:
        return self.decode_chunk(self.read_raw(idx), idx)


def _fill_value(value: Any, dtype: np.dtype, where: str) -> Any:
    """The stored ``fill_value`` as a number of ``dtype`` (null: 0, as zarr-python reads it)."""
    if value is None:
        return 0
    if isinstance(value, str) and value in _FLOAT_FILLS and dtype.kind == "f":
        return _FLOAT_FILLS[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FormatError(f"{where}: fill_value {value!r} is not a number of {dtype.name}")
    try:
        np.array(value, dtype=dtype)
    except (OverflowError, ValueError):
        raise FormatError(f"{where}: fill_value {value!r} does not fit {dtype.name}") from None
    return value
