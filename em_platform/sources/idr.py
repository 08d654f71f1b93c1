"""IDR (Image Data Resource) images: metadata from the IDR JSON API, the OME-TIFF from EBI's archive.

The archive is read over FTP (as macroscope did) and, when FTP refuses the file or stays down, over the
same archive's HTTPS mirror. Physical sizes come from the file's OME-XML ("header"); the API's Pixels
block is checked against the file, so a wrong file name or a changed image is caught before conversion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from em_platform.formats import FormatError
from em_platform.formats.tiff import read_tiff
from em_platform.formats.volume import normalise_unit
from em_platform.sources.dataset import FetchedVolume, RemoteVersion, Source, SourceFile
from em_platform.sources.download import DownloadOptions, download, get_json, stat_remote
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.progress import Progress
from em_platform.sources.retry import RetryPolicy, SourceError


@dataclass(frozen=True)
class IdrImage:
    image_id: int
    archive_folder: str  # under the archive base: where the study keeps its files
    modality: str = "FIB-SEM"


DATASETS = {
    "idr0086-9846137": IdrImage(
        image_id=9846137,
        archive_folder="idr0086-miron-micrographs/20200610-ftp/experimentD/Miron_FIB-SEM/Miron_FIB-SEM_processed/",
    ),
}


@dataclass(frozen=True)
class IdrEndpoints:
    api_url: str = "https://idr.openmicroscopy.org/api/v0/m/images/{image_id}/"
    archive_ftp: str = "ftp://ftp.ebi.ac.uk/pub/databases/IDR/"
    archive_https: str = "https://ftp.ebi.ac.uk/pub/databases/IDR/"  # fallback when FTP fails
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
        if "{image_id}" not in self.api_url:
            raise ValueError(f"api_url must contain '{{image_id}}', got {self.api_url!r}")
        if self.retry_attempts < 1 or self.retry_base_delay_s < 0:
            raise ValueError("retry_attempts must be ≥ 1 and retry_base_delay_s ≥ 0")

    def options(self) -> DownloadOptions:
        return DownloadOptions(
            policy=RetryPolicy(attempts=self.retry_attempts, base_delay_s=self.retry_base_delay_s), parallel=1
        )


def make_source(key: str, endpoints: IdrEndpoints | None = None) -> IdrSource:
    if key not in DATASETS:
        raise ValueError(f"unknown IDR dataset {key!r}; known: {', '.join(sorted(DATASETS))}")
    return IdrSource(key, DATASETS[key], endpoints or IdrEndpoints())


def _join(base: str, *parts: str) -> str:
    return base.rstrip("/") + "/" + "/".join(quote(p.strip("/")) for p in parts if p)


class IdrSource(Source):
    name = "idr"

    def __init__(self, key: str, image: IdrImage, endpoints: IdrEndpoints):
        self.key = key
        self.image = image
        self.endpoints = endpoints
        self.api_url = endpoints.api_url.format(image_id=image.image_id)

    @property
    def source_id(self) -> str:
        return f"IDR-{self.image.image_id}"

    def _file_urls(self, file_name: str) -> tuple[str, str]:
        folder = self.image.archive_folder
        return (
            _join(self.endpoints.archive_ftp, folder, file_name),
            _join(self.endpoints.archive_https, folder, file_name),
        )

    def check(self, logger: logging.Logger | logging.LoggerAdapter) -> RemoteVersion:
        doc = get_json(self.api_url, options=self.endpoints.options(), logger=logger)
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, dict) or "Name" not in data or "Pixels" not in data:
            raise SourceError(
                f"{self.api_url} did not answer an IDR image (no data.Name / data.Pixels)", url=self.api_url
            )
        ftp_url, https_url = self._file_urls(data["Name"])
        try:
            remote = stat_remote(ftp_url, options=self.endpoints.options(), logger=logger)
        except SourceError as exc:
            logger.warning("IDR archive over FTP: %s; asking the HTTPS mirror", exc)
            remote = stat_remote(https_url, options=self.endpoints.options(), logger=logger)
        pixels = data["Pixels"]
        fingerprint = hashlib.sha256(
            json.dumps(
                {"name": data["Name"], "pixels": pixels, "file": remote.size_bytes}, sort_keys=True
            ).encode()
        ).hexdigest()
        return RemoteVersion(
            fingerprint=fingerprint,
            description=f"{data['Name']} (IDR image {self.image.image_id})",
            source_urls=(ftp_url, https_url, self.api_url),
            additional_metadata={"idr_image": data},
            total_bytes=remote.size_bytes,
        )

    def fetch(
        self,
        workdir: Path,
        manifest: DownloadManifest,
        version: RemoteVersion,
        logger: logging.Logger | logging.LoggerAdapter,
    ) -> FetchedVolume:
        data = version.additional_metadata["idr_image"]
        name = data["Name"]
        ftp_url, https_url = self._file_urls(name)
        progress = Progress(f"IDR {self.image.image_id}", version.total_bytes, logger)
        try:
            entry = download(
                ftp_url,
                workdir / name,
                manifest=manifest,
                expected_size=version.total_bytes,
                options=self.endpoints.options(),
                progress=progress,
                logger=logger,
            )
            url = ftp_url
        except SourceError as exc:
            logger.warning("IDR archive over FTP failed (%s); downloading %s instead", exc, https_url)
            progress = Progress(f"IDR {self.image.image_id} (HTTPS)", version.total_bytes, logger)
            entry = download(
                https_url,
                workdir / name,
                manifest=manifest,
                expected_size=version.total_bytes,
                options=self.endpoints.options(),
                progress=progress,
                logger=logger,
            )
            url = https_url
        progress.finish()
        vol = read_tiff(workdir / name)
        _check_against_api(vol, data["Pixels"], workdir / name, self.api_url)
        voxel_source = "header"
        if not vol.calibrated:
            vol, voxel_source = _api_physical_sizes(vol, data["Pixels"]), "source"
        return FetchedVolume(
            volume=vol,
            voxel_size_source=voxel_source,
            files=(SourceFile(name, url, entry.size_bytes, entry.sha256),),
            modality=self.image.modality,
            header={"tiff": vol.source_metadata},
        )


def _check_against_api(vol, pixels: dict[str, Any], path: Path, api_url: str) -> None:
    sizes = dict(zip(vol.axes, vol.data.shape, strict=True))
    expected = {a: int(pixels.get(f"Size{a.upper()}", 1)) for a in "zyx"}
    got = {a: int(sizes.get(a, 1)) for a in "zyx"}
    dtype = (pixels.get("Type") or {}).get("value")
    problems = []
    if got != expected:
        problems.append(f"shape z,y,x {tuple(got.values())} but the API says {tuple(expected.values())}")
    if dtype and dtype != vol.data.dtype.name:
        problems.append(f"dtype {vol.data.dtype.name} but the API says {dtype}")
    if problems:
        raise FormatError(
            f"{path}: {'; '.join(problems)} ({api_url}); the archive file is not the image the API describes — "
            "check the dataset's archive_folder"
        )


_OME_UNITS = {
    "MICROMETER": "micrometer",
    "NANOMETER": "nanometer",
    "ANGSTROM": "angstrom",
    "MILLIMETER": "millimeter",
}


def _api_physical_sizes(vol, pixels: dict[str, Any]):
    scale, units = list(vol.scale), list(vol.units)
    for i, a in enumerate(vol.axes):
        size = pixels.get(f"PhysicalSize{a.upper()}") if a in "zyx" else None
        if size and scale[i] is None:
            unit = _OME_UNITS.get(str(size.get("Unit", "")).upper()) or normalise_unit(size.get("Symbol"))
            if unit:
                scale[i], units[i] = float(size["Value"]), unit
    return dataclasses.replace(vol, scale=tuple(scale), units=tuple(units))
