"""What every public source gives the ingest pipeline: a cheap check of its current version, and a
resumable fetch that yields a lazy, calibrated volume plus the provenance of every byte."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_platform.formats import Volume
from em_platform.sources.manifest import DownloadManifest


@dataclass(frozen=True)
class SourceFile:
    """One source file (or one block set of a block source) as received: the record's ``files.source``."""

    path: str  # its name within the dataset, e.g. "data/slice_001.dm3" or "raw/0_1_2/512_512_512/0_0_0"
    url: str
    size_bytes: int
    sha256: str  # of the bytes as received (for a block set: of the per-block digests in block order)

    def as_record(self) -> dict[str, Any]:
        return {"path": self.path, "url": self.url, "size_bytes": self.size_bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class RemoteVersion:
    """What the source says about a dataset now, learnt cheaply (API JSON, HTTP HEAD, DVID info, .zattrs).

    ``fingerprint`` changes whenever the data would change (e.g. sha256 of the entry JSON's file list,
    ETag + size + Last-Modified, the array's metadata and crop); the scheduled re-check compares it with
    the last complete ingest's and re-ingests only when it differs.
    """

    fingerprint: str
    description: str
    source_urls: tuple[str, ...]
    additional_metadata: dict[str, Any] = field(default_factory=dict)
    total_bytes: int | None = None  # expected transfer size, for progress lines (None = unknown)


@dataclass(frozen=True)
class FetchedVolume:
    """A fetched dataset, ready for conversion: every byte is on local disk and verified."""

    volume: Volume  # lazy (dask), axes in NGFF order; an axis nothing calibrates has scale None
    voxel_size_source: str  # where the sizes came from: "header" (the file), "source" (published), "config"
    files: tuple[SourceFile, ...]
    modality: str | None = None  # one of the schema's modalities: EM, FIB-SEM, SEM, TEM, SBF-SEM → "SEM"...
    header: dict[str, Any] = field(default_factory=dict)  # selected header fields, JSON-able
    voxel_size_sources: dict[str, str] = field(default_factory=dict)  # per axis, where it differs
    # Set while the bytes are still arriving (``volume`` reads wait for them): ``finish()`` waits for the
    # download, verifies it and returns the complete FetchedVolume (with ``files``; its ``volume`` is this one
    # unless the complete file must be converted again); ``cancel()`` stops the download.
    finish: Callable[[], FetchedVolume] | None = None
    cancel: Callable[[], None] | None = None

    def axis_sources(self) -> dict[str, str]:
        """Where each calibrated spatial axis's size came from (uncalibrated axes are left out)."""
        sizes = self.volume.voxel_size_nm()
        return {a: self.voxel_size_sources.get(a, self.voxel_size_source) for a, s in sizes.items() if s}


class Source(ABC):
    """One dataset of one public source (a Dagster partition), with its endpoint configuration."""

    #: the catalog's ``source`` value: empiar, epfl, flyem, idr or openorganelle
    name: str

    @property
    @abstractmethod
    def source_id(self) -> str:
        """The dataset's id within its source (the catalog's ``source_id``), e.g. "11759"."""

    @abstractmethod
    def check(self, logger: logging.Logger | logging.LoggerAdapter) -> RemoteVersion:
        """Ask the source what it holds now; raise SourceError (naming the URL) if it cannot say."""

    @abstractmethod
    def fetch(
        self,
        workdir: Path,
        manifest: DownloadManifest,
        version: RemoteVersion,
        logger: logging.Logger | logging.LoggerAdapter,
    ) -> FetchedVolume | FetchedCollection:
        """Download what the manifest does not already hold into ``workdir``, verify it, and open it.

        Resumable: items already in the manifest are not fetched again, partial files are continued.
        Memory stays bounded whatever the dataset size (stream to disk, never hold a volume whole).
        Raises SourceError (transient faults already retried) or FormatError for an unreadable file.
        """


@dataclass(frozen=True)
class FetchedImage:
    """One image of a fetched collection: usually one file."""

    name: str
    source_file: str  # its path within the dataset (the record's files.source path)
    volume: Volume  # lazy; an axis nothing calibrates has scale None (never made up)
    voxel_size_sources: dict[str, str]  # per calibrated spatial axis: header, source or config


@dataclass(frozen=True)
class FetchedCollection:
    """A fetched dataset that is a collection of images (see :mod:`em_platform.formats.image_set`)."""

    images: tuple[FetchedImage, ...]
    files: tuple[SourceFile, ...]
    rule: str  # why it is a collection, for the record
    modality: str | None = None
    header: dict[str, Any] = field(default_factory=dict)
