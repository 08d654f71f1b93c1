"""Ingest of one inbox entry: checksum → pending → processing → OME-Zarr → saving-data → complete.

The lifecycle is :mod:`em_platform.ingest.lifecycle`'s; an entry whose bytes have not changed since its
last complete ingest is not converted again. A file is one image. A folder of TIFF slices of one size is
one stack (as before); any other folder (micrographs in MRC/DM/TIFF, slices of different sizes, a folder
named ``*.collection``) is a collection: one image per file in one OME-Zarr container.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from em_platform.catalog.db import CatalogDB
from em_platform.formats import Volume, open_volume
from em_platform.formats.image_set import Arrangement, arrange_images
from em_platform.ingest.convert import (
    CollectionMember,
    Converted,
    ConvertedCollection,
    convert_collection,
    convert_volume,
    resolve_voxel_size,
)
from em_platform.ingest.inbox import checked_entry_files, folder_images, is_section_stack
from em_platform.ingest.lifecycle import IngestAttempt, IngestError, IngestResult
from em_platform.storage import DataStore
from em_platform.storage.checksums import combined_sha256, describe_files

SOURCE = "local"

log = logging.getLogger(__name__)

__all__ = ["IngestError", "IngestResult", "ingest_entry", "output_name"]


def output_name(key: str) -> str:
    """A file-system-safe name for an entry's outputs."""
    stem = re.sub(r"\.(ome\.)?(tiff?|mrcs?|map|rec|st|ali|dm[34]|raw|bin)$", "", key, flags=re.I)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "dataset"


def ingest_entry(
    entry_path: Path,
    inbox: Path,
    *,
    store: DataStore,
    catalog: CatalogDB,
    lineage: dict[str, Any],
    dask_client: Callable[[], Any] | None = None,
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> IngestResult:
    """Convert one inbox entry to a published OME-Zarr image with a complete catalog record.

    ``dask_client`` is called only if there is pixel work to do (an unchanged entry starts no cluster).
    An entry that fails the edge checks (a symlink out of the inbox) raises
    :class:`~em_platform.edge.Refused` before anything is read or recorded.
    """
    key = entry_path.name
    attempt = IngestAttempt(
        store=store,
        catalog=catalog,
        source=SOURCE,
        source_id=key,
        name=output_name(key),
        lineage=lineage,
        logger=logger,
    )
    if not entry_path.exists():
        raise IngestError(f"{entry_path}: no such file or folder in the inbox (was it moved or deleted?)")

    # 1. the edge checks again (the entry may have changed since the sensor saw it), then checksum
    files = describe_files(checked_entry_files(entry_path, inbox), inbox)
    logger.info("checksummed %d file(s) of %s: %s", len(files), key, combined_sha256(files)[:16])
    previous = attempt.previous()
    if attempt.still_published(previous) and previous["files"]["source"] == files:
        return attempt.kept(previous, "is unchanged since its last complete ingest")

    attempt.begin(description=f"{key} from the local inbox", files=files)  # 2. pending
    try:
        with attempt.failing_on_error():
            attempt.processing()  # 3.
            vol, arrangement = _open_entry(entry_path, inbox)
            written: Converted | ConvertedCollection
            if arrangement is not None and arrangement.kind == "collection":
                logger.info("%s", arrangement.rule)
                written = _convert_collection(
                    entry_path, inbox, arrangement.rule, attempt, dask_client, logger
                )
                header: dict[str, Any] = {"rule": arrangement.rule}
            else:
                assert vol is not None  # _open_entry opens the one image of whatever is not a collection
                written = _convert_image(key, vol, attempt, dask_client, logger)  # 4.
                header = vol.source_metadata
            record = attempt.complete(  # 5. saving-data → published → 6. complete
                written,
                provenance={"processing_pipeline": "em_platform ingest/local", "internal_zarr_path": "0"},
                header=header,
            )
    except Exception as exc:
        raise IngestError(f"ingest of {key} failed: {exc}", outage=attempt.outage) from exc
    return attempt.result(record, written)


def _open_entry(entry_path: Path, inbox: Path) -> tuple[Volume | None, Arrangement | None]:
    """A file is one image; a folder is a stack of sections or a collection (formats.image_set's rule)."""
    if not entry_path.is_dir():
        return open_volume(entry_path), None
    files = folder_images(entry_path)
    vols = [open_volume(f) for f in files]
    arrangement = arrange_images(
        files, vols, sections=is_section_stack(entry_path, files), what=f"{entry_path.name} (inbox folder)"
    )
    if arrangement.kind == "volume":  # the folder-stack reader also takes the z spacing of the first slice
        return open_volume(entry_path) if len(files) > 1 else vols[0], arrangement
    return None, arrangement


def _convert_image(key, vol: Volume, attempt: IngestAttempt, dask_client, logger) -> Converted:
    calibration = resolve_voxel_size(vol)
    if calibration.assumed_axes:
        logger.warning(
            "%s records no physical size along %s; assuming %s nm (flagged 'assumed')",
            key,
            ", ".join(calibration.assumed_axes),
            calibration.voxel_nm,
        )
    logger.info(
        "converting %s: %s %s, axes %s, voxel %s nm",
        key,
        vol.data.shape,
        vol.data.dtype,
        vol.axes,
        calibration.voxel_nm,
    )
    return convert_volume(
        vol,
        calibration,
        attempt.staging_url,
        storage_options=attempt.storage_options,
        name=key,
        dask_client=dask_client,
    )


def _convert_collection(
    folder: Path, inbox: Path, rule: str, attempt: IngestAttempt, dask_client, logger
) -> ConvertedCollection:
    members = []
    for f in folder_images(folder):
        vol = open_volume(f)
        members.append(CollectionMember(f.name, str(f.relative_to(inbox)), vol, resolve_voxel_size(vol)))
    return convert_collection(
        members,
        attempt.staging_url,
        rule=rule,
        storage_options=attempt.storage_options,
        dask_client=dask_client,
        on_image=lambda i, m: logger.info(
            "converting %s image %d of %d: %s %s, voxel %s nm (%s)",
            folder.name,
            i + 1,
            len(members),
            m.volume.data.shape,
            m.volume.data.dtype,
            m.calibration.voxel_nm,
            m.calibration.source,
        ),
    )
