"""A collection of images in one OME-Zarr container, in the layout bioformats2raw writes (NGFF ``bioformats2raw.layout``).

Why this layout: it is the one OME-NGFF specifies for several unrelated images in one container (0.4 and
0.5, "transitional"), and readers already handle it: ome-zarr-py lists the series from the OME-XML
(``ome_zarr.utils.find_multiscales``, used by ``ome_zarr view`` and the napari plugin), and each series is
a plain multiscale image that neuroglancer, napari and ome-zarr-py's ``Reader`` open by its path
(``<container>/0``). A plate (HCS) layout would claim wells and fields, and separate containers would give
the catalog many records for one entry.

Layout (zarr v3, NGFF 0.5)::

    <container>/zarr.json          {"ome": {"version": "0.5", "bioformats2raw.layout": 3}}
    <container>/0, 1, ...          one multiscale image each (written by imaging.ome_zarr.write_ome_zarr)
    <container>/OME/zarr.json      {"ome": {"version": "0.5", "series": ["0", "1", ...]}}
    <container>/OME/METADATA.ome.xml   one <Image> per series, in series order, as bioformats2raw writes it
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from xml.etree import ElementTree as ET

import fsspec
import numpy as np

from em_platform.imaging.ome_zarr import NGFF_VERSION, open_store
from em_platform.lazy_import import LazyModule

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    import zarr
else:
    zarr = LazyModule("zarr")

OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
LAYOUT_VERSION = 3
# numpy dtype → OME PixelType
_PIXEL_TYPES = {
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "float32": "float",
    "float64": "double",
    "complex64": "complex",
    "complex128": "double-complex",
    "bool": "bit",
}


@dataclass(frozen=True)
class SeriesImage:
    """What the OME-XML says about one image of the collection."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: str
    voxel_size_nm: dict[str, float]  # per spatial axis present


def start_collection(url: str, storage_options: dict | None = None) -> None:
    """Create the container's root group (empty, marked as a bioformats2raw layout); images go in after."""
    root = zarr.open_group(open_store(url, storage_options), mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": NGFF_VERSION, "bioformats2raw.layout": LAYOUT_VERSION}


def series_path(url: str, index: int) -> str:
    """Where series ``index`` is written: the container's group ``<index>``."""
    return f"{url.rstrip('/')}/{index}"


def finish_collection(url: str, images: Sequence[SeriesImage], storage_options: dict | None = None) -> None:
    """Write the OME group: the series list and the OME-XML describing every image, in series order."""
    series = [str(i) for i in range(len(images))]
    store = open_store(url, storage_options)
    ome = zarr.open_group(store, path="OME", mode="w", zarr_format=3)
    ome.attrs["ome"] = {"version": NGFF_VERSION, "series": series}
    xml = ome_xml(images)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    with fs.open(posixpath.join(path, "OME", "METADATA.ome.xml"), "wb") as f:
        f.write(xml)


def ome_xml(images: Sequence[SeriesImage]) -> bytes:
    """OME-XML (2016-06 schema) with one ``<Image>`` per series: name, pixel type, sizes, physical sizes in nm.

    As bioformats2raw writes it: no pixel data (``<MetadataOnly/>``), one channel, XYZCT order, a t axis (the
    frames of a movie) as SizeT.
    """
    ET.register_namespace("", OME_NS)
    root = ET.Element(f"{{{OME_NS}}}OME", {"Creator": "em_platform"})
    for i, im in enumerate(images):
        sizes = dict(zip(im.axes, im.shape, strict=True))
        image = ET.SubElement(root, f"{{{OME_NS}}}Image", {"ID": f"Image:{i}", "Name": im.name})
        attrs = {
            "ID": f"Pixels:{i}",
            "DimensionOrder": "XYZCT",
            "Type": _PIXEL_TYPES.get(np.dtype(im.dtype).name, np.dtype(im.dtype).name),
            "BigEndian": "false",
            "SizeX": str(sizes["x"]),
            "SizeY": str(sizes["y"]),
            "SizeZ": str(sizes.get("z", 1)),
            "SizeC": str(sizes.get("c", 1)),
            "SizeT": str(sizes.get("t", 1)),
        }
        for axis in ("x", "y", "z"):
            if axis in im.voxel_size_nm and axis in sizes:
                attrs[f"PhysicalSize{axis.upper()}"] = repr(float(im.voxel_size_nm[axis]))
                attrs[f"PhysicalSize{axis.upper()}Unit"] = "nm"
        pixels = ET.SubElement(image, f"{{{OME_NS}}}Pixels", attrs)
        ET.SubElement(pixels, f"{{{OME_NS}}}Channel", {"ID": f"Channel:{i}:0", "SamplesPerPixel": "1"})
        ET.SubElement(pixels, f"{{{OME_NS}}}MetadataOnly")
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)
