"""IDR (Image Data Resource) images: metadata from IDR's OMERO JSON API, the file from EBI's IDR archive.

The file is read over FTP (as macroscope did); when FTP refuses it or stays down after retries, the same
archive is read over HTTPS instead. (IDR's ``webclient/render_image_download/{id}/`` is no substitute: it
serves one rendered 8-bit plane, not the volume.) Physical sizes come from the file's OME-XML ("header"),
else from the API's Pixels ("source"); the API's Pixels block is checked against the file, so a wrong
file name or a changed image is caught before conversion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from em_platform.formats import FormatError, Volume
from em_platform.formats.tiff import read_tiff
from em_platform.sources.dataset import FetchedVolume, RemoteVersion, Source, SourceFile
from em_platform.sources.download import DownloadOptions, RemoteFile, download, get_json, stat_remote
from em_platform.sources.endpoints import check_retries, check_url
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.progress import Progress
from em_platform.sources.retry import PermanentSourceError, RetryPolicy, SourceError

Logger = logging.Logger | logging.LoggerAdapter


@dataclass(frozen=True)
class IdrImage:
    image_id: int
    study: str
    archive_folder: str  # under the archive base: where the study keeps the file
    file_name: str  # the file in that folder (the API's Name need not be a file name)
    title: str
    shape_zyx: tuple[int, int, int]  # as published; the API's Pixels are checked against the file
    voxel_size_nm: dict[str, float]  # used only for axes neither the file nor the API calibrate
    modality: str = "FIB-SEM"


DATASETS: dict[str, IdrImage] = {
    # Miron et al., U2OS chromatin by FIB-SEM, 20 nm isotropic: 184 x 775 x 1121 uint8, 159.9 MB.
    "idr0086-9846137": IdrImage(
        image_id=9846137,
        study="idr0086",
        archive_folder="idr0086-miron-micrographs/20200610-ftp/experimentD/Miron_FIB-SEM/Miron_FIB-SEM_processed/",
        file_name="Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xy.tif",
        title="Figure_S3B_FIB-SEM_U2OS",
        shape_zyx=(184, 775, 1121),
        voxel_size_nm={"z": 20.0, "y": 20.0, "x": 20.0},
    ),
}


@dataclass(frozen=True)
class IdrEndpoints:
    api_url: str = "https://idr.openmicroscopy.org/api/v0/m/images/{image_id}/"
    archive_ftp: str = "ftp://ftp.ebi.ac.uk/pub/databases/IDR/"
    archive_https: str = "https://ftp.ebi.ac.uk/pub/databases/IDR/"  # the same archive, when FTP fails
    retry_attempts: int = 6
    retry_base_delay_s: float = 1.0

    def validate(self) -> None:
        check_url("api_url", self.api_url, ("http", "https"), "image_id")
        check_url("archive_ftp", self.archive_ftp, ("ftp",))
        check_url("archive_https", self.archive_https, ("http", "https"))
        check_retries(self.retry_attempts, self.retry_base_delay_s)

    def options(self) -> DownloadOptions:
        policy = RetryPolicy(attempts=self.retry_attempts, base_delay_s=self.retry_base_delay_s)
        return DownloadOptions(policy=policy)


def make_source(key: str, endpoints: IdrEndpoints | None = None) -> IdrSource:
    if key not in DATASETS:
        raise ValueError(f"unknown IDR dataset {key!r}; known: {', '.join(sorted(DATASETS))}")
    endpoints = endpoints or IdrEndpoints()
    endpoints.validate()
    return IdrSource(DATASETS[key], endpoints)


def _join(base: str, *parts: str) -> str:
    return base.rstrip("/") + "/" + "/".join(quote(p.strip("/")) for p in parts if p)


class IdrSource(Source):
    name = "idr"

    def __init__(self, image: IdrImage, endpoints: IdrEndpoints):
        self.image = image
        self.endpoints = endpoints
        self.api_url = endpoints.api_url.format(image_id=image.image_id)
        self.ftp_url = _join(endpoints.archive_ftp, image.archive_folder, image.file_name)
        self.https_url = _join(endpoints.archive_https, image.archive_folder, image.file_name)

    @property
    def source_id(self) -> str:
        return f"IDR-{self.image.image_id}"

    def image_json(self, logger: Logger) -> dict[str, Any]:
        """The API's ``data`` object for the image (Name, Pixels, ...)."""
        doc = get_json(self.api_url, options=self.endpoints.options(), logger=logger)
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("Pixels"), dict):
            raise PermanentSourceError(
                f"{self.api_url} did not answer an IDR image (no data.Pixels); check api_url and the image id",
                url=self.api_url,
            )
        return data

    def _stat(self, logger: Logger) -> RemoteFile:
        opts = self.endpoints.options()
        try:
            return stat_remote(self.ftp_url, options=opts, logger=logger)
        except SourceError as exc:
            logger.warning("IDR archive over FTP cannot say (%s); asking %s", exc, self.https_url)
            return stat_remote(self.https_url, options=opts, logger=logger)

    def check(self, logger: Logger) -> RemoteVersion:
        data = self.image_json(logger)
        remote = self._stat(logger)
        pixels = data["Pixels"]
        essentials = {k: v for k, v in pixels.items() if not k.startswith(("omero:", "@", "url:"))}
        fingerprint = hashlib.sha256(
            json.dumps(
                {
                    "id": data.get("@id"),
                    "name": data.get("Name"),
                    "pixels": essentials,
                    "size": remote.size_bytes,
                },
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()
        return RemoteVersion(
            fingerprint=fingerprint,
            description=f"{data.get('Name') or self.image.title} (IDR {self.image.study}, image {self.image.image_id})",
            source_urls=(self.ftp_url, self.https_url, self.api_url),
            additional_metadata={"idr_image": data, "archive_file": self.image.file_name},
            total_bytes=remote.size_bytes,
        )

    def fetch(
        self,
        workdir: Path,
        manifest: DownloadManifest,
        version: RemoteVersion,
        logger: Logger,
    ) -> FetchedVolume:
        data = version.additional_metadata["idr_image"]
        dest = workdir / self.image.file_name
        entry = self._download(dest, manifest, version.total_bytes, logger)
        vol = read_tiff(dest)
        check_against_api(vol, data["Pixels"], dest, self.api_url)
        vol, voxel_source = self._calibrate(vol, data["Pixels"], logger)
        return FetchedVolume(
            volume=vol,
            voxel_size_source=voxel_source,
            files=(SourceFile(self.image.file_name, entry.url, entry.size_bytes, entry.sha256),),
            modality=self.image.modality,
            header={"tiff": vol.source_metadata, "idr_name": data.get("Name")},
        )

    def _download(self, dest: Path, manifest: DownloadManifest, size: int | None, logger: Logger):
        urls = [self.ftp_url, self.https_url]
        done = manifest.get(dest.name)
        if done and done.url in urls:  # a re-run keeps to the transport that finished the file
            urls.remove(done.url)
            urls.insert(0, done.url)
        opts = self.endpoints.options()
        for i, url in enumerate(urls):
            progress = Progress(f"IDR image {self.image.image_id}", size, logger)
            try:
                entry = download(
                    url,
                    dest,
                    manifest=manifest,
                    expected_size=size,
                    options=opts,
                    progress=progress,
                    logger=logger,
                )
            except SourceError as exc:
                if i == len(urls) - 1:
                    raise
                logger.warning(
                    "IDR download from %s failed (%s); downloading %s instead", url, exc, urls[i + 1]
                )
                continue
            progress.finish()
            return entry
        raise AssertionError("unreachable")

    def _calibrate(self, vol: Volume, pixels: dict[str, Any], logger: Logger) -> tuple[Volume, str]:
        """Axes the file leaves uncalibrated take the API's PhysicalSize, else the published voxel size."""
        scale, units = list(vol.scale), list(vol.units)
        filled = []
        for i, axis in enumerate(vol.axes):
            if axis not in "zyx" or (scale[i] is not None and units[i] is not None):
                continue
            size = pixels.get(f"PhysicalSize{axis.upper()}")
            nm = _nanometres(size) if isinstance(size, dict) else None
            scale[i], units[i] = (nm if nm else self.image.voxel_size_nm[axis]), "nanometer"
            filled.append(axis)
        if not filled:
            return vol, "header"
        logger.info(
            "IDR image %s: voxel size along %s from the API/published values", self.image.image_id, filled
        )
        return dataclasses.replace(vol, scale=tuple(scale), units=tuple(units)), "source"


_UNIT_NM = {"ANGSTROM": 0.1, "NANOMETER": 1.0, "MICROMETER": 1000.0, "MILLIMETER": 1e6}


def _nanometres(size: dict[str, Any]) -> float | None:
    factor = _UNIT_NM.get(str(size.get("Unit", "")).upper())
    try:
        value = float(size["Value"])
    except (KeyError, TypeError, ValueError):
        return None
    return value * factor if factor and value > 0 else None


def check_against_api(vol: Volume, pixels: dict[str, Any], path: Path, api_url: str) -> None:
    """Refuse a file whose shape or pixel type differs from what the API says the image is."""
    sizes = dict(zip(vol.axes, vol.data.shape, strict=True))
    got = tuple(int(sizes.get(a, 1)) for a in "tczyx")
    try:
        expected = tuple(int(pixels.get(f"Size{a.upper()}", 1)) for a in "tczyx")
    except (TypeError, ValueError):
        raise PermanentSourceError(
            f"{api_url}: Pixels sizes are not integers ({pixels})", url=api_url
        ) from None
    dtype = (pixels.get("Type") or {}).get("value")
    problems = []
    if got != expected:
        problems.append(f"shape t,c,z,y,x {got} but the API says {expected}")
    if dtype and dtype != vol.data.dtype.name:
        problems.append(f"pixel type {vol.data.dtype.name} but the API says {dtype}")
    if problems:
        raise FormatError(
            f"{path}: {'; '.join(problems)} ({api_url}); the archive file is not the image the API describes — "
            "check the dataset's archive_folder and file_name"
        )
