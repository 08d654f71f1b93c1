"""One stored chunk of a remote array (an N5 block, a Zarr v2 chunk), read and decoded within its declared size.

An array's metadata declares its chunks' shape and data type, and an object holds each chunk, compressed:
all three are the store's claims. A 255 KB gzip object declared as a 64 × 64 chunk inflated to 256 MiB
before zarr-python refused it, so every chunk from outside goes through three bounds here, each checked
before the memory it guards is used:

- the declared chunk: every dimension a whole number ≥ 1 and shape × item size at most
  :data:`MAX_CHUNK_BYTES` (:func:`chunk_nbytes`, when the array is opened);
- the object: read with one ranged GET of :func:`max_stored_bytes` + 1 bytes, refused when longer
  (:func:`read_chunk_object`): no codec stores a chunk in more than that;
- the decoded bytes: exactly the declared chunk's (:func:`decode_at_most`). gzip, zlib, bz2 and lzma stop
  after one byte more than that; blosc and lz4 frames state their size in a header, checked before
  decompressing; zstd decodes into a buffer of that size, its frame's stated size checked first.

The codecs are :data:`CODECS` (blosc with the inner compressors :data:`BLOSC_INNER`); any other is refused by
name, as is any codec the array's metadata adds (Zarr filters).
"""

from __future__ import annotations

import bz2
import lzma
import math
import struct
import zlib
from typing import Any

import numpy as np

from em_platform.formats.errors import FormatError
from em_platform.lazy_import import LazyModule

numcodecs = LazyModule("numcodecs")

MAX_CHUNK_BYTES = 2**31 - 1
"""One chunk, decoded: the N5 Java library holds a block in one Java array and c-blosc a buffer in a C int,
neither past 2³¹ − 1, so no N5 writer nor blosc-compressed Zarr makes a bigger chunk (OpenOrganelle's are
a few MiB); a chunk shape declaring more is refused when the array is opened."""

LZMA_MEMLIMIT = 2**27
"""The most memory an lzma/xz decoder may take: twice what xz's largest preset (9, a 64 MiB dictionary)
needs. A header asking for more (up to 4 GiB of dictionary) is refused instead of allocated."""

CODECS = ("gzip", "zlib", "bz2", "lzma", "zstd", "blosc", "lz4")
"""The compressors a chunk may have, by their numcodecs id (None: stored raw)."""

BLOSC_INNER = {0: "blosclz", 1: "lz4", 3: "zlib", 4: "zstd"}
"""c-blosc's compressor codes (a frame's flags, bits 5-7) that a blosc chunk may use (lz4hc writes code 1)."""

_BLOSC_HEADER = 16
_BLOSC_MEMCPYED = 0x02


def positive_sizes(values: Any, *, where: str, field: str) -> tuple[int, ...]:
    """An array's or chunk's shape from its metadata: a non-empty list of whole numbers ≥ 1, else
    FormatError naming ``where`` and ``field`` (an empty side would make a chunk of nothing, or divide by 0)."""
    ok = isinstance(values, list) and all(type(v) is int and v >= 1 for v in values)  # noqa: E721
    if not ok or not values:
        raise FormatError(
            f"{where}: {field} {values!r} must be a list of whole numbers ≥ 1 (no zero or negative side); "
            "the array's metadata is damaged: tell the source's maintainers"
        )
    return tuple(values)


def chunk_nbytes(chunks: Any, itemsize: int, *, where: str, field: str) -> int:
    """The decoded bytes of one chunk of ``chunks`` (:func:`positive_sizes`) × ``itemsize``; FormatError
    naming ``where`` and ``field`` for more than :data:`MAX_CHUNK_BYTES`."""
    nbytes = math.prod(positive_sizes(chunks, where=where, field=field)) * itemsize  # exact: no wrap
    if nbytes > MAX_CHUNK_BYTES:
        raise FormatError(
            f"{where}: {field} {list(chunks)} of {itemsize}-byte items is {nbytes} bytes a chunk, more than "
            f"the {MAX_CHUNK_BYTES} one chunk may have (MAX_CHUNK_BYTES); no N5 or Zarr writer makes such "
            "chunks: the metadata is damaged or hostile"
        )
    return nbytes


def max_stored_bytes(decoded: int, header: int = 0) -> int:
    """The most bytes an object encoding ``decoded`` bytes can take: ``header`` (a format's own, e.g. N5's
    block header) and the payload with the codecs' worst-case growth on incompressible data (zlib/gzip
    +0.03 %, bzip2 +1 %, xz, zstd and lz4 < 0.5 %, blosc +16 bytes) under 1/64 + 4 KiB."""
    return header + decoded + decoded // 64 + 4096


def read_chunk_object(
    fs: Any, key: str, decoded: int, *, header: int = 0, what: str = "chunk object"
) -> bytes | None:
    """The object at ``key`` as stored, None when there is none (a chunk never written), or FormatError when it
    is longer than :func:`max_stored_bytes`: one ranged read of that bound + 1 bytes, so a bigger object costs
    no more memory than an honest one."""
    bound = max_stored_bytes(decoded, header)
    try:
        raw = fs.cat_file(key, start=0, end=bound + 1)
    except FileNotFoundError:
        return None
    if len(raw) > bound:
        raise FormatError(
            f"{key}: {what} of more than {bound} bytes, the most a chunk of {decoded} bytes can be stored in "
            "(max_stored_bytes); the object is not the chunk its array declares: refused unread, tell the "
            "source's maintainers"
        )
    return raw


def decode_at_most(
    codec: str | None,
    payload: bytes,
    nbytes: int,
    where: str,
    *,
    config: dict[str, Any] | None = None,
    what: str = "chunk",
    declared: str = "its array declares",
) -> bytes:
    """``payload`` decoded with ``codec`` (one of :data:`CODECS`, None for raw; ``config`` its numcodecs
    settings) to exactly ``nbytes``, never inflating more. FormatError naming ``where`` when it decodes to
    another size (``declared`` says who states ``nbytes``) or the codec is not one of them."""
    config = config or {}
    if codec is None:
        data = bytes(payload)
    elif codec in ("gzip", "zlib", "bz2", "lzma"):
        data = _inflate(codec, config, payload, nbytes, where)
    elif codec in ("blosc", "lz4", "zstd"):
        data = _decode_framed(codec, payload, nbytes, where, what, declared)
    else:
        raise refuse_codec(codec, where)
    if len(data) > nbytes:
        raise FormatError(
            f"{where}: {what} decodes to more than the {nbytes} bytes {declared}; a decompression bomb is "
            "stopped there, never inflated: the object is damaged or hostile"
        )
    if len(data) < nbytes:
        raise FormatError(
            f"{where}: {what} cannot be decoded to the {nbytes} bytes {declared} (it gives {len(data)}): the "
            "object is corrupt or truncated; fetch it again, and tell the source's maintainers if it persists"
        )
    return data


def refuse_codec(codec: Any, where: str) -> FormatError:
    """The error for a compressor or filter that is not one of :data:`CODECS`."""
    return FormatError(
        f"{where}: codec {codec!r} is not supported (the codecs read are raw, {', '.join(CODECS)}); "
        "convert the array, or ask for the codec to be supported"
    )


def _inflate(codec: str, config: dict[str, Any], payload: bytes, nbytes: int, where: str) -> bytes:
    """A stream codec, at most ``nbytes`` + 1 bytes out (one more tells a longer stream), stream after
    stream (a gzip file may hold several members)."""
    if codec == "lzma":
        form = config.get("format", lzma.FORMAT_AUTO)
        if form not in (lzma.FORMAT_AUTO, lzma.FORMAT_XZ, lzma.FORMAT_ALONE):
            raise FormatError(f"{where}: lzma format {form!r} is not supported (xz and alone are)")

    def decompressor():
        if codec in ("gzip", "zlib"):
            return zlib.decompressobj(16 + zlib.MAX_WBITS if codec == "gzip" else zlib.MAX_WBITS)
        if codec == "bz2":
            return bz2.BZ2Decompressor()
        return lzma.LZMADecompressor(format=form, memlimit=LZMA_MEMLIMIT)

    out = bytearray()
    while payload and len(out) <= nbytes:
        d = decompressor()
        out += d.decompress(payload, nbytes + 1 - len(out))
        payload = d.unused_data if d.eof else b""
    return bytes(out)


def _decode_framed(codec: str, payload: bytes, nbytes: int, where: str, what: str, declared: str) -> bytes:
    """blosc, lz4 or zstd: the frame's stated size checked against ``nbytes`` before decompressing, then
    decoded into an ``nbytes`` buffer (the decoders stop at its end)."""
    stated: int | None  # the decoded size the frame states, if it states one
    if codec == "blosc":
        stated = _blosc_checked(payload, nbytes, where, what)
        decoder = numcodecs.Blosc()
    elif codec == "lz4":
        stated = struct.unpack_from("<I", payload, 0)[0] if len(payload) >= 4 else None
        decoder = numcodecs.LZ4()
    else:
        stated = _zstd_content_size(payload)
        decoder = numcodecs.Zstd()
    if stated is not None and stated != nbytes:
        raise FormatError(
            f"{where}: {what}'s {codec} frame states {stated} bytes, {declared} {nbytes}: refused before "
            "decompressing (a decompression bomb or a damaged object)"
        )
    out = np.empty(nbytes, np.uint8)
    try:
        decoder.decode(payload, out=out)
    except (ValueError, RuntimeError) as exc:  # "destination buffer too small", a frame cut short
        raise FormatError(
            f"{where}: {what} does not decode to the {nbytes} bytes {declared} ({exc})"
        ) from None
    return out.tobytes()


def _blosc_checked(payload: bytes, nbytes: int, where: str, what: str) -> int:
    """The decoded size a blosc frame's header states (bytes 4-8), once its header is whole, its stored
    size (bytes 12-16) is the object's, its block size fits and its inner compressor is one of
    :data:`BLOSC_INNER`."""
    if len(payload) < _BLOSC_HEADER:
        raise FormatError(f"{where}: {what} of {len(payload)} bytes is shorter than a blosc header")
    flags = payload[2]
    stated, blocksize, cbytes = struct.unpack_from("<III", payload, 4)
    if cbytes != len(payload):
        raise FormatError(
            f"{where}: {what}'s blosc header states {cbytes} stored bytes, the object has {len(payload)}"
        )
    if blocksize > max(stated, 1):
        raise FormatError(f"{where}: {what}'s blosc header states blocks of {blocksize} bytes in {stated}")
    inner = flags >> 5
    if not flags & _BLOSC_MEMCPYED and inner not in BLOSC_INNER:
        raise FormatError(
            f"{where}: {what}'s blosc inner compressor (code {inner}) is not supported "
            f"({', '.join(BLOSC_INNER.values())} are)"
        )
    return stated


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
