"""Small pictures of a montage for a person: a minimap of the fused image and a focus-score map.

They play the part of the TEM_comms ``montage.minimaps`` message (montage minimap + focus map) and are
shown in the montage asset's metadata as markdown with inline PNGs (:func:`png_markdown`); the Dagster
UI renders ``data:image/png;base64`` images in markdown metadata. Keep them small: the PNG travels in
every materialization event.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from em_platform.imaging.ome_zarr import MultiscaleInfo, open_store
from em_platform.imaging.thumbnail import middle_plane, to_uint8
from em_platform.lazy_import import LazyModule

imagecodecs = LazyModule("imagecodecs")

__all__ = ["MISSING_TILE_RGB", "NO_TISSUE_RGB", "focus_map_png", "minimap_png", "png_markdown"]

# Focus colours: ColorBrewer RdYlGn end and middle stops, green = sharp (low score), red = blurred.
_FOCUS_STOPS = np.array([[26, 152, 80], [255, 255, 191], [215, 48, 39]], dtype=np.float64)
MISSING_TILE_RGB = (64, 64, 64)  # dark grey: no tile, or no focus score, at that grid position
# blue: a tile with nothing to focus on (QC's blank or no_tissue: beam off, bare resin, off the section),
# whose focus score would read as "blurred" red (issue 26)
NO_TISSUE_RGB = (69, 117, 180)


def _levels(url: str, storage_options: dict | None) -> tuple[list, tuple[str, ...]]:
    """The pyramid's arrays, finest first, and its axis names, from the OME-Zarr metadata."""
    import zarr

    try:
        group = zarr.open_group(open_store(url, storage_options, read_only=True), mode="r")
        ome: Any = group.attrs["ome"]  # JSON: a shape other than OME-Zarr's raises below
        multiscale = ome["multiscales"][0]
        axes = tuple(a["name"] if isinstance(a, dict) else a for a in multiscale["axes"])
        return [group[d["path"]] for d in multiscale["datasets"]], axes
    except (
        FileNotFoundError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
    ) as exc:  # zarr errors are ValueErrors
        raise ValueError(
            f"{url} is not a multiscale OME-Zarr image ({type(exc).__name__}: {exc}); fuse the montage first"
        ) from None


def minimap_png(
    fused: str | MultiscaleInfo, max_side: int = 512, storage_options: dict | None = None
) -> bytes:
    """PNG of the whole fused montage, its longer side ``max_side`` pixels (or less if the image is smaller).

    Reads the coarsest pyramid level that still has ``max_side`` pixels along its longer side (so at
    most about 4 x max_side**2 pixels are read, whatever the montage size; level 0 if the image is
    smaller), area-averages it to size and contrast-stretches it. Zeros (holes where no tile was) are
    left out of the contrast percentiles and shown black.
    """
    import cv2

    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side must be a positive integer (pixels), got {max_side!r}")
    url = fused.url if isinstance(fused, MultiscaleInfo) else fused
    arrays, axes = _levels(url, storage_options)
    iy, ix = axes.index("y"), axes.index("x")
    chosen = arrays[0]
    for arr in arrays:
        if max(arr.shape[iy], arr.shape[ix]) >= max_side:
            chosen = arr
    plane: np.ndarray = middle_plane(chosen, axes).astype(np.float32)
    plane[plane == 0] = np.nan
    h, w = plane.shape
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        size = (max(1, round(w * f)), max(1, round(h * f)))  # cv2 wants (width, height)
        plane = cv2.resize(plane, size, interpolation=cv2.INTER_AREA)
    return imagecodecs.png_encode(to_uint8(plane))


def focus_map_png(
    grid: Mapping[tuple[int, int], float | None],
    rows: int,
    cols: int,
    cell_px: int = 16,
    score_range: tuple[float, float] = (0.0, 1.0),
    no_tissue: Iterable[tuple[int, int]] = (),
) -> bytes:
    """RGB PNG of a montage's focus scores, one ``cell_px`` square per tile in grid order.

    ``grid`` maps (row, column) to the tile's focus score in [0, 1], lower is better (TEM_comms
    ``tile.statistics.focus``), or None; green is sharp, yellow middling, red blurred, over
    ``score_range`` (scores beyond it take the end colours: narrow it to spread the usual 0.4-0.7 of a
    real montage). Positions without a score are :data:`MISSING_TILE_RGB`; ``no_tissue`` positions (QC
    found nothing to focus on: blank or no tissue) are :data:`NO_TISSUE_RGB` whatever their score.
    """
    for name, v in (("rows", rows), ("cols", cols), ("cell_px", cell_px)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    lo, hi = (float(v) for v in score_range)
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"score_range must be (low, high) with 0 <= low < high <= 1, got {score_range!r}")
    cells = np.empty((rows, cols, 3), np.uint8)
    cells[...] = MISSING_TILE_RGB
    for (r, c), score in grid.items():
        if not (0 <= r < rows and 0 <= c < cols):
            raise ValueError(
                f"focus score for tile (row {r}, column {c}) lies outside the {rows}x{cols} grid"
            )
        if score is None:
            continue
        s = float(score)
        if not 0.0 <= s <= 1.0:  # also rejects NaN
            raise ValueError(
                f"focus score {score!r} of tile (row {r}, column {c}) is not in [0, 1]; pass the TEM_comms "
                "focus score (lower is better), not a legacy piTEAM score"
            )
        t = 2.0 * min(max((s - lo) / (hi - lo), 0.0), 1.0)  # 0..2 along the two colour segments
        k = min(int(t), 1)
        cells[r, c] = np.round(_FOCUS_STOPS[k] + (t - k) * (_FOCUS_STOPS[k + 1] - _FOCUS_STOPS[k]))
    for r, c in no_tissue:
        if not (0 <= r < rows and 0 <= c < cols):
            raise ValueError(f"no-tissue tile (row {r}, column {c}) lies outside the {rows}x{cols} grid")
        cells[r, c] = NO_TISSUE_RGB
    image = np.repeat(np.repeat(cells, cell_px, axis=0), cell_px, axis=1)
    return imagecodecs.png_encode(image)


def png_markdown(png: bytes, alt: str = "image") -> str:
    """Markdown showing ``png`` inline (a data URI), for ``dagster.MetadataValue.md``."""
    label = " ".join(alt.replace("[", "(").replace("]", ")").split())
    return f"![{label}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
