"""A multi-page TIFF read while it is still arriving: its pages become a volume before the last byte is here.

Possible when the first page says how many pages there are (ImageJ ``images=``, or tifffile's shaped
description) and the pixel data is stored uncompressed and contiguously from the first page on, as ImageJ,
tifffile and most FIB-SEM exports write stacks: page ``i`` is then at ``offset + i × page bytes``, so a slab of
pages can be read as soon as its bytes have arrived, long before the IFDs that ImageJ writes after the data.
Only the first IFD is read here; once the file is complete, :func:`em_platform.formats.tiff.read_tiff` parses
it fully and :func:`same_layout` checks the guess, so a file that broke the assumption is converted again
from the complete file rather than published wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from dask import delayed

from em_platform.formats.dtypes import checked_dtype
from em_platform.formats.tiff import PIXEL_TYPE_FIELD, PIXEL_TYPE_HINT, _calibration, _physical
from em_platform.formats.volume import Volume
from em_platform.lazy_import import LazyModule

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    import dask.array as da
    import tifffile
else:
    da = LazyModule("dask.array")
    tifffile = LazyModule("tifffile")

# A slab (one dask chunk) is at most 64 pages, the depth of a near-isotropic stack's z-chunks, so the in-order
# writer gets whole chunk rows as they were read, without a copy (a 16-deep chunk row is a view of one), and at
# most 64 MiB, so big pages are read in several slabs.
SLAB_BYTES = 64 << 20
SLAB_PAGES = 64


@dataclass(frozen=True)
class ContiguousTiff:
    offset: int  # of the first page's pixels
    shape: tuple[int, int, int]  # pages (z), y, x
    dtype: np.dtype  # as stored (byte order included)
    scale: tuple[float | None, ...]
    units: tuple[str | None, ...]
    metadata: dict[str, Any]

    @property
    def page_bytes(self) -> int:
        return self.shape[1] * self.shape[2] * self.dtype.itemsize


def contiguous_layout(fileobj: BinaryIO) -> ContiguousTiff | None:
    """The stack's layout from its first page, or None when it cannot be read before it is complete.

    FormatError when the page's pixel type is not allowed (:func:`~em_platform.formats.dtypes.checked_dtype`)."""
    with tifffile.TiffFile(fileobj) as tf:
        page = tf.pages.first
        stored = checked_dtype(
            page.dtype,
            where=str(getattr(fileobj, "name", "the arriving TIFF")),
            field=PIXEL_TYPE_FIELD,
            hint=PIXEL_TYPE_HINT,
        )
        if page.compression != 1 or page.samplesperpixel != 1 or len(page.shape) != 2 or page.is_tiled:
            return None
        offsets, counts = page.dataoffsets, page.databytecounts
        if not offsets or any(
            o + c != nxt for o, c, nxt in zip(offsets[:-1], counts[:-1], offsets[1:], strict=True)
        ):
            return None  # the first page's strips are not one run of bytes
        if sum(counts) != page.shape[0] * page.shape[1] * stored.itemsize:
            return None
        pages = _page_count(page)
        if pages is None:
            return None
        scale, units = _calibration(("z", "y", "x"), _physical(tf))
        dtype = stored.newbyteorder(tf.byteorder)
        return ContiguousTiff(
            offset=int(offsets[0]),
            shape=(pages, *page.shape),
            dtype=dtype,
            scale=scale,
            units=units,
            metadata={
                "dtype": dtype.name,
                "pages": pages,
                "is_imagej": bool(page.is_imagej),
                "compression": "NONE",
                "read_while_arriving": True,
            },
        )


def _page_count(page: tifffile.TiffPage) -> int | None:
    """From the first page's own description only (tifffile's series properties would walk every IFD)."""
    if page.is_imagej:
        # all planes count as sections here; the complete file's full parse checks the axes afterwards
        return int(
            tifffile.tifffile.imagej_description_metadata(_description(page, "ImageJ=")).get("images", 1)
        )
    if page.is_shaped:
        shape = tuple(tifffile.tifffile.shaped_description_metadata(_description(page, "{")).get("shape", ()))
        if len(shape) >= 2 and tuple(shape[-2:]) == tuple(page.shape):
            return math.prod(shape[:-2]) or 1
    return None


def _description(page: tifffile.TiffPage, starts: str) -> str:
    return next((d for d in (page.description, page.description1) if d.startswith(starts)), page.description)


def arriving_volume(layout: ContiguousTiff, read_at: Callable[[int, int], bytes], path: str) -> Volume:
    """The stack as a lazy (z, y, x) volume whose slabs each wait for their bytes (``read_at``)."""
    nz, ny, nx = layout.shape
    per = max(1, min(nz, SLAB_PAGES, SLAB_BYTES // max(layout.page_bytes, 1)))
    native = layout.dtype.newbyteorder("=")

    def slab(z0: int, z1: int) -> np.ndarray:
        raw = read_at(layout.offset + z0 * layout.page_bytes, (z1 - z0) * layout.page_bytes)
        return np.frombuffer(raw, dtype=layout.dtype).reshape(z1 - z0, ny, nx).astype(native, copy=False)

    blocks = [
        da.from_delayed(
            delayed(slab, pure=True)(z0, min(z0 + per, nz)), (min(z0 + per, nz) - z0, ny, nx), native
        )
        for z0 in range(0, nz, per)
    ]
    return Volume(
        data=da.concatenate(blocks, axis=0),
        axes=("z", "y", "x"),
        scale=layout.scale,
        units=layout.units,
        format="tiff",
        source_files=(),
        source_metadata={**layout.metadata, "path": path},
    )


def same_layout(layout: ContiguousTiff, complete: Volume) -> bool:
    """Whether the fully parsed file is what the first page promised (the pages really were contiguous)."""
    meta = complete.source_metadata
    return (
        complete.axes in (("z", "y", "x"), ("y", "x"))
        and tuple(complete.data.shape[-2:]) == layout.shape[1:]
        and (complete.data.shape[0] if complete.data.ndim == 3 else 1) == layout.shape[0]
        and complete.data.dtype == layout.dtype.newbyteorder("=")
        and meta.get("dataoffset") == layout.offset
    )
