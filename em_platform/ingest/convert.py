"""A lazily read volume → a multiscale OME-Zarr image at a staging URL, with its thumbnail and mean.

Shared by every ingest (the local inbox and the public sources), so they calibrate and write alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from em_platform.catalog.records import jsonable
from em_platform.formats import Volume
from em_platform.imaging.ome_zarr import MultiscaleInfo, write_ome_zarr
from em_platform.imaging.thumbnail import thumbnail_png
from em_platform.ingest.checksum import combined_sha256

ASSUMED_VOXEL_NM = 1.0


def resolve_voxel_size(vol: Volume) -> tuple[dict[str, float], str, dict[str, str]]:
    """Voxel size in nm per spatial axis, where it came from, and the units the file used.

    Missing sizes are never left out: an uncalibrated axis takes the in-plane size if there is one
    (the usual isotropic assumption for stacks), otherwise 1 nm, and the source is then 'assumed'.
    """
    sizes = vol.voxel_size_nm()
    units = {a: u for a, u in zip(vol.axes, vol.units, strict=True) if a in sizes and u}
    known = [s for s in sizes.values() if s]
    fallback = known[0] if known else ASSUMED_VOXEL_NM
    resolved = {a: (s if s else fallback) for a, s in sizes.items()}
    source = "header" if len(known) == len(sizes) else "assumed"
    return resolved, source, units


@dataclass(frozen=True)
class Converted:
    info: MultiscaleInfo
    thumbnail_png: bytes
    global_mean: float  # mean of the coarsest level: cheap, and close to the full mean

    def technical(
        self, vol: Volume, files: list[dict[str, Any]], voxel_nm: dict[str, float], header: dict[str, Any]
    ) -> dict[str, Any]:
        """The record's ``metadata.technical``: source bytes and digest, and what was written."""
        return {
            "file_size_bytes": sum(f["size_bytes"] for f in files),
            "sha256": combined_sha256(files),
            "source_format": vol.format,
            "compression": "blosc-zstd",
            "chunk_size": list(self.info.chunks),
            "dtype": vol.data.dtype.name,
            "global_mean": self.global_mean,
            "dimensions_nm": self.dimensions_nm(voxel_nm),
            "header": jsonable(header),
        }

    def dimensions_nm(self, voxel_nm: dict[str, float]) -> list[float]:
        return [
            float(n) * voxel_nm[a]
            for n, a in zip(self.info.levels[0].shape, self.info.axes, strict=True)
            if a in voxel_nm
        ]


def convert_volume(
    vol: Volume,
    voxel_nm: dict[str, float],
    url: str,
    *,
    storage_options: dict[str, Any] | None,
    name: str,
    dask_client: Callable[[], Any] | None = None,
) -> Converted:
    """Write ``vol`` as OME-Zarr at ``url`` (level 0 bit-exact), then read back its coarsest level."""
    scale = [voxel_nm[a] if a in voxel_nm else 1.0 for a in vol.axes]
    units = ["nanometer" if a in voxel_nm else None for a in vol.axes]
    info = write_ome_zarr(
        vol.data,
        url,
        axes=vol.axes,
        scale=scale,
        units=units,
        storage_options=storage_options,
        name=name,
        client=dask_client() if dask_client else None,
    )
    coarsest = zarr.open_array(f"{url}/{info.levels[-1].path}", mode="r", storage_options=storage_options)
    coarse = np.asarray(coarsest[...])
    return Converted(
        info=info,
        thumbnail_png=thumbnail_png(coarse, vol.axes),
        global_mean=float(coarse.mean()) if coarse.size else 0.0,
    )
