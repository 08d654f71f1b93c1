"""EBI EMPIAR entries: metadata from the EMPIAR REST API, image files from the EMPIAR archive.

The archive's ``data/`` folder is read over FTP (NLST + RETR, as macroscope did) or over its HTTPS mirror
(the Apache index page), one folder deeper when the imageset's ``directory`` names a sub-folder. Every
image file is downloaded resumably. The entry becomes one volume or a collection of images by the rule
of :mod:`em_platform.formats.image_set`: sections of a volume-EM technique (SBF-SEM, FIB-SEM, serial
sections) of one size are stacked lazily in natural name order (``slice_2`` before ``slice_10``);
single-particle micrographs, movies (frames as time) and files of different sizes are one image each.
In-plane voxel size comes from the files' calibration, else the imageset's pixel size; a section
thickness only from the dataset's published value, else it is flagged 'assumed'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import requests

from em_platform.edge import inside
from em_platform.formats import Volume, open_volume
from em_platform.formats.image_set import (
    arrange_images,
    frames_as_time,
    images_movies,
    images_sections,
    natural_key,
)
from em_platform.sources.bounds import read_limited
from em_platform.sources.dataset import (
    FetchedCollection,
    FetchedImage,
    FetchedVolume,
    RemoteVersion,
    Source,
    SourceFile,
)
from em_platform.sources.download import (
    USER_AGENT,
    DownloadOptions,
    download,
    get_json,
    list_ftp,
    stat_remote,
)
from em_platform.sources.endpoints import check_retries, check_url
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.progress import Progress
from em_platform.sources.retry import PermanentSourceError, RetryPolicy, http_error, retrying

Logger = logging.Logger | logging.LoggerAdapter

IMAGE_SUFFIXES = (".dm3", ".dm4", ".mrc", ".mrcs", ".map", ".rec", ".st", ".ali", ".tif", ".tiff")


@dataclass(frozen=True)
class EmpiarDataset:
    """One EMPIAR entry as published, for what the entry JSON does not say (section thickness)."""

    entry_id: str
    title: str
    technique: str  # the entry's experiment_type, e.g. "SBF-SEM"
    slices: int
    # the published section thickness of a volume entry; None: nobody says, and z is flagged 'assumed'
    section_thickness_nm: float | None = None


DATASETS: dict[str, EmpiarDataset] = {
    # Zebrafish retina, SBF-SEM: 16 DM3 sections of 5628 x 5632 px, 8 nm/px, 50 nm sections; 1.2 GB.
    "11759": EmpiarDataset(
        entry_id="11759",
        title="Developing retina in zebrafish 55 hpf larval eye",
        technique="SBF-SEM",
        slices=16,
        section_thickness_nm=50.0,
    ),
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
        check_url("api_url", self.api_url, ("http", "https"), "entry_id")
        check_url("archive_ftp", self.archive_ftp, ("ftp",), "entry_id")
        check_url("archive_https", self.archive_https, ("http", "https"), "entry_id")
        if self.transport not in ("ftp", "https"):
            raise ValueError(f"transport must be 'ftp' or 'https', not {self.transport!r}")
        if not 1 <= self.parallel <= 16:
            raise ValueError(f"parallel must be between 1 and 16, not {self.parallel}")
        check_retries(self.retry_attempts, self.retry_base_delay_s)

    def options(self) -> DownloadOptions:
        # Sections are tens of MB: files go in parallel, each in one stream.
        policy = RetryPolicy(attempts=self.retry_attempts, base_delay_s=self.retry_base_delay_s)
        return DownloadOptions(policy=policy, parallel=1)


def make_source(key: str, endpoints: EmpiarEndpoints | None = None) -> EmpiarSource:
    if key not in DATASETS:
        raise ValueError(f"unknown EMPIAR entry {key!r}; known: {', '.join(sorted(DATASETS))}")
    endpoints = endpoints or EmpiarEndpoints()
    endpoints.validate()
    return EmpiarSource(DATASETS[key], endpoints)


def modality_of(technique: str | None) -> str:
    """The catalog modality for an EMPIAR experiment type or imageset category."""
    t = (technique or "").upper().replace(" ", "-")
    if "FIB" in t:
        return "FIB-SEM"
    if "SBF" in t or "SBEM" in t or "BLOCK-FACE" in t or "ATUM" in t or t == "SEM":
        return "SEM"
    return "EM"


class _IndexLinks(HTMLParser):
    """The entries of an Apache-style index page: relative links, minus sorting and parent links."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href") if tag == "a" else None
        if href and not href.startswith(("?", "/", "#", "../")) and "://" not in href:
            self.names.append(unquote(href).rstrip("/"))


class EmpiarSource(Source):
    name = "empiar"

    def __init__(self, dataset: EmpiarDataset, endpoints: EmpiarEndpoints):
        self.dataset = dataset
        self.endpoints = endpoints
        self.api_url = endpoints.api_url.format(entry_id=dataset.entry_id)
        base = endpoints.archive_ftp if endpoints.transport == "ftp" else endpoints.archive_https
        self.archive_url = base.format(entry_id=dataset.entry_id).rstrip("/") + "/"

    @property
    def source_id(self) -> str:
        return self.dataset.entry_id

    @property
    def accession(self) -> str:
        return f"EMPIAR-{self.dataset.entry_id}"

    # -- the entry and its files --------------------------------------------------------------------

    def entry(self, logger: Logger) -> dict[str, Any]:
        """The entry JSON (the object under ``"EMPIAR-<id>"``)."""
        doc = get_json(self.api_url, options=self.endpoints.options(), logger=logger)
        entry = doc.get(self.accession) if isinstance(doc, dict) else None
        if not isinstance(entry, dict):
            keys = ", ".join(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
            raise PermanentSourceError(
                f"{self.api_url} did not answer the {self.accession} entry (got {keys}); "
                "check api_url and the entry id",
                url=self.api_url,
            )
        return entry

    def _list(self, folder_url: str, logger: Logger) -> list[str]:
        opts = self.endpoints.options()
        if self.endpoints.transport == "ftp":
            return list_ftp(folder_url, options=opts, logger=logger)

        def index() -> list[str]:
            headers = {"User-Agent": USER_AGENT}
            with requests.get(folder_url, timeout=opts.timeout_s, headers=headers, stream=True) as r:
                if r.status_code >= 400:
                    raise http_error(r.status_code, folder_url, r.reason)
                page = read_limited(r, folder_url, field="index page").decode(
                    r.encoding or "utf-8", "replace"
                )
            parser = _IndexLinks()
            parser.feed(page)
            return sorted(set(parser.names))

        return retrying(index, what=f"list {folder_url}", policy=opts.policy, logger=logger)

    def image_files(self, entry: dict[str, Any], logger: Logger) -> list[tuple[str, str]]:
        """(path under data/, URL) of every image file, in slice order.

        Files directly in ``data/`` are taken when there are any; otherwise the folder named by the
        imageset's ``directory`` (relative to the entry, e.g. ``data/Sections``) is listed.
        """
        folders = [""]
        for imageset in entry.get("imagesets") or []:
            sub = str(imageset.get("directory") or "").strip("/")
            sub = sub[len("data") :].strip("/") if sub == "data" or sub.startswith("data/") else sub
            if sub and sub not in folders:
                folders.append(sub)
        for sub in folders:
            folder_url = self.archive_url + (quote(sub) + "/" if sub else "")
            names = [n for n in self._list(folder_url, logger) if n.lower().endswith(IMAGE_SUFFIXES)]
            if names:
                names.sort(key=natural_key)
                return [(f"{sub}/{n}" if sub else n, folder_url + quote(n)) for n in names]
        raise PermanentSourceError(
            f"{self.archive_url}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the entry's data folder "
            f"or its imageset folders {folders[1:]}; check the entry id and the archive URL",
            url=self.archive_url,
        )

    # -- Source -------------------------------------------------------------------------------------

    def check(self, logger: Logger) -> RemoteVersion:
        entry = self.entry(logger)
        files = self.image_files(entry, logger)
        opts = self.endpoints.options()
        with ThreadPoolExecutor(
            max_workers=self.endpoints.parallel, thread_name_prefix="empiar-stat"
        ) as pool:
            sizes = list(pool.map(lambda f: stat_remote(f[1], options=opts, logger=logger).size_bytes, files))
        listing = [{"path": p, "url": u, "size_bytes": s} for (p, u), s in zip(files, sizes, strict=True)]
        dates = {k: entry.get(k) for k in ("deposition_date", "release_date", "update_date") if k in entry}
        fingerprint = hashlib.sha256(
            json.dumps({"dates": dates, "files": [[f["path"], f["size_bytes"]] for f in listing]}).encode()
        ).hexdigest()
        logger.info(
            "%s: %d image files, %s bytes, at %s",
            self.accession,
            len(listing),
            sum(s or 0 for s in sizes),
            self.archive_url,
        )
        return RemoteVersion(
            fingerprint=fingerprint,
            description=str(entry.get("title") or self.dataset.title),
            source_urls=(self.archive_url, self.api_url),
            # The entry JSON as EMPIAR publishes it, plus the archive listing this version stands for.
            additional_metadata={self.accession: entry, "archive_files": listing},
            total_bytes=None if None in sizes else sum(s or 0 for s in sizes),  # None: a size unknown
        )

    def fetch(
        self,
        workdir: Path,
        manifest: DownloadManifest,
        version: RemoteVersion,
        logger: Logger,
    ) -> FetchedVolume | FetchedCollection:
        entry = version.additional_metadata.get(self.accession) or {}
        listing = version.additional_metadata["archive_files"]
        opts = self.endpoints.options()
        progress = Progress(self.accession, version.total_bytes, logger)

        # The names come from the archive's listing (and the entry JSON's imageset folder): each must stay
        # in the download folder (em_platform.edge), whatever an index page or the API says.
        paths = [inside(workdir / "data", f["path"], field="archive file") for f in listing]

        def get(f: dict[str, Any], dest: Path):
            return download(
                f["url"],
                dest,
                manifest=manifest,
                key=f["path"],
                expected_size=f["size_bytes"],
                options=opts,
                progress=progress,
                logger=logger,
            )

        with ThreadPoolExecutor(max_workers=self.endpoints.parallel, thread_name_prefix="empiar") as pool:
            entries = list(pool.map(get, listing, paths))
        progress.finish()

        imageset = _imageset(entry)
        expected = _int(imageset.get("num_images_or_tilt_series"))
        if expected and expected != len(listing):
            logger.warning(
                "%s: the imageset lists %d images but the archive folder holds %d image files; "
                "ingesting the files found",
                self.accession,
                expected,
                len(listing),
            )
        technique = str(entry.get("experiment_type") or imageset.get("category") or self.dataset.technique)
        vols = [open_volume(p) for p in paths]  # each raises FormatError naming its file
        if images_movies(imageset.get("category")):
            vols = [frames_as_time(v) for v in vols]
        sections = images_sections(technique) or images_sections(imageset.get("category"))
        arrangement = arrange_images(paths, vols, sections=sections, what=f"{self.accession} ({technique})")
        files = tuple(
            SourceFile(f["path"], f["url"], e.size_bytes, e.sha256)
            for f, e in zip(listing, entries, strict=True)
        )
        header = {"files": len(listing), "imageset": imageset.get("name"), "technique": technique}
        if arrangement.kind == "collection":
            logger.info("%s", arrangement.rule)
            return FetchedCollection(
                images=tuple(
                    FetchedImage(f["path"], f["path"], *self._calibrate(v, imageset, logger, sections=False))
                    for f, v in zip(listing, vols, strict=True)
                ),
                files=files,
                rule=arrangement.rule,
                modality=modality_of(technique),
                header=header,
            )
        assert arrangement.volume is not None  # a "volume" arrangement carries its one image
        vol, axis_sources = self._calibrate(arrangement.volume, imageset, logger, sections=True)
        return FetchedVolume(
            volume=vol,
            voxel_size_source="header",
            voxel_size_sources=axis_sources,
            files=files,
            modality=modality_of(technique),
            header={"first_file": vol.source_metadata, **header},
        )

    def _calibrate(
        self, vol: Volume, imageset: dict[str, Any], logger: Logger, *, sections: bool
    ) -> tuple[Volume, dict[str, str]]:
        """Fill the axes the files leave uncalibrated: in-plane from the imageset's pixel size (Å), and a
        section thickness only from the dataset's published value; an axis nothing records stays
        uncalibrated (the ingest flags it 'assumed'). Returns the volume and where each axis's size came from."""
        published: dict[str, float] = {}
        for axis, key in (("x", "pixel_width"), ("y", "pixel_height")):
            angstrom = _float(imageset.get(key))
            if angstrom:
                published[axis] = angstrom / 10.0
        if sections and self.dataset.section_thickness_nm:
            published["z"] = self.dataset.section_thickness_nm
        scale, units = list(vol.scale), list(vol.units)
        sources = {
            a: "header" for a, s, u in zip(vol.axes, scale, units, strict=True) if a in "zyx" and s and u
        }
        filled = []
        for i, axis in enumerate(vol.axes):
            if axis in published and (scale[i] is None or units[i] is None):
                scale[i], units[i] = published[axis], "nanometer"
                sources[axis] = "source"
                filled.append(axis)
        if filled:
            logger.info(
                "%s: voxel size along %s from the published entry (%s nm); the files do not record it",
                self.accession,
                ", ".join(filled),
                ", ".join(f"{a}={published[a]:g}" for a in filled),
            )
        return dataclasses.replace(vol, scale=tuple(scale), units=tuple(units)), sources


def _imageset(entry: dict[str, Any]) -> dict[str, Any]:
    sets = [s for s in entry.get("imagesets") or [] if isinstance(s, dict)]
    return sets[0] if sets else {}


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _int(value: Any) -> int | None:
    f = _float(value)
    return int(f) if f else None
