"""Format readers: each returns a lazy :class:`Volume` (dask array + axes + physical scale + metadata)."""

from __future__ import annotations

from pathlib import Path

from em_platform.formats.errors import FormatError
from em_platform.formats.volume import Volume, normalise_unit

SUPPORTED_SUFFIXES = (
    ".tif",
    ".tiff",
    ".mrc",
    ".mrcs",
    ".map",
    ".rec",
    ".st",
    ".ali",
    ".dm3",
    ".dm4",
    ".raw",
    ".bin",
)

__all__ = ["FormatError", "Volume", "normalise_unit", "open_volume", "SUPPORTED_SUFFIXES", "is_supported"]


def is_supported(path: Path) -> bool:
    """True for a file with a supported suffix, or a folder holding TIFF slices."""
    from em_platform.formats.tiff import tiff_stack_files

    if path.is_dir():
        return bool(tiff_stack_files(path))
    return path.suffix.lower() in SUPPORTED_SUFFIXES


def open_volume(path: str | Path) -> Volume:
    """Open any supported EM file (or a folder of TIFF slices) lazily, axes in NGFF order (t, c, z, y, x)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        from em_platform.formats.tiff import read_tiff_stack

        vol = read_tiff_stack(path)
    elif suffix in (".tif", ".tiff"):
        from em_platform.formats.tiff import read_tiff

        vol = read_tiff(path)
    elif suffix in (".mrc", ".mrcs", ".map", ".rec", ".st", ".ali"):
        from em_platform.formats.mrc import read_mrc

        vol = read_mrc(path)
    elif suffix in (".dm3", ".dm4"):
        from em_platform.formats.dm import read_dm

        vol = read_dm(path)
    elif suffix in (".raw", ".bin"):
        from em_platform.formats.raw import read_raw_with_sidecar

        vol = read_raw_with_sidecar(path)
    else:
        raise FormatError(
            f"{path}: unsupported file type {suffix or '(none)'}; supported are "
            "TIFF/OME-TIFF (.tif, .tiff, or a folder of slices), MRC (.mrc, .map, .rec, .st), "
            "DM3/DM4 and raw (.raw with a .raw.json sidecar)"
        )
    return to_ngff_order(vol)


_NGFF_ORDER = "tczyx"


def to_ngff_order(vol: Volume) -> Volume:
    """Transpose to the axis order NGFF requires (time, channel, then z, y, x)."""
    order = sorted(range(len(vol.axes)), key=lambda i: _NGFF_ORDER.index(vol.axes[i]))
    if order == list(range(len(vol.axes))):
        return vol
    pick = lambda seq: tuple(seq[i] for i in order)  # noqa: E731
    return Volume(
        data=vol.data.transpose(order),
        axes=pick(vol.axes),
        scale=pick(vol.scale),
        units=pick(vol.units),
        format=vol.format,
        source_files=vol.source_files,
        source_metadata=vol.source_metadata,
    )
