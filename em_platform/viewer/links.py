"""A link that opens one OME-Zarr image in Neuroglancer, served by `em-platform viewer` (EM_VIEWER_URL).

The whole view travels in the link (Neuroglancer's ``#!{json}`` state), so a link in an asset's metadata
opens the same view after any restart: the image's layer (``zarr3://`` + the viewer's ``/data/<key>``), the
plane a microscopist expects (x across, y down; 3-D images in four panels with z through the first), zoomed
so the whole image fits (in level-0 voxels: the view's dimensions are the image's voxel size), and a contrast window from the image's coarsest level (0.5 to 99.5 percentiles:
a tomogram in float32 or a 16-bit scan is not drawn black or white).
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

import numpy as np

from em_platform.edge import Refused, join_key

# NGFF unit names → metres (Neuroglancer's view state counts in SI units)
METRES = {"angstrom": 1e-10, "nanometer": 1e-9, "micrometer": 1e-6, "millimeter": 1e-3, "meter": 1.0}
VIEW_PIXELS = 800  # the panel size a link zooms for (a laptop browser's image panel, roughly)
CONTRAST_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Image:
    """What a link needs of an OME-Zarr image: its key under the data root, axes, level-0 shape and the
    pixels of its coarsest level (for the contrast window)."""

    key: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    coarsest: np.ndarray
    scale: tuple[float, ...] = ()  # level 0's voxel size per axis, in ``units``
    units: tuple[str | None, ...] = ()


def image_key(image_url: str, data_root: str) -> str:
    """``image_url``'s key under ``data_root`` (a folder or an ``s3://`` URL), or :class:`Refused`."""
    root = data_root.rstrip("/") + "/"
    url = image_url.rstrip("/")
    if root.startswith("file://"):
        root = root[len("file://") :]
    if url.startswith("file://"):
        url = url[len("file://") :]
    if not url.startswith(root):
        raise Refused(
            "image", image_url, f"is not under the data root {data_root}; the viewer serves only that"
        )
    return join_key("", url[len(root) :], field="image")


def read_image(image_url: str, key: str, storage_options: dict | None = None) -> Image:
    """The :class:`Image` at ``image_url``, served as ``key`` (its multiscales metadata and coarsest level,
    nothing more)."""
    import zarr

    from em_platform.imaging.ome_zarr import open_store

    group = zarr.open_group(open_store(image_url, storage_options, read_only=True), mode="r")
    ome: Any = group.attrs["ome"]  # JSON: a shape other than OME-Zarr's raises below
    multiscale = ome["multiscales"][0]
    axes = tuple(a["name"] for a in multiscale["axes"])
    paths = [d["path"] for d in multiscale["datasets"]]
    scale = next(
        (
            t["scale"]
            for t in multiscale["datasets"][0].get("coordinateTransformations", [])
            if t["type"] == "scale"
        ),
        [1.0] * len(axes),
    )
    finest, coarsest = group[paths[0]], group[paths[-1]]
    # a multiscale's datasets are arrays (OME-Zarr), never groups
    assert isinstance(finest, zarr.Array) and isinstance(coarsest, zarr.Array)
    return Image(
        key=key,
        axes=axes,
        shape=tuple(finest.shape),
        coarsest=np.asarray(coarsest[...]),
        scale=tuple(float(v) for v in scale),
        units=tuple(a.get("unit") for a in multiscale["axes"]),
    )


def contrast_window(pixels: np.ndarray) -> tuple[float, float]:
    """The display range: the 0.5 and 99.5 percentiles of the finite pixels (a flat image gets ±1)."""
    values = pixels[np.isfinite(pixels)] if pixels.dtype.kind == "f" else pixels
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, CONTRAST_PERCENTILES))
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    return _round(lo), _round(hi)


def _round(value: float) -> float:
    """Four significant figures (the link stays short; a display window needs no more)."""
    return float(f"{value:.4g}")


def neuroglancer_link(viewer_url: str, image: Image, name: str | None = None) -> str:
    """The URL that opens ``image`` in the viewer at ``viewer_url``."""
    base = viewer_url.rstrip("/")
    spatial = [a for a in image.axes if a in ("x", "y", "z")]
    sizes = dict(zip(image.axes, image.shape, strict=True))
    lo, hi = contrast_window(image.coarsest)
    panel = VIEW_PIXELS / 2 if "z" in spatial else VIEW_PIXELS  # four panels share the window
    layer = {
        "type": "image",
        "source": f"zarr3://{base}/data/{urllib.parse.quote(image.key)}/",
        "name": name or "/".join(image.key.split("/")[-2:]).removesuffix(".zarr").removesuffix(".ome"),
        "shaderControls": {"normalized": {"range": [lo, hi]}},
    }
    state = {
        "dimensions": _dimensions(image),
        "displayDimensions": [a for a in ("x", "y", "z") if a in spatial],
        "crossSectionScale": float(f"{max(sizes['y'], sizes['x']) / panel:.2g}"),
        "layers": [layer],
        "layout": "4panel" if "z" in spatial else "xy",
    }
    return f"{base}/v/em/#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe=":/,[]{}")


def _dimensions(image: Image) -> dict[str, list]:
    """The view's coordinate space: one voxel of level 0 per unit along each spatial axis, in metres, so
    zoom (``crossSectionScale``) counts level-0 voxels per screen pixel. Axes without a known length
    unit keep Neuroglancer's own default."""
    out = {}
    for axis, size, unit in zip(image.axes, image.scale or (), image.units or (), strict=False):
        if axis in ("x", "y", "z") and unit in METRES:
            out[axis] = [float(f"{size * METRES[unit]:.6g}"), "m"]
    return out


def link_for(
    image_url: str,
    viewer_url: str,
    data_root: str,
    storage_options: dict | None = None,
    *,
    read_from: str | None = None,
    read_options: dict | None = None,
) -> str:
    """The link that opens ``image_url`` (under ``data_root``), made from its metadata and coarsest level, or
    from those of the same image at ``read_from`` (the acquisition buffer's copy of a montage that is about
    to be uploaded there)."""
    key = image_key(image_url, data_root)
    if read_from is None:
        return neuroglancer_link(viewer_url, read_image(image_url, key, storage_options))
    return neuroglancer_link(viewer_url, read_image(read_from, key, read_options))
