"""The public sources em_platform ingests, each with its endpoints, datasets and weight."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from em_platform.sources import flyem
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
            "flyem",
            "FlyEM hemibrain grayscale crops from DVID (blocks in parallel), dataset metadata from neuPrint",
            flyem.FlyemEndpoints,
            flyem.DATASETS,
            flyem.make_source,
            heavy=True,
        ),
    )
}
