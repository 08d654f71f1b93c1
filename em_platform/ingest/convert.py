"""A lazily read volume → a multiscale OME-Zarr image at a staging URL, with the record blocks it fills.

Shared by every ingest (the local inbox and the public sources), so they calibrate, write and describe
images alike: :func:`resolve_voxel_size` decides each axis's size and where it came from, and
:func:`convert_volume` writes the image and returns a :class:`Converted` that builds the record's
``metadata.core``, ``metadata.technical`` and ``metadata.ome_zarr``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from em_platform.catalog.records import jsonable, ome_zarr_block
from em_platform.formats import Volume
from em_platform.imaging.ome_zarr import MultiscaleInfo, write_ome_zarr
from em_platform.imaging.thumbnail import thumbnail_png
from em_platform.lazy_import import LazyModule
from em_platform.storage.checksums import combined_sha256

zarr = LazyModule("zarr")

ASSUMED_VOXEL_NM = 1.0
# Weakest first: a voxel size is only as trustworthy as its least trustworthy axis.
VOXEL_SOURCES = ("assumed", "config", "source", "header")


@dataclass(frozen=True)
class Calibration:
    """Voxel size in nm per spatial axis, where each came from, and the unit the file used."""

    voxel_nm: dict[str, float]
    sources: dict[str, str]  # per axis: header, source, config or assumed
    units: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """The record's single ``voxel_size_source``: the weakest of the axes' sources."""
        return min(self.sources.values(), key=VOXEL_SOURCES.index, default="assumed")

    @property
    def assumed_axes(self) -> list[str]:
        return [a for a, s in self.sources.items() if s == "assumed"]

    def core(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "voxel_size_nm": dict(self.voxel_nm),
            "voxel_size_source": self.source,
            "voxel_size_sources": dict(self.sources),
        }
        if self.units:
            out["units"] = dict(self.units)
        return out


def resolve_voxel_size(vol: Volume, known: Mapping[str, str] | None = None) -> Calibration:
    """Every spatial axis gets a size; an axis nothing calibrates is flagged 'assumed', never invented.

    ``known`` names where the sizes the volume carries came from, per axis (default 'header': the file).
    An uncalibrated axis takes the in-plane size if there is one (the usual isotropic assumption for a
    stack whose section thickness nobody recorded), otherwise 1 nm; either way it is 'assumed'.
    """
    sizes = vol.voxel_size_nm()
    units = {a: u for a, u in zip(vol.axes, vol.units, strict=True) if a in sizes and u}
    measured = [s for a in ("x", "y", "z") if (s := sizes.get(a))]
    fallback = measured[0] if measured else ASSUMED_VOXEL_NM
    known = known or {}
    voxel = {a: (s if s else fallback) for a, s in sizes.items()}
    sources = {a: (known.get(a, "header") if s else "assumed") for a, s in sizes.items()}
    return Calibration(voxel, sources, {a: u for a, u in units.items() if sizes.get(a)})


@dataclass(frozen=True)
class Converted:
    """One image written as OME-Zarr: what the record says about it."""

    info: MultiscaleInfo
    thumbnail_png: bytes
    global_mean: float  # mean of the coarsest level: cheap, and close to the full mean
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: str
    source_format: str
    calibration: Calibration

    def core(self) -> dict[str, Any]:
        """The record's ``metadata.core`` (without description and modality)."""
        return {
            "volume_shape": [int(s) for s in self.shape],
            "axes": list(self.axes),
            "data_type": self.dtype,
            **self.calibration.core(),
        }

    def technical(self, files: list[dict[str, Any]], header: dict[str, Any]) -> dict[str, Any]:
        """The record's ``metadata.technical``: source bytes and digest, and what was written."""
        return {
            "file_size_bytes": sum(f["size_bytes"] for f in files),
            "sha256": combined_sha256(files),
            "source_format": self.source_format,
            "compression": "blosc-zstd",
            "chunk_size": list(self.info.chunks),
            "dtype": self.dtype,
            "global_mean": self.global_mean,
            "dimensions_nm": self.dimensions_nm(),
            "header": jsonable(header),
        }

    def metadata(self, uri: str) -> dict[str, Any]:
        return {"ome_zarr": ome_zarr_block(self.info, uri)}

    def dimensions_nm(self) -> list[float]:
        voxel = self.calibration.voxel_nm
        return [
            float(n) * voxel[a]
            for n, a in zip(self.info.levels[0].shape, self.info.axes, strict=True)
            if a in voxel
        ]


def convert_volume(
    vol: Volume,
    calibration: Calibration,
    url: str,
    *,
    storage_options: dict[str, Any] | None,
    name: str,
    dask_client: Callable[[], Any] | None = None,
    in_order: bool = False,
) -> Converted:
    """Write ``vol`` as OME-Zarr at ``url`` (level 0 bit-exact), then read back its coarsest level.

    ``in_order``: the volume's planes arrive in order along its first axis (a file still downloading), so
    each is converted as soon as it is here, in this process (see ``write_ome_zarr``).
    """
    voxel_nm = calibration.voxel_nm
    scale = [voxel_nm.get(a, 1.0) for a in vol.axes]
    units = ["nanometer" if a in voxel_nm else None for a in vol.axes]
    info = write_ome_zarr(
        vol.data,
        url,
        axes=vol.axes,
        scale=scale,
        units=units,
        storage_options=storage_options,
        name=name,
        client=dask_client() if dask_client and not in_order else None,
        in_order=in_order,
    )
    coarsest = zarr.open_array(f"{url}/{info.levels[-1].path}", mode="r", storage_options=storage_options)
    coarse = np.asarray(coarsest[...])
    return Converted(
        info=info,
        thumbnail_png=thumbnail_png(coarse, vol.axes),
        global_mean=float(coarse.mean()) if coarse.size else 0.0,
        shape=tuple(int(s) for s in vol.data.shape),
        axes=tuple(vol.axes),
        dtype=vol.data.dtype.name,
        source_format=vol.format,
        calibration=calibration,
    )


@dataclass(frozen=True)
class CollectionMember:
    """One image of a collection: its name (usually the file's), the file it came from, and its pixels."""

    name: str
    source_file: str
    volume: Volume
    calibration: Calibration


@dataclass(frozen=True)
class ConvertedCollection:
    """Several images written as one OME-Zarr container (bioformats2raw.layout): what the record says."""

    members: tuple[CollectionMember, ...]
    images: tuple[Converted, ...]
    rule: str  # why these files are a collection and not one volume

    @property
    def thumbnail_png(self) -> bytes:
        return self.images[0].thumbnail_png

    def core(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "collection", "image_count": len(self.images)}
        dtypes = {im.dtype for im in self.images}
        if len(dtypes) == 1:
            out["data_type"] = dtypes.pop()
        return out

    def technical(self, files: list[dict[str, Any]], header: dict[str, Any]) -> dict[str, Any]:
        return {
            "file_size_bytes": sum(f["size_bytes"] for f in files),
            "sha256": combined_sha256(files),
            "source_format": "+".join(sorted({im.source_format for im in self.images})),
            "compression": "blosc-zstd",
            "header": jsonable(header),
        }

    def metadata(self, uri: str) -> dict[str, Any]:
        series = [str(i) for i in range(len(self.images))]
        return {
            "ome_zarr": {
                "uri": uri,
                "ngff_version": self.images[0].info.ngff_version,
                "layout": "bioformats2raw.layout",
                "series": series,
            },
            "collection": {
                "layout": "bioformats2raw.layout",
                "rule": self.rule,
                "images": [
                    {
                        "path": path,
                        "name": m.name,
                        "source_file": m.source_file,
                        **{k: v for k, v in im.core().items() if k != "volume_shape"},
                        "shape": [int(s) for s in im.shape],
                        "levels": ome_zarr_block(im.info, f"{uri}/{path}")["levels"],
                        "global_mean": im.global_mean,
                    }
                    for path, m, im in zip(series, self.members, self.images, strict=True)
                ],
            },
        }


def convert_collection(
    members: list[CollectionMember],
    url: str,
    *,
    rule: str,
    storage_options: dict[str, Any] | None,
    dask_client: Callable[[], Any] | None = None,
    on_image: Callable[[int, CollectionMember], None] | None = None,
) -> ConvertedCollection:
    """Write each member as its own multiscale image (series 0, 1, ...) of one bioformats2raw container."""
    from em_platform.imaging.collection import SeriesImage, finish_collection, series_path, start_collection

    start_collection(url, storage_options)
    written = []
    for i, member in enumerate(members):
        if on_image:
            on_image(i, member)
        written.append(
            convert_volume(
                member.volume,
                member.calibration,
                series_path(url, i),
                storage_options=storage_options,
                name=member.name,
                dask_client=dask_client,
            )
        )
    finish_collection(
        url,
        [
            SeriesImage(m.name, im.shape, im.axes, im.dtype, m.calibration.voxel_nm)
            for m, im in zip(members, written, strict=True)
        ],
        storage_options,
    )
    return ConvertedCollection(tuple(members), tuple(written), rule)
