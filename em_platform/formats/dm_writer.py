"""A small writer of Gatan Digital Micrograph DM3/DM4 files, for the sample data and the tests.

Why this exists: no real DM files can be had offline under a licence we may ship (the only public
ones found, in old HyperSpy sdists, are GPL-3.0), and neither ncempy nor RosettaSciIO can write DM.
So the samples and tests write their own files here and check them with two independent readers (ncempy and
RosettaSciIO) before trusting them as input for ``em_platform.formats.dm.read_dm``.

What is written is the real DM tag-file structure, as described by the readers in ncempy
(``ncempy/io/dm.py``) and RosettaSciIO (``rsciio/digitalmicrograph/_api.py``) and as seen in
files saved by Digital Micrograph itself:

* header: version (3 or 4, big-endian uint32), root length (uint32 for DM3, uint64 for DM4),
  byte order of the data (1 = little-endian);
* the root tag group: ``is_sorted`` (1 byte), ``is_open`` (1 byte), number of tags (4 or 8 bytes);
* each tag entry: 20 (group) or 21 (data), label length (big-endian uint16), label; in DM4 then the
  entry's size in bytes (uint64); a group continues as above, a data tag with ``%%%%``, the length of
  its info array, the info array (all 4 or 8 byte big-endian integers) and the little-endian payload;
* the file ends with 8 zero bytes.

Only the tags the readers need (and a few DM always writes next to them) are produced: an
``ImageList`` with, per image, ``ImageData`` (``Calibrations`` with ``Brightness`` and one
``Dimension`` entry per axis holding ``Origin``/``Scale``/``Units``, then ``Data``, ``DataType``,
``Dimensions``, ``PixelDepth``), ``ImageTags``, ``Name`` and ``UniqueID``; optionally an RGB
thumbnail as image 0 plus the root ``Thumbnails`` list that marks it, as Digital Micrograph does.
Display and document tags (``DocumentObjectList``, ``Page Behavior``, ...) are not written, so
whether Digital Micrograph itself would open these files is untested. The ``ImageData`` subtree was
checked once, offline, against 36 real-valued files saved by Digital Micrograph (the HyperSpy 1.7 test
data, GPL-3.0, not shipped here): for the same pixels and calibration it is byte-identical to DM's.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# DM tag encodings (the "encoded type" in an info array).
SHORT, LONG, USHORT, ULONG, FLOAT, DOUBLE, BOOL, CHAR, OCTET = 2, 3, 4, 5, 6, 7, 8, 9, 10
STRUCT, ARRAY = 15, 20
_TAG_CODE = {
    SHORT: "h",
    LONG: "i",
    USHORT: "H",
    ULONG: "I",
    FLOAT: "f",
    DOUBLE: "d",
    BOOL: "B",
    CHAR: "b",
    OCTET: "B",
}

# numpy dtype -> (ImageData.DataType, encoded type of the Data array elements), as Digital Micrograph writes them.
IMAGE_TYPES: dict[np.dtype, tuple[int, int]] = {
    np.dtype("int16"): (1, SHORT),
    np.dtype("float32"): (2, FLOAT),
    np.dtype("uint8"): (6, OCTET),
    np.dtype("int32"): (7, LONG),
    np.dtype("int8"): (9, CHAR),
    np.dtype("uint16"): (10, USHORT),
    np.dtype("uint32"): (11, ULONG),
    np.dtype("float64"): (12, DOUBLE),
    np.dtype("bool"): (14, BOOL),
}
RGBA_DATA_TYPE = 23  # 4 bytes per pixel, used for thumbnails


@dataclass(frozen=True)
class Scalar:
    """A simple-typed tag value: one number of DM encoded type ``code``."""

    code: int
    value: float | int | bool


@dataclass(frozen=True)
class Struct:
    """A struct tag: unnamed fields, each (encoded type, value)."""

    fields: tuple[tuple[int, float | int], ...]


@dataclass(frozen=True)
class Array:
    """An array tag of a simple encoded type; ``payload`` is the little-endian bytes of ``length`` elements."""

    code: int
    length: int
    payload: bytes


def text(value: str) -> Array:
    """A DM string tag: an array of UTF-16 code units (encoded type USHORT), as DM stores text."""
    units = np.frombuffer(value.encode("utf-16-le"), dtype="<u2")
    return Array(USHORT, len(units), units.tobytes())


class _Encoder:
    def __init__(self, version: int):
        if version not in (3, 4):
            raise ValueError(f"DM version must be 3 or 4, not {version!r}")
        self.version = version
        self.word = ">I" if version == 3 else ">Q"  # sizes and info-array entries

    def words(self, *values: int) -> bytes:
        return b"".join(struct.pack(self.word, v) for v in values)

    def group(self, entries: Sequence[tuple[str, Any]], *, is_sorted: bool) -> bytes:
        body = bytes([int(is_sorted), 0]) + self.words(len(entries))
        return body + b"".join(self.entry(label, value) for label, value in entries)

    def entry(self, label: str, value: Any) -> bytes:
        if isinstance(value, Mapping):
            tag_id, body = 20, self.group(list(value.items()), is_sorted=True)
        elif isinstance(value, list):  # a DM "list": a group of unnamed entries
            tag_id, body = 20, self.group([("", v) for v in value], is_sorted=False)
        else:
            tag_id, body = 21, self.data(value)
        name = label.encode("latin-1")
        head = bytes([tag_id]) + struct.pack(">H", len(name)) + name
        if self.version == 4:
            head += struct.pack(">Q", len(body))  # DM4: size of the rest of the entry
        return head + body

    def data(self, value: Any) -> bytes:
        if isinstance(value, str):
            value = text(value)
        elif isinstance(value, bool):
            value = Scalar(BOOL, value)
        elif isinstance(value, int):
            value = Scalar(LONG, value)
        elif isinstance(value, float):
            value = Scalar(DOUBLE, value)
        if isinstance(value, Scalar):
            info, payload = [value.code], struct.pack("<" + _TAG_CODE[value.code], value.value)
        elif isinstance(value, Struct):
            info = [STRUCT, 0, len(value.fields)]
            for code, _ in value.fields:
                info += [0, code]  # (field name length, field type)
            payload = b"".join(struct.pack("<" + _TAG_CODE[c], v) for c, v in value.fields)
        elif isinstance(value, Array):
            info, payload = [ARRAY, value.code, value.length], value.payload
        else:
            raise TypeError(f"cannot encode {value!r} as a DM tag")
        return b"%%%%" + self.words(len(info), *info) + payload


def _calibration(origin: float, scale: float, unit: str) -> dict[str, Any]:
    return {"Origin": Scalar(FLOAT, origin), "Scale": Scalar(FLOAT, scale), "Units": text(unit)}


def _image_entry(
    data: np.ndarray,
    data_type: int,
    element_code: int,
    calibrations: Sequence[tuple[float, float, str]],
    image_tags: Mapping[str, Any],
    name: str,
    uid: int,
) -> dict[str, Any]:
    """One ``ImageList`` entry; ``calibrations`` and dimensions are in DM order (x first)."""
    element_size = struct.calcsize("<" + _TAG_CODE[element_code])
    payload = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
    return {
        "ImageData": {
            "Calibrations": {
                "Brightness": _calibration(0.0, 1.0, ""),
                "Dimension": [_calibration(o, s, u) for o, s, u in calibrations],
                "DisplayCalibratedUnits": True,
            },
            "Data": Array(element_code, len(payload) // element_size, payload),
            "DataType": Scalar(ULONG, data_type),
            "Dimensions": [Scalar(ULONG, n) for n in data.shape[::-1]],
            "PixelDepth": Scalar(ULONG, data.dtype.itemsize),
        },
        "ImageTags": dict(image_tags),
        "Name": name,
        "UniqueID": [Scalar(ULONG, uid + i) for i in range(4)],
    }


def _per_axis(values: Sequence[Any] | None, default: Any, ndim: int, what: str) -> list[Any]:
    if values is None:
        return [default] * ndim
    values = list(values)
    if len(values) != ndim:
        raise ValueError(f"{what} has {len(values)} entries for a {ndim}-D array")
    return values


def write_dm(
    path: str | Path,
    array: np.ndarray,
    *,
    version: int,
    scale: Sequence[float] | None = None,
    units: Sequence[str] | None = None,
    origin: Sequence[float] | None = None,
    image_tags: Mapping[str, Any] | None = None,
    name: str = "test image",
    thumbnail: bool = False,
) -> Path:
    """Write ``array`` (1-D, 2-D or 3-D) as a DM3 (``version=3``) or DM4 (``version=4``) file.

    ``scale``, ``units`` and ``origin`` are per axis in numpy order (``(z,) y, x``); the file stores
    them x first, as DM does. Defaults: scale 1, unit "" (uncalibrated), origin 0. ``origin`` is in
    pixels, as in DM (the calibrated position of pixel ``i`` is ``(i - origin) * scale``).
    ``image_tags`` become the image's ``ImageTags`` group (nested dicts are groups; ``str``, ``bool``,
    ``int``, ``float``, :class:`Scalar`, :class:`Struct` and :class:`Array` are tags). With
    ``thumbnail=True`` a small RGBA thumbnail is written first and listed under the root
    ``Thumbnails`` group, as Digital Micrograph does. Returns the path written.
    """
    path = Path(path)
    data = np.asarray(array)
    if not 1 <= data.ndim <= 4:
        raise ValueError(f"DM images have 1 to 4 dimensions, not {data.ndim}")
    if data.dtype.newbyteorder("=") not in IMAGE_TYPES:
        raise ValueError(
            f"dtype {data.dtype} is not supported; use one of {sorted(str(d) for d in IMAGE_TYPES)}"
        )
    data_type, element_code = IMAGE_TYPES[data.dtype.newbyteorder("=")]
    scales = _per_axis(scale, 1.0, data.ndim, "scale")
    unit_names = _per_axis(units, "", data.ndim, "units")
    origins = _per_axis(origin, 0.0, data.ndim, "origin")
    calibrations = list(zip(origins, scales, unit_names, strict=True))[::-1]

    images: list[dict[str, Any]] = []
    root: dict[str, Any] = {}
    if thumbnail:
        thumb = np.full((8, 8), 0xFF808080, dtype=np.uint32)  # opaque grey, one uint32 (BGRA) per pixel
        images.append(
            _image_entry(thumb, RGBA_DATA_TYPE, LONG, [(0.0, 1.0, "")] * 2, {}, f"Image Of {name}", 0x1000)
        )
    images.append(_image_entry(data, data_type, element_code, calibrations, image_tags or {}, name, 0x2000))
    root["ImageList"] = images
    root["InImageMode"] = True
    if thumbnail:
        root["Thumbnails"] = [
            {"ImageIndex": Scalar(ULONG, 0), "SourceSize_Pixels": Struct(((LONG, 8), (LONG, 8)))}
        ]

    enc = _Encoder(version)
    tags = enc.group(list(root.items()), is_sorted=True)
    # Root length as Digital Micrograph records it (GMS 2+): for DM4 the root group's size, for DM3 that + 4.
    root_length = len(tags) + (4 if version == 3 else 0)
    header = struct.pack(">I", version) + enc.words(root_length) + struct.pack(">I", 1)
    path.write_bytes(header + tags + bytes(8))
    return path


def data_offset(path: str | Path) -> int:
    """Byte offset of the (last) image's pixel data in a file written by :func:`write_dm`.

    Found by searching for the Data tag's label, which is enough for the simple files written here;
    tests use it to cut a file inside its data block.
    """
    raw = Path(path).read_bytes()
    version = struct.unpack(">I", raw[:4])[0]
    word = 4 if version == 3 else 8
    label = b"\x15" + struct.pack(">H", 4) + b"Data"
    at = raw.rindex(label) + len(label)
    if version == 4:
        at += 8  # entry size
    at += 4  # %%%%
    n_info = int.from_bytes(raw[at : at + word], "big")
    return at + word * (1 + n_info)
