"""EPFL CVLab's CA1 hippocampus FIB-SEM stack: one multi-page TIFF over HTTP, fetched in parallel ranged parts.

The file is 3.35 GB (1065 × 1536 × 2048 uint8, 5 nm isotropic); macroscope needed 4 min 26 s for it.
The TIFF carries no physical size, so the voxel size is the one CVLab publishes ("source"). Its pages are
converted as they arrive (:mod:`em_platform.formats.tiff_arriving`), so a whole ingest takes about as long
as the download.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast
from urllib.parse import unquote, urlparse

from em_platform.edge import inside
from em_platform.formats import Volume
from em_platform.formats.tiff import read_tiff
from em_platform.formats.tiff_arriving import arriving_volume, contiguous_layout, same_layout
from em_platform.sources.arrival import Arrival
from em_platform.sources.dataset import FetchedVolume, RemoteVersion, Source, SourceFile
from em_platform.sources.download import PART_SUFFIX, DownloadOptions, download, stat_remote
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.progress import Progress
from em_platform.sources.retry import RetryPolicy


@dataclass(frozen=True)
class EpflDataset:
    file_url: str
    description: str
    voxel_size_nm: float
    modality: str = "FIB-SEM"
    sha256: str | None = None  # the file's digest when it is known; a mismatch fails the ingest


DATASETS = {
    "hippocampus-ca1": EpflDataset(
        file_url="https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus/volumedata.tif",
        description="5x5x5µm section from CA1 hippocampus region (EPFL CVLab FIB-SEM)",
        voxel_size_nm=5.0,
    ),
}


@dataclass(frozen=True)
class EpflEndpoints:
    # Where the stack is fetched from; empty = the URL CVLab publishes (a mirror can be given instead).
    file_url: str = ""
    sha256: str = ""  # pin the file's sha256: a download with other bytes fails and publishes nothing
    parallel: int = 4  # ranged parts in flight
    part_mib: int = 16  # small enough that probing the link with the first part costs little
    retry_attempts: int = 6
    retry_base_delay_s: float = 1.0
    # convert the stack's pages while the rest of the file is still downloading (when its layout allows)
    convert_while_downloading: bool = True

    def validate(self) -> None:
        if self.file_url and urlparse(self.file_url).scheme not in ("http", "https", "ftp"):
            raise ValueError(f"file_url must be an http(s):// or ftp:// URL, not {self.file_url!r}")
        if self.sha256 and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256.lower())
        ):
            raise ValueError(f"sha256 must be 64 hex digits, not {self.sha256!r}")
        if not 1 <= self.parallel <= 32:
            raise ValueError(f"parallel must be between 1 and 32, not {self.parallel}")
        if self.part_mib < 1:
            raise ValueError(f"part_mib must be at least 1, not {self.part_mib}")
        if self.retry_attempts < 1 or self.retry_base_delay_s < 0:
            raise ValueError("retry_attempts must be ≥ 1 and retry_base_delay_s ≥ 0")

    def options(self) -> DownloadOptions:
        return DownloadOptions(
            policy=RetryPolicy(attempts=self.retry_attempts, base_delay_s=self.retry_base_delay_s),
            parallel=self.parallel,
            part_bytes=self.part_mib * 2**20,
        )


def make_source(key: str, endpoints: EpflEndpoints | None = None) -> EpflSource:
    if key not in DATASETS:
        raise ValueError(f"unknown EPFL dataset {key!r}; known: {', '.join(sorted(DATASETS))}")
    return EpflSource(key, DATASETS[key], endpoints or EpflEndpoints())


class EpflSource(Source):
    name = "epfl"

    def __init__(self, key: str, dataset: EpflDataset, endpoints: EpflEndpoints):
        self.key = key
        self.dataset = dataset
        self.endpoints = endpoints
        self.url = endpoints.file_url or dataset.file_url
        self.sha256 = endpoints.sha256.lower() or dataset.sha256

    @property
    def source_id(self) -> str:
        return self.key

    def check(self, logger: logging.Logger | logging.LoggerAdapter) -> RemoteVersion:
        remote = stat_remote(self.url, options=self.endpoints.options(), logger=logger)
        return RemoteVersion(
            fingerprint=remote.fingerprint(),
            description=self.dataset.description,
            source_urls=(self.url,),
            additional_metadata={"http": {"etag": remote.etag, "last_modified": remote.last_modified}},
            total_bytes=remote.size_bytes,
        )

    def fetch(
        self,
        workdir: Path,
        manifest: DownloadManifest,
        version: RemoteVersion,
        logger: logging.Logger | logging.LoggerAdapter,
    ) -> FetchedVolume:
        """Download the stack; with ``convert_while_downloading`` (default) the volume is returned as soon as
        the first page says where the pages lie, and its slabs wait for their bytes, so the conversion runs
        alongside the transfer instead of after it."""
        name = Path(unquote(urlparse(self.url).path)).name or "volume.tif"
        dest = inside(workdir, name, field="url")  # a name from the configured URL stays in the folder
        progress = Progress(f"EPFL {self.key}", version.total_bytes, logger)

        def get(arrival: Arrival | None = None):
            entry = download(
                self.url,
                dest,
                manifest=manifest,
                expected_sha256=self.sha256,
                expected_size=version.total_bytes,
                options=self.endpoints.options(),
                progress=progress,
                logger=logger,
                arrival=arrival,
            )
            progress.finish()
            return entry

        if not self.endpoints.convert_while_downloading or not version.total_bytes:
            return self._complete(dest, get())
        arrival = Arrival(dest, dest.with_name(dest.name + PART_SUFFIX), version.total_bytes)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epfl-download")
        transfer = pool.submit(get, arrival)

        def fail_arrival(f: Future) -> None:
            if (error := f.exception()) is not None:
                arrival.fail(error)

        transfer.add_done_callback(fail_arrival)
        pool.shutdown(wait=False)
        try:
            # an ArrivingReader is a binary file object (io.RawIOBase), which typing's BinaryIO cannot name
            layout = contiguous_layout(cast(BinaryIO, arrival.reader()))
        except (
            Exception
        ) as exc:  # the first page unreadable (or the download failed): decide on the whole file
            logger.info(
                "%s: cannot read the stack while it arrives (%s); converting once it is complete",
                dest.name,
                exc,
            )
            layout = None
        if layout is None:
            return self._complete(dest, transfer.result())
        logger.info(
            "%s: %d pages of %d x %d %s stored contiguously; converting them as they arrive",
            dest.name,
            *layout.shape,
            layout.dtype.name,
        )
        vol, voxel_source = self._calibrate(arriving_volume(layout, arrival.read_at, str(dest)))

        def finish() -> FetchedVolume:
            complete = self._complete(dest, transfer.result())  # the download's error, if any, is raised here
            if same_layout(layout, complete.volume):
                return dataclasses.replace(
                    complete, volume=vol, header={**complete.header, "read_while_arriving": True}
                )
            logger.warning(
                "%s: the pages are not where the first page said; converting the complete file", dest
            )
            return complete

        return FetchedVolume(
            volume=vol,
            voxel_size_source=voxel_source,
            files=(),
            modality=self.dataset.modality,
            header={"tiff": vol.source_metadata},
            finish=finish,
            cancel=arrival.cancel,
        )

    def _calibrate(self, vol: Volume) -> tuple[Volume, str]:
        """The TIFF's own physical size, else CVLab's published voxel size ('source')."""
        if vol.calibrated:
            return vol, "header"
        nm = self.dataset.voxel_size_nm
        return (
            dataclasses.replace(
                vol,
                scale=tuple(nm if a in "zyx" else s for a, s in zip(vol.axes, vol.scale, strict=True)),
                units=tuple(
                    "nanometer" if a in "zyx" else u for a, u in zip(vol.axes, vol.units, strict=True)
                ),
            ),
            "source",
        )

    def _complete(self, dest: Path, entry) -> FetchedVolume:
        vol, voxel_source = self._calibrate(read_tiff(dest))
        return FetchedVolume(
            volume=vol,
            voxel_size_source=voxel_source,
            files=(SourceFile(dest.name, self.url, entry.size_bytes, entry.sha256),),
            modality=self.dataset.modality,
            header={"tiff": vol.source_metadata},
        )
