"""One public dataset: check the source → (unchanged? done) → download resumably → OME-Zarr → catalog.

The lifecycle is :mod:`em_platform.ingest.lifecycle`'s (pending → processing → saving-data → complete, or
failed with the error naming the URL or file and its retry count). The download folder and its manifest
survive a failure, so the next run resumes instead of starting over; a dataset whose source fingerprint
is the one of its last complete ingest is not fetched again (the scheduled re-check relies on this).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.records import jsonable
from em_platform.edge import Refused, inside
from em_platform.ingest.convert import (
    CollectionMember,
    convert_collection,
    convert_volume,
    resolve_voxel_size,
)
from em_platform.ingest.lifecycle import IngestAttempt, IngestError, IngestResult, safe_name
from em_platform.sources.arrival import DownloadCancelled
from em_platform.sources.dataset import FetchedCollection, FetchedVolume, RemoteVersion, Source
from em_platform.sources.manifest import MANIFEST_NAME, DownloadManifest
from em_platform.storage import DataStore

log = logging.getLogger(__name__)


class PublicIngestError(IngestError):
    """A public dataset could not be ingested; its catalog record says why (status 'failed')."""


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
) -> IngestResult:
    """Bring one dataset of a public source into the store as OME-Zarr with a complete catalog record."""
    name = safe_name(source.source_id)
    what = f"{source.name} {source.source_id}"
    attempt = IngestAttempt(
        store=store,
        catalog=catalog,
        source=source.name,
        source_id=source.source_id,
        name=name,
        lineage=lineage,
        logger=logger,
    )
    previous = attempt.previous()

    # 1. What does the source hold now? (cheap: API JSON, HEAD, array metadata)
    try:
        version = source.check(logger)
    except Exception as exc:
        if previous and previous["status"] == "complete":
            raise PublicIngestError(
                f"{what}: cannot re-check the source ({exc}); the last complete ingest "
                f"({previous['files']['volume']}) still stands"
            ) from exc
        attempt.failed_to_start(exc, description=what)
        raise PublicIngestError(f"{what}: {exc}") from exc

    fingerprint = (previous or {}).get("metadata", {}).get("provenance", {}).get("source_fingerprint")
    if not force and attempt.still_published(previous) and fingerprint == version.fingerprint:
        return attempt.kept(previous, f"is unchanged at the source (fingerprint {version.fingerprint[:16]})")

    # 2. A new attempt: pending → processing → download + verify → convert → saving-data → complete.
    try:
        workdir = inside(downloads, source.name, name, field="download folder")  # no symlink leads out
    except Refused as exc:
        raise PublicIngestError(f"{what}: {exc}") from exc
    attempt.begin(description=version.description, files=[])
    try:
        with attempt.failing_on_error():
            attempt.processing(
                update={
                    "additional_metadata": jsonable(version.additional_metadata),
                    "metadata": {"provenance": _provenance(version)},
                }
            )
            manifest = DownloadManifest(workdir, version.fingerprint)
            if manifest.reset_because:
                logger.warning("discarding the partial download in %s: %s", workdir, manifest.reset_because)
                _clear_download_folder(workdir)
            if done := manifest.entries():
                logger.info(
                    "resuming %s: %d item(s) already downloaded and verified in %s", what, len(done), workdir
                )
            fetched = source.fetch(workdir, manifest, version, logger)
            record, written = _convert_and_publish(attempt, fetched, what, dask_client, logger)
    except Exception as exc:
        raise PublicIngestError(
            f"{what} failed ({type(exc).__name__}): {exc}; what was downloaded and verified stays in "
            f"{workdir}, so a re-run resumes",
            outage=attempt.outage,
        ) from exc
    if not keep_downloads:
        shutil.rmtree(workdir, ignore_errors=True)
    return attempt.result(record, written)


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
    attempt: IngestAttempt,
    fetched: FetchedVolume | FetchedCollection,
    what: str,
    dask_client: Callable[[], Any] | None,
    logger: logging.Logger | logging.LoggerAdapter,
):
    if isinstance(fetched, FetchedCollection):
        images = fetched.images
        written = convert_collection(
            [
                CollectionMember(
                    im.name, im.source_file, im.volume, resolve_voxel_size(im.volume, im.voxel_size_sources)
                )
                for im in images
            ],
            attempt.staging_url,
            rule=fetched.rule,
            storage_options=attempt.storage_options,
            dask_client=dask_client,
            on_image=lambda i, m: logger.info(
                "converting %s image %d of %d, %s: %s %s, voxel %s nm (%s)",
                what,
                i + 1,
                len(images),
                m.name,
                m.volume.data.shape,
                m.volume.data.dtype,
                m.calibration.voxel_nm,
                m.calibration.sources,
            ),
        )
        record = attempt.complete(
            written,
            files=[f.as_record() for f in fetched.files],
            provenance={},
            header=fetched.header,
            modality=fetched.modality,
        )
        return record, written
    vol = fetched.volume
    calibration = resolve_voxel_size(vol, fetched.axis_sources())
    if calibration.assumed_axes:
        logger.warning(
            "%s: nothing records the voxel size along %s; assuming %s nm (flagged 'assumed')",
            what,
            ", ".join(calibration.assumed_axes),
            calibration.voxel_nm,
        )
    logger.info(
        "converting %s to OME-Zarr: %s %s, axes %s, voxel %s nm (%s)",
        what,
        vol.data.shape,
        vol.data.dtype,
        "".join(vol.axes),
        calibration.voxel_nm,
        calibration.sources,
    )

    def convert(volume, client, in_order=False):
        return convert_volume(
            volume,
            calibration,
            attempt.staging_url,
            storage_options=attempt.storage_options,
            name=what.replace(" ", "/", 1),
            dask_client=client,
            in_order=in_order,
        )

    finish, cancel = fetched.finish, fetched.cancel
    if finish is None:
        written = convert(vol, dask_client)
    else:
        # The bytes are still arriving: convert the planes in the order they arrive, in this process (its
        # reads wait on this download), then wait for the download's end and its verification before
        # anything is published.
        try:
            written = convert(vol, None, in_order=True)
        except Exception as exc:
            assert cancel is not None  # an arriving download sets both finish and cancel
            cancel()
            _raise_download_error_first(finish, exc)
            raise
        complete = finish()
        if complete.volume is not vol:  # the file broke the layout its first page promised
            vol = complete.volume
            calibration = resolve_voxel_size(vol, complete.axis_sources())
            written = convert(vol, dask_client)
        fetched = complete
    provenance = {"internal_zarr_path": written.info.levels[0].path}
    record = attempt.complete(
        written,
        files=[f.as_record() for f in fetched.files],
        provenance=provenance,
        header=fetched.header,
        modality=fetched.modality,
    )
    return record, written


def _raise_download_error_first(finish: Callable[[], FetchedVolume], conversion_error: Exception) -> None:
    """A conversion reading an arriving file fails when its download does (a checksum mismatch deletes the
    file): then the download's error is the one to report. A conversion that failed on its own returns."""
    try:
        finish()
    except DownloadCancelled:
        return
    except Exception as exc:
        raise exc from conversion_error
