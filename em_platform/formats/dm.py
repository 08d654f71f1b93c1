"""Gatan Digital Micrograph DM3/DM4 images and image stacks.

ncempy parses the tag tree (pixel size, units, data type, where the pixels are); the pixels themselves
are memory-mapped slice by slice when the dask array is computed, never read here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from em_platform.formats.dtypes import checked_dtype
from em_platform.formats.errors import FormatError
from em_platform.formats.lazy import memmap_dask
from em_platform.formats.volume import Volume, normalise_unit

DM_SUFFIXES = (".dm3", ".dm4")

# ImageData.DataType -> numpy dtype, for the real-valued pixel types (DM stores pixels little-endian); each
# still passes the allow-list (a binary image, 14, is refused there).
_PIXEL_DTYPES: dict[int, str] = {
    1: "<i2",
    2: "<f4",
    6: "u1",
    7: "<i4",
    9: "i1",
    10: "<u2",
    11: "<u4",
    12: "<f8",
    14: "?",
}
_OTHER_PIXEL_TYPES: dict[int, str] = {
    3: "complex64",
    4: "obsolete",
    5: "packed complex",
    8: "RGB",
    13: "complex128",
    23: "RGB",
    27: "packed complex",
    28: "packed complex",
}

# A few ImageTags worth carrying into the catalog: tag path -> key in source_metadata["microscope"].
_MICROSCOPE_TAGS: dict[str, str] = {
    "Microscope Info.Name": "microscope",
    "Microscope Info.Microscope": "microscope",
    "Session Info.Microscope": "microscope",
    "Microscope Info.Voltage": "voltage_v",
    "Microscope Info.Indicated Magnification": "indicated_magnification",
    "Microscope Info.Illumination Mode": "illumination_mode",
    "Microscope Info.Imaging Mode": "imaging_mode",
    "Microscope Info.Operation Mode": "operation_mode",
    "DataBar.Device Name": "camera",
    "DataBar.Exposure Time (s)": "exposure_s",
    "DataBar.Acquisition Date": "acquisition_date",
    "DataBar.Acquisition Time": "acquisition_time",
}

_HINT = "re-export it from Digital Micrograph or remove it from the inbox"
_TRUNCATED_HINT = "copy it again from the acquisition PC (or wait until the transfer has finished)"
# ncempy's placeholders for tag values it did not read.
_UNREAD = ("Array unread", "Data unread", "(Not displayable)")


def read_dm(path: str | Path) -> Volume:
    """Open a DM3/DM4 image (axes y, x) or image stack (z, y, x) lazily, in its own pixel type.

    Pixel size and unit come from the image's ``ImageData.Calibrations.Dimension`` tags; an axis whose
    unit is empty or not a length gets ``None`` for both. The thumbnail DM stores next to the image is
    skipped; a file holding several images gives the first one (``source_metadata["images_in_file"]``
    says how many there are). Spectra, spectrum images, 4-D data and complex or RGB pixels raise
    :class:`FormatError`, as do missing, truncated and damaged files.
    """
    path = Path(path)
    version, size, root_length = _check_header(path)
    tags = _parse_tags(path, version, size, root_length)

    image, images_in_file = _pick_image(path, tags)
    prefix = f".ImageList.{image}."
    dims = _dimensions(path, tags, prefix)
    shape = tuple(reversed(dims))  # DM lists x first
    _refuse_non_images(path, tags, prefix, shape)

    data_type = _int_tag(tags, prefix + "ImageData.DataType")
    if data_type not in _PIXEL_DTYPES:
        kind = _OTHER_PIXEL_TYPES.get(data_type, "unknown") if data_type is not None else "unknown"
        raise FormatError(
            f"{path} holds {kind} pixels (DM data type {data_type}), not a real-valued EM image: "
            "convert it to a real image in Digital Micrograph or remove it from the inbox"
        )
    dtype = checked_dtype(
        _PIXEL_DTYPES[data_type],
        where=str(path),
        field=f"DM data type {data_type} pixel type",
        hint="convert it to an integer or real greyscale image in Digital Micrograph (a mask to 8-bit)",
    )
    offset = _int_tag(tags, prefix + "ImageData.Data.arrayOffset")
    nbytes = _int_tag(tags, prefix + "ImageData.Data.arraySize")
    need = math.prod(shape) * dtype.itemsize  # exact Python integers: a lying tag cannot wrap it
    if offset is None or offset < 0:
        raise FormatError(f"{path} is a damaged DM{version} file: its image data offset is {offset}; {_HINT}")
    if nbytes != need:
        raise FormatError(
            f"{path} is a damaged DM{version} file: its image data block holds {nbytes} bytes but "
            f"{'x'.join(map(str, shape))} {dtype.name} pixels need {need}; {_HINT}"
        )
    if offset + need > size:  # checked now, so a cut-off transfer fails here and not inside a dask task
        raise FormatError(
            f"{path} is a truncated DM{version} file: its image data needs bytes {offset} to {offset + need} "
            f"but the file has only {size}; {_TRUNCATED_HINT}"
        )

    origins, scales, unit_strings = _calibrations(tags, prefix, len(shape))
    scale: list[float | None] = []
    units: list[str | None] = []
    for s, u in zip(scales, unit_strings, strict=True):
        unit = normalise_unit(u) if u else None
        ok = unit is not None and s is not None and math.isfinite(s) and s > 0
        scale.append(s if ok else None)
        units.append(unit if ok else None)

    data = memmap_dask(path, offset, shape, dtype, slab_bytes=math.prod(shape[1:]) * dtype.itemsize)
    if not dtype.isnative:
        data = data.astype(dtype.newbyteorder("="))

    metadata: dict[str, Any] = {
        "dm_version": version,
        "dtype": dtype.name,
        "shape": list(shape),
        "image_index": image - 1,
        "images_in_file": images_in_file,
        "calibration": {"origin": origins, "scale": scales, "unit": unit_strings},
    }
    name = _text_tag(tags.get(prefix + "Name"))
    if name:
        metadata["name"] = name
    microscope = _microscope(tags, prefix + "ImageTags.")
    if microscope:
        metadata["microscope"] = microscope

    return Volume(
        data=data,
        axes=("y", "x") if len(shape) == 2 else ("z", "y", "x"),
        scale=tuple(scale),
        units=tuple(units),
        format=f"dm{version}",
        source_files=(path,),
        source_metadata=metadata,
    )


def _check_header(path: Path) -> tuple[int, int, int]:
    """Version, file size and recorded root length, raising FormatError for anything that is not DM3/DM4."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
    except FileNotFoundError:
        raise FormatError(
            f"{path} does not exist: check the path, or whether it was moved or deleted"
        ) from None
    except IsADirectoryError:
        raise FormatError(f"{path} is a folder, not a DM3/DM4 file") from None
    except OSError as exc:
        raise FormatError(f"{path} cannot be opened ({exc}): check that it is readable") from None
    if not head:
        raise FormatError(
            f"{path} is empty, not a DM3/DM4 file: {_TRUNCATED_HINT}, or remove it from the inbox"
        )
    version = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
    if version not in (3, 4):
        raise FormatError(
            f"{path} is not a readable DM3/DM4 file (it does not start with a DM3/DM4 header; "
            f"first bytes {head[:8]!r}): {_HINT}"
        )
    header_length = 12 if version == 3 else 16
    if len(head) < header_length:
        raise FormatError(f"{path} is a truncated DM{version} file (only {size} bytes): {_TRUNCATED_HINT}")
    word = 4 if version == 3 else 8
    root_length = int.from_bytes(head[4 : 4 + word], "big")
    little_endian = int.from_bytes(head[4 + word : 8 + word], "big")
    if little_endian != 1:
        raise FormatError(
            f"{path} is a DM{version} file with big-endian (old Macintosh) data, which is not supported: "
            "open and save it again in a current Digital Micrograph"
        )
    return version, size, root_length


def _parse_tags(path: Path, version: int, size: int, root_length: int) -> dict[str, Any]:
    """All tags as ncempy flattens them ('.ImageList.1.ImageData.Dimensions.1' -> value)."""
    # Imported here: ncempy pulls in scipy and matplotlib, about a second, and only DM files need it.
    from ncempy.io.dm import fileDM

    reason = ""
    # ncempy closes a file object it is given; this `with` also covers a parse that fails.
    with open(path, "rb") as fh:
        try:
            with fileDM(fh) as dm:
                return dict(dm.allTags)
        # On bad bytes ncempy fails with IndexError, ValueError, AssertionError, OSError, ...
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    # DM records the length of its tag tree in the header: a file shorter than that was cut short.
    if size < (12 if version == 3 else 16) + root_length:
        raise FormatError(
            f"{path} is a truncated DM{version} file: it has {size} bytes, its header promises "
            f"{root_length} bytes of tags and data ({reason}); {_TRUNCATED_HINT}"
        )
    raise FormatError(f"{path} is not a readable DM3/DM4 file (damaged tag structure: {reason}): {_HINT}")


def _pick_image(path: Path, tags: dict[str, Any]) -> tuple[int, int]:
    """The ImageList label (1-based, as ncempy numbers it) of the first image that is not a thumbnail."""
    found = sorted(
        int(m.group(1))
        for key in tags
        if (m := re.fullmatch(r"\.ImageList\.(\d+)\.ImageData\.Data\.arrayOffset", key))
    )
    listed = [key for key in tags if re.fullmatch(r"\.Thumbnails\.\d+\.ImageIndex", key)]
    if listed:  # DM lists its thumbnails by 0-based ImageList index
        thumbnails = {index + 1 for key in listed if (index := _int_tag(tags, key)) is not None}
    elif len(found) > 1 and _int_tag(tags, f".ImageList.{found[0]}.ImageData.DataType") == 23:
        thumbnails = {found[0]}  # no list: DM writes its RGB thumbnail first (ncempy assumes the same)
    else:
        thumbnails = set()
    images = [n for n in found if n not in thumbnails]
    if not images:
        raise FormatError(f"{path} holds no image (only thumbnails or tags): {_HINT}")
    return images[0], len(images)


def _dimensions(path: Path, tags: dict[str, Any], prefix: str) -> list[int]:
    dims: list[int] = []
    while (n := _int_tag(tags, f"{prefix}ImageData.Dimensions.{len(dims) + 1}")) is not None:
        dims.append(n)
    if not dims or min(dims) < 1:
        raise FormatError(f"{path} is a damaged DM file: its image dimensions are {dims}; {_HINT}")
    return dims


def _refuse_non_images(path: Path, tags: dict[str, Any], prefix: str, shape: tuple[int, ...]) -> None:
    what = None
    if len(shape) == 1:
        what = "a 1-D spectrum or profile"
    elif len(shape) > 3:
        what = f"{len(shape)}-D data (e.g. 4D-STEM)"
    else:
        fmt = _text_tag(tags.get(prefix + "ImageTags.Meta Data.Format")) or ""
        z_unit = _text_tag(tags.get(prefix + "ImageData.Calibrations.Dimension.3.Units"))
        if "spectrum" in fmt.lower() or (len(shape) == 3 and z_unit in ("eV", "keV")):
            what = "a spectrum image (EELS, EDS or CL)"
    if what:
        raise FormatError(
            f"{path} holds {what} of shape {shape}, not an EM image or image stack: "
            "it cannot be ingested as a volume; remove it from the inbox"
        )


def _calibrations(
    tags: dict[str, Any], prefix: str, ndim: int
) -> tuple[list[float | None], list[float | None], list[str]]:
    """Raw origin, scale and unit per axis in numpy order (DM stores them x first)."""
    origins, scales, units = [], [], []
    for k in range(1, ndim + 1):
        base = f"{prefix}ImageData.Calibrations.Dimension.{k}."
        origins.append(_float_tag(tags.get(base + "Origin")))
        scales.append(_float_tag(tags.get(base + "Scale")))
        units.append(_text_tag(tags.get(base + "Units")) or "")
    return origins[::-1], scales[::-1], units[::-1]


def _microscope(tags: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag, key in _MICROSCOPE_TAGS.items():
        value = tags.get(prefix + tag)
        if key in out or value is None:
            continue
        if isinstance(value, str):
            value = _text_tag(value)
        elif isinstance(value, (bool, np.bool_)):
            value = bool(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            value = _float_tag(value) if isinstance(value, (float, np.floating)) else int(value)
        else:
            value = None
        if value not in (None, ""):
            out[key] = value
    return out


def _int_tag(tags: dict[str, Any], key: str) -> int | None:
    value = tags.get(key)
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return None


def _float_tag(value: Any) -> float | None:
    """A number from a tag as a Python float; float32 values (DM's calibrations) at their shortest
    round-tripping decimal, so a pixel size DM shows as 0.1 is 0.1, not 0.10000000149011612."""
    if isinstance(value, np.float32):
        value = float(str(value))
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        value = float(value)
    else:
        return None
    return value if math.isfinite(value) else None


def _text_tag(value: Any) -> str | None:
    if not isinstance(value, str) or value.startswith(_UNREAD):
        return None
    return value.strip().strip("\x00")
