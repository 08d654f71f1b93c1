"""JSON documents shaped like the real EMPIAR and IDR (OMERO JSON API) answers, for the loopback servers.

Shapes follow the public APIs: EMPIAR's ``GET /empiar/api/entry/{id}/`` answers one object keyed
``"EMPIAR-{id}"`` (``title``, ``release_date``, ``experiment_type``, ``imagesets[]`` with ``directory``
relative to the entry folder, ``pixel_width``/``pixel_height`` in ångström and ``image_width``/
``image_height`` as strings, ``dataset_size``); OMERO's ``GET /api/v0/m/images/{id}/`` answers
``{"data": {"@id", "@type", "Name", "Pixels": {"SizeX"…, "PhysicalSizeX": {"Value", "Unit", "Symbol"},
"Type": {"value"}}}}``.
"""

from __future__ import annotations

from typing import Any

OME = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def empiar_entry(
    entry_id: str,
    *,
    title: str,
    experiment_type: str,
    directory: str,
    data_format: str,
    slices: int,
    shape_yx: tuple[int, int],
    pixel_nm: float | None,
    release_date: str = "2023-11-14",
    category: str | None = None,
    frames_per_image: int = 1,
) -> dict[str, Any]:
    imageset: dict[str, Any] = {
        "name": f"{experiment_type} {category or 'sections'}",
        "directory": directory,
        "category": category or experiment_type,
        "header_format": data_format,
        "data_format": data_format,
        "num_images_or_tilt_series": slices,
        "frames_per_image": frames_per_image,
        "voxel_type": "UNSIGNED 16 BIT INTEGER",
        "image_width": str(shape_yx[1]),
        "image_height": str(shape_yx[0]),
        "details": "Sections in acquisition order.",
    }
    if pixel_nm is not None:
        imageset["pixel_width"] = imageset["pixel_height"] = pixel_nm * 10.0  # EMPIAR records ångström
    return {
        f"EMPIAR-{entry_id}": {
            "title": title,
            "status": "REL",
            "entry_doi": f"10.6019/EMPIAR-{entry_id}",
            "deposition_date": "2023-10-02",
            "release_date": release_date,
            "experiment_type": experiment_type,
            "scale": "cellular",
            "cross_references": [],
            "imagesets": [imageset],
            "citation": [{"title": title, "published": False, "authors": [{"name": "Doe J", "order_id": 0}]}],
            "dataset_size": "1.2 GB",
        }
    }


def idr_image(
    image_id: int,
    name: str,
    shape_zyx: tuple[int, int, int],
    *,
    dtype: str = "uint8",
    physical_um: tuple[float, float, float] | None = (0.02, 0.02, 0.02),
) -> dict[str, Any]:
    z, y, x = shape_zyx
    pixels: dict[str, Any] = {
        "@id": image_id + 1,
        "@type": f"{OME}#Pixels",
        "SizeX": x,
        "SizeY": y,
        "SizeZ": z,
        "SizeC": 1,
        "SizeT": 1,
        "SignificantBits": 8 if dtype.endswith("8") else 16,
        "Type": {"@id": 1, "@type": "TBD#PixelsType", "value": dtype},
        "omero:sha1": "0" * 40,
    }
    if physical_um is not None:
        for axis, value in zip("ZYX", physical_um, strict=True):
            pixels[f"PhysicalSize{axis}"] = {
                "Symbol": "µm",
                "Value": value,
                "@type": "TBD#LengthI",
                "Unit": "MICROMETER",
            }
    return {
        "data": {
            "@id": image_id,
            "@type": f"{OME}#Image",
            "Name": name,
            "AcquisitionDate": 1591747200000,
            "omero:series": 0,
            "Pixels": pixels,
            "url:image": f"https://idr.openmicroscopy.org/api/v0/m/images/{image_id}/",
        }
    }
