"""EBI EMPIAR entries: the entry's metadata from the EMPIAR REST API, its image files from the EMPIAR archive.

The archive is read over FTP or its HTTPS mirror (``transport``), the folder listed (NLST, or the HTTPS
index page), every image file downloaded resumably, and the slices (DM3/DM4, MRC, TIFF) stacked lazily
in natural name order (``s2`` before ``s10``) into one volume. In-plane voxel size comes from the
files' calibration when they have one; the section thickness is the entry's published value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlparse

import dask.array as da
import requests

from em_platform.formats import FormatError, Volume, open_volume
from em_platform.sources.dataset import FetchedVolume, RemoteVersion, Source, SourceFile
from em_platform.sources.download import DownloadOptions, download, get_json, list_ftp, stat_remote
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.progress import Progress
from em_platform.sources.retry import RetryPolicy, SourceError, http_error, retrying

IMAGE_SUFFIXES = (".dm3", ".dm4", ".mrc", ".mrcs", ".map", ".rec", ".st", ".tif", ".tiff")


@dataclass(frozen=True)
class EmpiarEntry:
    entry_id: str
    voxel_size_nm: dict[str, float]  # the entry's published voxel size, used where the files are silent
    modality: str


DATASETS = {
    # "Developing retina in zebrafish 55 hpf larval eye": SBF-SEM, 16 DM3 sections, 8 nm/px, 50 nm sections.
    "11759": EmpiarEntry("11759", {"z": 50.0, "y": 8.0, "x": 8.0}, "SEM"),
}


@dataclass(frozen=True)
class EmpiarEndpoints:
    api_url: str = "https://www.ebi.ac.uk/empiar/api/entry/{entry_id}/"
    archive_ftp: str = "ftp://ftp.ebi.ac.uk/empiar/world_availability/{entry_id}/data/"
    archive_https: str = "https://ftp.ebi.ac.uk/empiar/world_availability/{entry_id}/data/"
    transport: str = "ftp"  # "ftp" or "https": how the archive is listed and read
    parallel: int = 4  # files downloaded at once
    retry_attempts: int = 6
    retry_base_delay_s: float = 1.0

    def validate(self) -> None:
        for name, schemes in (
            ("api_url", ("http", "https")),
            ("archive_ftp", ("ftp",)),
            ("archive_https", ("http", "https")),
        ):
            value = getattr(self, name)
            if urlparse(value).scheme not in schemes or not urlparse(value).netloc:
                raise ValueError(f"{name} must be a {'/'.join(schemes)}:// URL, not {value!r}")
            if "{entry_id}" not in value:
                raise ValueError(f"{name} must contain '{{entry_id}}', got {value!r}")
        if self.transport not in ("ftp", "https"):
            raise ValueError(f"transport must be 'ftp' or 'https', not {self.transport!r}")
        if not 1 <= self.parallel <= 16:
            raise ValueError(f"parallel must be between 1 and 16, not {self.parallel}")
        if self.retry_attempts < 1 or self.retry_base_delay_s < 0:
            raise ValueError("retry_attempts must be ≥ 1 and retry_base_delay_s ≥ 0")

    def options(self) -> DownloadOptions:
        return DownloadOptions(
            policy=RetryPolicy(attempts=self.retry_attempts, base_delay_s=self.retry_base_delay_s), parallel=1
        )


def make_source(key: str, endpoints: EmpiarEndpoints | None = None) -> EmpiarSource:
    if key not in DATASETS:
        raise ValueError(f"unknown EMPIAR entry {key!r}; known: {', '.join(sorted(DATASETS))}")
    return EmpiarSource(DATASETS[key], endpoints or EmpiarEndpoints())


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href and not href.startswith(("?", "/", "../", "#")) and "://" not in href:
                self.hrefs.append(unquote(href))


class EmpiarSource(Source):
    name = "empiar"

    def __init__(self, entry: EmpiarEntry, endpoints: EmpiarEndpoints):
        self.entry = entry
        self.endpoints = endpoints
        self.api_url = endpoints.api_url.format(entry_id=entry.entry_id)
        base = endpoints.archive_ftp if endpoints.transport == "ftp" else endpoints.archive_https
        self.archive_url = base.format(entry_id=entry.entry_id)

    @property
    def source_id(self) -> str:
        return self.entry.entry_id

    # -- listing -----------------------------------------------------------------------------------

    def _list(self, folder_url: str, logger) -> list[str]:
        if self.endpoints.transport == "ftp":
            return list_ftp(folder_url, options=self.endpoints.options(), logger=logger)

        def index() -> list[str]:
            r = requests.get(folder_url, timeout=self.endpoints.options().timeout_s)
            if r.status_code >= 400:
                raise http_error(r.status_code, folder_url, r.reason)
            parser = _Links()
            parser.feed(r.text)
            return sorted(set(parser.hrefs))

        return retrying(
            index, what=f"list {folder_url}", policy=self.endpoints.options().policy, logger=logger
        )

    def image_files(self, logger) -> list[tuple[str, str]]:
        """(path relative to the data folder, URL) of every image file, in slice order; one sub-folder deep."""
        found: list[tuple[str, str]] = []
        for name in self._list(self.archive_url, logger):
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.append((name, urljoin(self.archive_url, name)))
            elif name.endswith("/") or "." not in name:  # a sub-folder (an imageset's directory)
                sub = urljoin(self.archive_url, name.rstrip("/") + "/")
                for child in self._list(sub, logger):
                    if child.lower().endswith(IMAGE_SUFFIXES):
                        found.append((f"{name.rstrip('/')}/{child}", urljoin(sub, child)))
        if not found:
            raise SourceError(
                f"{self.archive_url}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the entry's data folder; "
                "check the entry id and the archive URL",
                url=self.archive_url,
            )
        return sorted(found, key=lambda p: natural_key(p[0]))

    # -- Source ------------------------------------------------------------------------------------

    def check(self, logger: logging.Logger | logging.LoggerAdapter) -> RemoteVersion:
        doc = get_json(self.api_url, options=self.endpoints.options(), logger=logger)
        entry = doc.get(f"EMPIAR-{self.entry.entry_id}") if isinstance(doc, dict) else None
        if not isinstance(entry, dict):
            raise SourceError(f"{self.api_url} did not answer EMPIAR-{self.entry.entry_id}", url=self.api_url)
        files = self.image_files(logger)
        opts = self.endpoints.options()
        with ThreadPoolExecutor(max_workers=self.endpoints.parallel) as pool:
            sizes = list(pool.map(lambda f: stat_remote(f[1], options=opts, logger=logger).size_bytes, files))
        listing = [{"path": p, "url": u, "size_bytes": s} for (p, u), s in zip(files, sizes, strict=True)]
        fingerprint = hashlib.sha256(
            json.dumps(
                {"entry": entry, "files": [(f["path"], f["size_bytes"]) for f in listing]}, sort_keys=True
            ).encode()
        ).hexdigest()
        return RemoteVersion(
            fingerprint=fingerprint,
            description=str(entry.get("title") or f"EMPIAR-{self.entry.entry_id}"),
            source_urls=(self.archive_url, self.api_url),
            additional_metadata={"empiar_entry": entry, "archive_files": listing},
            total_bytes=sum(s or 0 for s in sizes),
        )

    def fetch(
        self,
        workdir: Path,
        manifest: DownloadManifest,
        version: RemoteVersion,
        logger: logging.Logger | logging.LoggerAdapter,
    ) -> FetchedVolume:
        listing = version.additional_metadata["archive_files"]
        progress = Progress(f"EMPIAR-{self.entry.entry_id}", version.total_bytes, logger)
        opts = self.endpoints.options()

        def get(f: dict[str, Any]):
            return download(
                f["url"],
                workdir / "data" / f["path"],
                manifest=manifest,
                key=f["path"],
                expected_size=f["size_bytes"],
                options=opts,
                progress=progress,
                logger=logger,
            )

        with ThreadPoolExecutor(max_workers=self.endpoints.parallel, thread_name_prefix="empiar") as pool:
            entries = list(pool.map(get, listing))
        progress.finish()
        vol = stack_slices([workdir / "data" / f["path"] for f in listing])
        vol, voxel_source = self._calibrate(vol)
        return FetchedVolume(
            volume=vol,
            voxel_size_source=voxel_source,
            files=tuple(
                SourceFile(f["path"], f["url"], e.size_bytes, e.sha256)
                for f, e in zip(listing, entries, strict=True)
            ),
            modality=self.entry.modality,
            header={"first_file": vol.source_metadata, "files": len(listing)},
        )

    def _calibrate(self, vol: Volume) -> tuple[Volume, str]:
        """Fill axes the files leave uncalibrated from the entry's published voxel size."""
        scale, units = list(vol.scale), list(vol.units)
        from_source = False
        for i, a in enumerate(vol.axes):
            if a in "zyx" and (scale[i] is None or units[i] is None):
                scale[i], units[i] = self.entry.voxel_size_nm[a], "nanometer"
                from_source = True
        vol = dataclasses.replace(vol, scale=tuple(scale), units=tuple(units))
        return vol, "source" if from_source else "header"


def stack_slices(paths: list[Path]) -> Volume:
    """Open each file lazily and stack them in the given order: 2-D sections → z, 3-D blocks → along z."""
    vols = [open_volume(p) for p in paths]
    first = vols[0]
    for p, v in zip(paths[1:], vols[1:], strict=True):
        if v.data.shape != first.data.shape or v.data.dtype != first.data.dtype or v.axes != first.axes:
            raise FormatError(
                f"{p}: {v.data.shape} {v.data.dtype} axes {''.join(v.axes)} does not match the first slice "
                f"{paths[0].name} ({first.data.shape} {first.data.dtype} axes {''.join(first.axes)}); "
                "an EMPIAR volume must be sections of one size and type"
            )
    if len(vols) == 1:
        return first
    if first.axes == ("y", "x"):
        data = da.stack([v.data for v in vols])
        return Volume(
            data=data,
            axes=("z", "y", "x"),
            scale=(None, *first.scale),
            units=(None, *first.units),
            format=first.format,
            source_files=tuple(paths),
            source_metadata=first.source_metadata,
        )
    if first.axes == ("z", "y", "x"):
        z = first.axes.index("z")
        return dataclasses.replace(
            first, data=da.concatenate([v.data for v in vols], axis=z), source_files=tuple(paths)
        )
    raise FormatError(f"{paths[0]}: cannot stack files with axes {''.join(first.axes)} into one volume")
