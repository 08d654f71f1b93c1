"""The materialization metadata of every ingest asset (``ingest/local`` and each ``ingest/<source>``), built once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dagster as dg

from em_platform.assets.presentation import png_markdown, rounded, view_metadata, voxel_size_metadata
from em_platform.ingest.lifecycle import IngestResult

LINKED_IMAGES = 20


def ingest_materialization_metadata(
    result: IngestResult, view: Callable[[str], str | None]
) -> dict[str, Any]:
    """What the UI shows for an ingest: where the image is, what it holds, its checksum and thumbnail, and
    ``view(url)``, the Neuroglancer link (a collection: its first image's, and each image's in its table)."""
    rec = result.record
    meta_block = rec["metadata"]
    core, tech = meta_block["core"], meta_block.get("technical", {})
    provenance = meta_block.get("provenance", {})
    meta: dict[str, Any] = {
        "path": dg.MetadataValue.path(result.volume_url),
        "catalog_id": rec["id"],
        "converted": result.converted,
        "sha256": tech.get("sha256", ""),
        "source_bytes": tech.get("file_size_bytes", 0),
    }
    if tech.get("source_format"):
        meta["source_format"] = tech["source_format"]
    if core.get("kind") == "collection":
        images = meta_block["collection"]["images"]
        # a link per image, for the first LINKED_IMAGES (each reads its image's coarsest level; an EMPIAR
        # entry can hold thousands of micrographs)
        linked = [view(f"{result.volume_url}/{im['path']}") for im in images[:LINKED_IMAGES]]
        links = linked + [None] * (len(images) - len(linked))
        meta["images"] = len(images)
        if links and links[0]:
            meta["neuroglancer"] = view_metadata(links[0])
        meta["collection"] = dg.MetadataValue.md(
            "| image | shape | axes | dtype | voxel size (nm) | view |\n|---|---|---|---|---|---|\n"
            + "\n".join(
                f"| {im['name']} | {tuple(im['shape'])} | {''.join(im['axes'])} | {im['data_type']} | "
                f"{ {a: rounded(v) for a, v in im['voxel_size_nm'].items()} } ({im['voxel_size_source']}) | "
                + (f"[Neuroglancer]({link})" if link is not None else "")
                + " |"
                for im, link in zip(images, links, strict=True)
            )
        )
    else:
        meta |= {
            "shape": str(tuple(core["volume_shape"])),
            "axes": "".join(core["axes"]),
            "dtype": core["data_type"],
            "voxel_size_nm": voxel_size_metadata(core["voxel_size_nm"]),
            "voxel_size_source": core["voxel_size_source"],
        }
        if "ome_zarr" in meta_block:
            meta["pyramid_levels"] = len(meta_block["ome_zarr"].get("levels", []))
            link = view(result.volume_url)
            if link:
                meta["neuroglancer"] = view_metadata(link)
    if "source_fingerprint" in provenance:
        meta["source_fingerprint"] = provenance["source_fingerprint"]
    if "source_urls" in provenance:
        meta["source_urls"] = dg.MetadataValue.json(provenance["source_urls"])
    if result.thumbnail_png:
        meta["thumbnail"] = png_markdown(result.thumbnail_png, rec["source_id"])
    if rec.get("files", {}).get("thumbnail"):
        meta["thumbnail_file"] = dg.MetadataValue.path(rec["files"]["thumbnail"])  # the stored PNG
    return meta
