"""The public sources em_platform ingests, each with its endpoints, datasets and weight."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from em_platform.sources import empiar, epfl, flyem, idr, openorganelle
from em_platform.sources.dataset import Source


@dataclass(frozen=True)
class SourceKind:
    name: str  # the catalog's source and the asset key ingest/<name>
    title: str
    # a frozen dataclass whose defaults are the real public endpoints; .validate() names a bad field
    endpoints: type
    datasets: Mapping[str, Any]  # partition key → what to fetch
    make_source: Callable[[str, Any], Source]
    heavy: bool  # GB-sized downloads and conversions: at most one such run at a time (dagster.yaml)


SOURCES: dict[str, SourceKind] = {
    k.name: k
    for k in (
        SourceKind(
            "empiar",
            "EBI EMPIAR entries (DM3/DM4, MRC, TIFF slices over FTP or HTTPS)",
            empiar.EmpiarEndpoints,
            empiar.DATASETS,
            empiar.make_source,
            heavy=False,
        ),
        SourceKind(
            "epfl",
            "EPFL CVLab hippocampus FIB-SEM stack (one multi-page TIFF over HTTP, parallel ranged download)",
            epfl.EpflEndpoints,
            epfl.DATASETS,
            epfl.make_source,
            heavy=True,
        ),
        SourceKind(
            "flyem",
            "FlyEM hemibrain grayscale crops from DVID (blocks in parallel), dataset metadata from neuPrint",
            flyem.FlyemEndpoints,
            flyem.DATASETS,
            flyem.make_source,
            heavy=True,
        ),
        SourceKind(
            "idr",
            "IDR images (OME-TIFF over FTP, HTTP fallback; metadata from the IDR JSON API)",
            idr.IdrEndpoints,
            idr.DATASETS,
            idr.make_source,
            heavy=False,
        ),
        SourceKind(
            "openorganelle",
            "OpenOrganelle (COSEM) Zarr/N5 multiscales on S3, streamed chunk by chunk",
            openorganelle.OpenOrganelleEndpoints,
            openorganelle.DATASETS,
            openorganelle.make_source,
            heavy=True,
        ),
    )
}
