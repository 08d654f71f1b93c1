"""One public dataset: check the source → (unchanged? done) → download resumably → OME-Zarr → catalog.

The record goes pending → processing → saving-data → complete, or failed with the error (naming the URL
or file) and its retry count. The image is written under a staging name and published in one step, so a
failed or killed run never leaves half an image where readers look; the download folder and its manifest
survive a failure, so the next run resumes instead of starting over. A dataset whose source fingerprint is
the one of its last complete ingest is not fetched again (the scheduled re-check relies on this).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.records import jsonable, ome_zarr_block
from em_platform.catalog.status import Status
from em_platform.ingest.convert import convert_volume
from em_platform.sources.dataset import FetchedVolume, RemoteVersion, Source
from em_platform.sources.manifest import MANIFEST_NAME, DownloadManifest
from em_platform.storage import DataStore

log = logging.getLogger(__name__)


class PublicIngestError(RuntimeError):
    """A public dataset could not be ingested; its catalog record says why (status 'failed')."""


@dataclass(frozen=True)
class PublicIngestResult:
    record: dict[str, Any]
    volume_url: str
    thumbnail_png: bytes | None  # None when nothing was converted
    converted: bool  # False: the source had not changed since the last complete ingest
    transfer_bytes_per_s: float | None = None


def dataset_name(source_id: str) -> str:
    """A file-system-safe name for a dataset's outputs and download folder."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source_id).strip("._") or "dataset"


def _clear_download_folder(folder: Path) -> None:
    """Remove what an earlier attempt downloaded for a different version of the source."""
    for child in folder.iterdir():
        if child.name == MANIFEST_NAME:
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def ingest_public_dataset(
    source: Source,
    *,
    store: DataStore,
    catalog: CatalogDB,
    downloads: Path,
    lineage: dict[str, Any],
    dask_client: Callable[[], Any] | None = None,
    keep_downloads: bool = False,
    force: bool = False,
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> PublicIngestResult:
    """Bring one dataset of a public source into the store as OME-Zarr with a complete catalog record."""
    name = dataset_name(source.source_id)
    volume_path = store.path("ingest", source.name, f"{name}.ome.zarr")
    thumb_path = store.path("ingest", source.name, f"{name}.thumbnail.png")
    run_id = lineage.get("run_id")
    previous = catalog.find(source.name, source.source_id)

    # 1. What does the source hold now? (cheap: API JSON, HEAD, array metadata)
    try:
        version = source.check(logger)
    except Exception as exc:
        if previous and previous["status"] == Status.COMPLETE:
            raise PublicIngestError(
                f"{source.name} {source.source_id}: cannot re-check the source ({exc}); the last complete "
                f"ingest ({previous['files']['volume']}) still stands"
            ) from exc
        rec = catalog.begin(
            source.name,
            source.source_id,
            description=f"{source.name} {source.source_id}",
            files=[],
            run_id=run_id,
        )
        catalog.transition(rec["id"], Status.FAILED, error=exc, run_id=run_id)
        raise PublicIngestError(f"{source.name} {source.source_id}: {exc}") from exc

    if (
        not force
        and previous
        and previous["status"] == Status.COMPLETE
        and previous["metadata"].get("provenance", {}).get("source_fingerprint") == version.fingerprint
        and store.exists(volume_path)
    ):
        logger.info(
            "%s %s is unchanged at the source (fingerprint %s); keeping %s",
            source.name,
            source.source_id,
            version.fingerprint[:16],
            previous["files"]["volume"],
        )
        return PublicIngestResult(previous, store.to_url(volume_path), None, converted=False)

    # 2. A new attempt: pending → processing.
    record = catalog.begin(
        source.name, source.source_id, description=version.description, files=[], run_id=run_id
    )
    rid = record["id"]
    staging = store.staging_path(volume_path)
    workdir = Path(downloads) / source.name / name
    try:
        catalog.transition(
            rid,
            Status.PROCESSING,
            run_id=run_id,
            update={
                "additional_metadata": jsonable(version.additional_metadata),
                "metadata": {"provenance": _provenance(version)},
            },
        )
        manifest = DownloadManifest(workdir, version.fingerprint)
        if manifest.reset_because:
            logger.warning("discarding the partial download in %s: %s", workdir, manifest.reset_because)
            _clear_download_folder(workdir)
        done = manifest.entries()
        if done:
            logger.info(
                "resuming %s %s: %d item(s) already downloaded and verified in %s",
                source.name,
                source.source_id,
                len(done),
                workdir,
            )
        fetched = source.fetch(workdir, manifest, version, logger)  # 3. download + verify
        record = _convert_and_publish(
            source,
            fetched,
            version,
            rid,
            store,
            catalog,
            staging,
            volume_path,
            thumb_path,
            lineage,
            dask_client,
            logger,
        )
    except BaseException as exc:
        store.remove(staging)
        catalog.transition(rid, Status.FAILED, error=exc, run_id=run_id)
        if isinstance(exc, Exception):
            raise PublicIngestError(
                f"{source.name} {source.source_id} failed ({type(exc).__name__}): {exc}; what was downloaded "
                f"and verified stays in {workdir}, so a re-run resumes"
            ) from exc
        raise
    if not keep_downloads:
        shutil.rmtree(workdir, ignore_errors=True)
    with store.fs.open(thumb_path, "rb") as f:
        png = f.read()
    return PublicIngestResult(record, store.to_url(volume_path), png, converted=True)


def _provenance(version: RemoteVersion) -> dict[str, Any]:
    out: dict[str, Any] = {
        "processing_pipeline": "em_platform ingest/public",
        "source_fingerprint": version.fingerprint,
    }
    if version.source_urls:
        out["source_urls"] = list(version.source_urls)
        out["download_url"] = version.source_urls[0]
    return out


def _convert_and_publish(
    source: Source,
    fetched: FetchedVolume,
    version: RemoteVersion,
    rid: str,
    store: DataStore,
    catalog: CatalogDB,
    staging: str,
    volume_path: str,
    thumb_path: str,
    lineage: dict[str, Any],
    dask_client: Callable[[], Any] | None,
    logger: logging.Logger | logging.LoggerAdapter,
) -> dict[str, Any]:
    vol = fetched.volume
    run_id = lineage.get("run_id")
    voxel_nm = {a: s for a, s in vol.voxel_size_nm().items() if s}
    missing = [a for a in vol.spatial_axes if a not in voxel_nm]
    if missing:
        raise ValueError(
            f"{source.name} {source.source_id}: no voxel size for axes {missing}; the source module must "
            "give every spatial axis a size (from the file, or the source's published value)"
        )
    logger.info(
        "converting %s %s to OME-Zarr: %s %s, axes %s, voxel %s nm",
        source.name,
        source.source_id,
        vol.data.shape,
        vol.data.dtype,
        "".join(vol.axes),
        voxel_nm,
    )
    converted = convert_volume(
        vol,
        voxel_nm,
        store.to_url(staging),
        storage_options=store.storage_options or None if not store.is_local else None,
        name=f"{source.name}/{source.source_id}",
        dask_client=dask_client,
    )
    units = {a: u for a, u in zip(vol.axes, vol.units, strict=True) if a in voxel_nm and u}
    core: dict[str, Any] = {
        "description": version.description,
        "volume_shape": [int(s) for s in vol.data.shape],
        "axes": list(vol.axes),
        "voxel_size_nm": voxel_nm,
        "voxel_size_source": fetched.voxel_size_source,
        "data_type": vol.data.dtype.name,
    }
    if units:
        core["units"] = units
    if fetched.modality:
        core["modality"] = fetched.modality
    files = [f.as_record() for f in fetched.files]
    catalog.transition(
        rid,
        Status.SAVING_DATA,
        run_id=run_id,
        update={"metadata": {"core": core}, "files": {"source": files}},
    )
    store.write_bytes(thumb_path, converted.thumbnail_png)
    store.publish(staging, volume_path)
    info = converted.info
    return catalog.transition(
        rid,
        Status.COMPLETE,
        run_id=run_id,
        update={
            "metadata": {
                "technical": converted.technical(vol, files, voxel_nm, fetched.header),
                "provenance": {"internal_zarr_path": info.levels[0].path},
                "ome_zarr": ome_zarr_block(info, store.to_url(volume_path)),
            },
            "files": {"volume": store.to_url(volume_path), "thumbnail": store.to_url(thumb_path)},
            "lineage": {k: v for k, v in lineage.items() if v is not None or k == "partition_key"},
        },
    )
