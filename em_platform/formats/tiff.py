"""TIFF, multi-page TIFF, OME-TIFF and folders of TIFF slices (tifffile).

Physical sizes come from OME-XML when present, else ImageJ metadata, else the TIFF resolution tags
when they are in centimetres (an inch resolution is a print DPI, not a pixel size, and is ignored).

Sizes in a TIFF are claims: a page's width × height must fit its stored bytes (uncompressed), or at most
:data:`MAX_COMPRESSION_RATIO` times them (compressed), and OME-XML may not declare more planes than the file
has pages; both are checked before any pixel is read (exact integers throughout).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from em_platform.formats.dtypes import checked_dtype
from em_platform.formats.errors import FormatError
from em_platform.formats.volume import Volume, normalise_unit
from em_platform.lazy_import import LazyModule

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    import dask.array as da
    import tifffile
else:
    da = LazyModule("dask.array")
    tifffile = LazyModule("tifffile")

TIFF_SUFFIXES = (".tif", ".tiff")

MAX_COMPRESSION_RATIO = 2**16
"""How many times its stored bytes a compressed page may decode to: twice the most any codec EM TIFFs use
reaches (zstd's run-length blocks, 32,768:1; deflate at most 1,032:1), far above EM images (2-10:1). A page
claiming gigapixels from a few bytes would otherwise have its whole buffer allocated before decoding."""

PIXEL_TYPE_FIELD = "pixel type (SampleFormat × BitsPerSample)"
PIXEL_TYPE_HINT = "save the image as an integer or float greyscale TIFF (a mask as uint8)"

# tifffile series axes → NGFF axes. I (image sequence) and Q (unknown) of a plain stack are z.
_AXIS_MAP = {"T": "t", "C": "c", "S": "c", "Z": "z", "I": "z", "Q": "z", "Y": "y", "X": "x"}


def is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES


class _OpenFiles:
    """One open TiffFile per file and process, shared by the dask tasks that read its pages (walking a
    big stack's IFD chain again for every chunk costs more than the read). At most ``size`` stay open; the
    least recently used is closed once no task is reading it (a dropped handle would leak the file)."""

    def __init__(self, size: int = 16):
        self.size = size
        self.lock = threading.Lock()
        self.files: OrderedDict[tuple[str, int], list] = OrderedDict()  # key → [TiffFile, lock, readers]
        self.retired: dict[int, list] = {}

    @contextmanager
    def use(self, path: str, mtime_ns: int):
        key = (path, mtime_ns)
        with self.lock:
            entry = self.files.get(key)
            if entry is None:
                entry = self.files[key] = [tifffile.TiffFile(path), threading.Lock(), 0]
                while len(self.files) > self.size:
                    _, old = self.files.popitem(last=False)
                    self.retired[id(old)] = old
            self.files.move_to_end(key)
            entry[2] += 1
            self._close_retired()
        try:
            yield entry[0], entry[1]
        finally:
            with self.lock:
                entry[2] -= 1
                self._close_retired()

    def close_all(self) -> None:
        with self.lock:
            self.retired.update((id(e), e) for e in self.files.values())
            self.files.clear()
            self._close_retired()

    def _close_retired(self) -> None:
        for k, entry in list(self.retired.items()):
            if entry[2] == 0:
                entry[0].close()
                del self.retired[k]


_OPEN = _OpenFiles()
atexit.register(_OPEN.close_all)


def _read_pages(path: str, mtime_ns: int, series: int, start: int, stop: int, page_shape: tuple[int, ...]):
    with _OPEN.use(path, mtime_ns) as (tf, lock):
        with lock:  # walking the IFD chain moves the shared file position
            pages = [tf.series[series].pages[i] for i in range(start, stop)]
        # Reads take the lock segment by segment; decoding runs outside it, in parallel.
        return np.stack([p.asarray(lock=lock) for p in pages]).reshape((stop - start, *page_shape))


def _lazy_series(path: Path, series: tifffile.TiffPageSeries, mtime_ns: int) -> da.Array:
    """Dask array over one series, one chunk per group of pages, decoded on demand."""
    shape = tuple(series.shape)
    page_shape = tuple(series.keyframe.shape)
    n_pages = math.prod(shape) // math.prod(page_shape)
    if n_pages <= 1:
        block = da.from_delayed(
            _delayed_pages(str(path), mtime_ns, 0, 0, 1, page_shape), (1, *page_shape), series.dtype
        )
        return block.reshape(shape)
    page_bytes = math.prod(page_shape) * series.dtype.itemsize
    per_chunk = max(1, min(n_pages, (32 << 20) // max(page_bytes, 1)))
    blocks = [
        da.from_delayed(
            _delayed_pages(str(path), mtime_ns, 0, s, min(s + per_chunk, n_pages), page_shape),
            (min(s + per_chunk, n_pages) - s, *page_shape),
            series.dtype,
        )
        for s in range(0, n_pages, per_chunk)
    ]
    return da.concatenate(blocks, axis=0).reshape(shape)


def _delayed_pages(*args):
    from dask import delayed

    return delayed(_read_pages, pure=True)(*args)


def _ome_physical(ome_xml: str) -> dict[str, tuple[float, str | None]]:
    ome = tifffile.xml2dict(ome_xml)
    image = ome.get("OME", {}).get("Image", {})
    if isinstance(image, list):
        image = image[0]
    pixels = image.get("Pixels", {})
    out = {}
    for ax in ("X", "Y", "Z"):
        size = pixels.get(f"PhysicalSize{ax}")
        if size is not None:
            unit = normalise_unit(str(pixels.get(f"PhysicalSize{ax}Unit", "µm")))  # OME default unit is µm
            out[ax.lower()] = (float(size), unit)
    return out


def _tag_physical(tf: tifffile.TiffFile) -> dict[str, tuple[float, str | None]]:
    page = tf.pages.first
    out: dict[str, tuple[float, str | None]] = {}
    ij = tf.imagej_metadata or {}
    ij_unit = normalise_unit(str(ij.get("unit", "")).replace("\\u00B5", "µ")) if ij.get("unit") else None
    res_unit_tag = page.tags.get("ResolutionUnit")
    res_unit = int(res_unit_tag.value) if res_unit_tag is not None else 2
    for ax, tag in (("x", "XResolution"), ("y", "YResolution")):
        t = page.tags.get(tag)
        if t is None:
            continue
        num, den = t.value
        if not num or not den:
            continue
        size = den / num  # resolution is pixels per unit
        if ij_unit is not None:
            out[ax] = (size, ij_unit)
        elif res_unit == 3:  # centimetre
            out[ax] = (size * 1e4, "micrometer")
    if ij.get("spacing") and ij_unit is not None:
        out["z"] = (float(ij["spacing"]), ij_unit)
    return out


def _physical(tf: tifffile.TiffFile) -> dict[str, tuple[float, str | None]]:
    if tf.is_ome and (ome_xml := tf.ome_metadata):
        phys = _ome_physical(ome_xml)
        if phys:
            return phys
    return _tag_physical(tf)


def _calibration(axes: tuple[str, ...], phys: dict[str, tuple[float, str | None]]):
    scale, units = [], []
    for a in axes:
        s, u = phys.get(a, (None, None))
        if u is None:
            s = None
        scale.append(s)
        units.append(u)
    return tuple(scale), tuple(units)


class _TiffLogErrors(logging.Handler):
    """tifffile logs, rather than raises, broken IFD chains (a truncated multi-page file); collect them."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _tifffile_errors():
    handler = _TiffLogErrors()
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def read_tiff(path: str | Path) -> Volume:
    """Open a TIFF or OME-TIFF file lazily (first series)."""
    path = Path(path)
    try:
        mtime_ns = path.stat().st_mtime_ns
        with _tifffile_errors() as logged, tifffile.TiffFile(path) as tf:
            _check_ome_planes(tf)
            series = tf.series[0]
            checked_dtype(series.dtype, where=str(path), field=PIXEL_TYPE_FIELD, hint=PIXEL_TYPE_HINT)
            axes = tuple(_AXIS_MAP.get(a, "?") for a in series.axes)
            if "?" in axes or len(set(axes)) != len(axes):
                raise ValueError(f"unsupported TIFF axes {series.axes!r}")
            _check_complete(tf, series)
            len(tf.pages)  # walks the whole IFD chain, so a cut-off chain is logged now
            if logged:
                raise ValueError(f"damaged page structure ({logged[0]}): the file is truncated or corrupt")
            phys = _physical(tf)
            meta: dict[str, Any] = {
                "tiff_axes": series.axes,
                "dtype": series.dtype.name,
                "pages": len(series.pages),
                "is_ome": bool(tf.is_ome),
                "is_imagej": bool(tf.is_imagej),
                # tifffile annotates an int; the value is its COMPRESSION enum
                "compression": str(series.keyframe.compression.name),  # type: ignore[attr-defined]
                "dataoffset": series.dataoffset,  # None unless the pixels are one contiguous run
            }
            data = _lazy_series(path, series, mtime_ns)
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(
            f"{path} is not a readable TIFF ({type(exc).__name__}: {exc}); check the transfer completed or re-export it"
        ) from exc
    scale, units = _calibration(axes, phys)
    fmt = "ome-tiff" if meta["is_ome"] else "tiff"
    return Volume(
        data=data, axes=axes, scale=scale, units=units, format=fmt, source_files=(path,), source_metadata=meta
    )


def _check_complete(tf: tifffile.TiffFile, series: tifffile.TiffPageSeries) -> None:
    """Fail now, not at compute time, if any page's data lies beyond the end of the file."""
    size = (
        os.fstat(tf.filehandle.fileno()).st_size if hasattr(tf.filehandle, "fileno") else tf.filehandle.size
    )
    # Offsets and byte counts are all this needs: light TiffFrames instead of a full TiffPage per page
    # (1024 pages: 0.02 s instead of 0.5-2 s, which came after the last byte of a download).
    useframes = tf.pages.useframes
    tf.pages.useframes = True
    try:
        _check_pages_within(series.pages, size)
    finally:
        tf.pages.useframes = useframes


def _check_pages_within(pages, size: int) -> None:
    for i, page in enumerate(pages):
        if page is None:
            raise ValueError("a page of the series is missing")
        offsets = page.dataoffsets
        counts = page.databytecounts
        if offsets and counts and max(o + c for o, c in zip(offsets, counts, strict=False)) > size:
            raise ValueError(
                f"page data ends beyond the end of the file ({size} bytes): the file is truncated"
            )
        _check_page_bytes(i, page, sum(counts or ()))


def _check_page_bytes(index: int, page, stored: int) -> None:
    """A page's width × height (× samples × bits) within what its stored bytes can decode to."""
    kf = page.keyframe
    need = (math.prod(page.shape) * kf.bitspersample + 7) // 8
    uncompressed = kf.compression == 1
    bound = stored if uncompressed else stored * MAX_COMPRESSION_RATIO
    if need > bound:
        has = (
            f"its strips store only {stored} bytes"
            if uncompressed
            else f"its {stored} compressed bytes decode to at most {bound} (MAX_COMPRESSION_RATIO {MAX_COMPRESSION_RATIO})"
        )
        raise ValueError(
            f"page {index} claims {'x'.join(map(str, page.shape))} pixels ({need} bytes: ImageWidth × "
            f"ImageLength × SamplesPerPixel × BitsPerSample) but {has}"
        )


_MIN_PAGE_BYTES = 16  # a page needs at least its IFD: entry count, one 12-byte entry, next-IFD offset


def _check_ome_planes(tf: tifffile.TiffFile) -> None:
    """OME-XML's planes (SizeZ × SizeC × SizeT of each image) at most the file's pages: tifffile lists a
    declared plane it cannot find as a missing page, so SizeZ=10⁹ cost 90 s and 8 GB before any check.

    A multi-file OME-TIFF (TiffData naming companion files, which tifffile reads from the same folder) may
    declare at most as many planes as its files, here and beside it, have room for pages."""
    if not tf.is_ome or not tf.ome_metadata:
        return
    xml = tf.ome_metadata
    images = tifffile.xml2dict(xml).get("OME", {}).get("Image", [])
    planes = 0
    for image in images if isinstance(images, list) else [images]:
        pixels = image.get("Pixels", {}) if isinstance(image, dict) else {}
        try:
            planes += math.prod(int(pixels.get(f"Size{a}", 1)) for a in "ZCT")
        except (TypeError, ValueError):
            raise ValueError(f"OME-XML sizes of image {image.get('ID')!r} are not whole numbers") from None
    here = Path(tf.filehandle.path)
    companions = {Path(n).name for n in re.findall(r'FileName="([^"]*)"', xml)} - {here.name, ""}
    if companions:
        files = [here, *(f for f in (here.parent / n for n in companions) if f.is_file())]
        room = sum(f.stat().st_size for f in files) // _MIN_PAGE_BYTES
        if planes > room:
            raise ValueError(
                f"OME-XML declares {planes} planes (SizeZ × SizeC × SizeT) but its {len(files)} file(s) have "
                f"room for at most {room} pages"
            )
        return
    pages = len(tf.pages)  # walks the IFD chain: bounded by the file, each page needs its own bytes
    if planes > pages:
        raise ValueError(
            f"OME-XML declares {planes} planes (SizeZ × SizeC × SizeT) but the file holds {pages} pages"
        )


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def tiff_stack_files(folder: Path) -> list[Path]:
    """The slices of a folder stack, in natural (slice-number) order; hidden and partial files are skipped."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and is_tiff(p) and not p.name.startswith(".")),
        key=lambda p: _natural_key(p.name),
    )


def read_tiff_stack(folder: str | Path) -> Volume:
    """A folder of 2-D TIFF slices as one (z, y, x) volume; z spacing from the first slice if it records one."""
    folder = Path(folder)
    files = tiff_stack_files(folder)
    if not files:
        raise FormatError(f"{folder}: folder stack contains no .tif/.tiff slices")
    slices = []
    first: Volume | None = None
    for f in files:
        v = read_tiff(f)
        if v.axes != ("y", "x"):
            raise FormatError(f"{f}: a folder-stack slice must be a single 2-D image, found axes {v.axes}")
        if first is None:
            first = v
        elif v.data.shape != first.data.shape or v.data.dtype != first.data.dtype:
            raise FormatError(
                f"{f}: slice is {v.data.shape} {v.data.dtype}, but {files[0].name} is "
                f"{first.data.shape} {first.data.dtype}; all slices of a stack must match"
            )
        slices.append(v.data)
    assert first is not None
    data = da.stack(slices, axis=0)
    # z spacing: ImageJ 'spacing' on the first slice, if any.
    with tifffile.TiffFile(files[0]) as tf:
        phys = _physical(tf)
    scale, units = _calibration(("z", "y", "x"), phys)
    return Volume(
        data=data,
        axes=("z", "y", "x"),
        scale=scale,
        units=units,
        format="tiff-stack",
        source_files=tuple(files),
        source_metadata={**first.source_metadata, "slices": len(files), "pages": len(files)},
    )
