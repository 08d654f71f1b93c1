"""Several image files of one dataset: one volume (sections of one block) or a collection of images?

The rule, the same for the local inbox and the public archives:

* one file is one image, whatever it holds (a 2-D micrograph, a 3-D stack, a tilt series, a movie);
* several files are **one volume** only when the source says they are sections of one block (serial
  sections, block-face or FIB-SEM slices: EMPIAR's volume-EM experiment types, an inbox folder of TIFF
  slices) **and** every file is a 2-D section (or a 3-D block) of the same y/x size and pixel type; they are
  stacked along z in natural name order (``s2`` before ``s10``);
* everything else is a **collection**: one image per file, each with its own shape, type and pixel size
  (single-particle micrographs, movies, tomograms, sections that differ in size).

A movie's frames are time points, not sections: :func:`frames_as_time` relabels them (axis ``t``), so no
section thickness is ever made up for them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_platform.formats.errors import FormatError
from em_platform.formats.volume import Volume
from em_platform.lazy_import import LazyModule

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    import dask.array as da
else:
    da = LazyModule("dask.array")

# EMPIAR experiment types / imageset categories (upper-cased, spaces as '-') that image one block section
# by section: their 2-D files are sections of one volume.
SECTION_TECHNIQUES = (
    "SBF-SEM",
    "SBEM",
    "FIB-SEM",
    "SERIAL",
    "SSTEM",
    "ATUM",
    "ARRAY-TOMOGRAPHY",
    "BLOCK-FACE",
)


def natural_key(name: str) -> list[Any]:
    """Sort key that orders embedded numbers by value: slice_2 before slice_10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def images_sections(technique: str | None) -> bool:
    """True when an experiment type or imageset category images one block section by section."""
    t = (technique or "").upper().replace(" ", "-")
    return any(k in t for k in SECTION_TECHNIQUES)


def images_movies(category: str | None) -> bool:
    """True for an imageset of movies (EMPIAR 'micrographs - multiframe', 'movies')."""
    c = (category or "").lower()
    return "multiframe" in c or "multi-frame" in c or "movie" in c


@dataclass(frozen=True)
class Arrangement:
    kind: str  # "volume" (one image) or "collection" (one image per file)
    rule: str  # the rule as applied, in words, for the record
    volume: Volume | None = None  # the one image, for kind "volume"


def arrange_images(
    paths: Sequence[Path], vols: Sequence[Volume], *, sections: bool, what: str
) -> Arrangement:
    """Apply the module's rule to opened files (same order as ``paths``)."""
    if not vols:
        raise FormatError(f"{what}: no image files")
    if len(vols) == 1:
        return Arrangement("volume", f"{what}: one file, one image", vols[0])
    if not sections:
        return Arrangement(
            "collection",
            f"{what}: {len(vols)} files that are not sections of one block: one image per file",
        )
    odd = _first_mismatch(paths, vols)
    if odd:
        return Arrangement(
            "collection",
            f"{what}: sections of one block, but {odd}: they cannot be stacked, so one image per file",
        )
    return Arrangement(
        "volume",
        f"{what}: {len(vols)} sections of one block of the same size and type, stacked along z in name order",
        stack_sections(list(paths), list(vols)),
    )


def _first_mismatch(paths: Sequence[Path], vols: Sequence[Volume]) -> str | None:
    first = vols[0]
    if first.axes not in (("y", "x"), ("z", "y", "x")):
        return f"{paths[0].name} has axes {''.join(first.axes)} (not a section)"
    for p, v in zip(paths[1:], vols[1:], strict=True):
        if (
            v.axes != first.axes
            or v.data.shape[-2:] != first.data.shape[-2:]
            or v.data.dtype != first.data.dtype
        ):
            return (
                f"{p.name} is {'x'.join(map(str, v.data.shape))} {v.data.dtype} where {paths[0].name} is "
                f"{'x'.join(map(str, first.data.shape))} {first.data.dtype}"
            )
    return None


def stack_sections(paths: list[Path], vols: list[Volume]) -> Volume:
    """Join opened files in the given order: 2-D sections stack along z, 3-D blocks concatenate along z.
    Every file must match the first in y/x size, axes and pixel type (see :func:`arrange_images`)."""
    odd = _first_mismatch(paths, vols)
    if odd:
        raise FormatError(f"{odd}; sections of one volume must share size and pixel type")
    first = vols[0]
    if first.axes == ("y", "x"):
        data = da.stack([v.data for v in vols]) if len(vols) > 1 else first.data[None]
        return Volume(
            data=data,
            axes=("z", "y", "x"),
            scale=(None, *first.scale),
            units=(None, *first.units),
            format=first.format,
            source_files=tuple(paths),
            source_metadata=first.source_metadata,
        )
    data = da.concatenate([v.data for v in vols], axis=0) if len(vols) > 1 else first.data
    return dataclasses.replace(first, data=data, source_files=tuple(paths))


def frames_as_time(vol: Volume) -> Volume:
    """A movie: its stacked frames (read as z) are time points, with no physical spacing."""
    if "z" not in vol.axes or "t" in vol.axes:
        return vol
    i = vol.axes.index("z")
    return dataclasses.replace(
        vol,
        axes=tuple("t" if a == "z" else a for a in vol.axes),
        scale=tuple(None if j == i else s for j, s in enumerate(vol.scale)),
        units=tuple(None if j == i else u for j, u in enumerate(vol.units)),
    )
