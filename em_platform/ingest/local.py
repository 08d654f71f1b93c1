"""Ingest of one inbox entry: checksum → pending → processing → OME-Zarr → saving-data → complete.

Nothing is published until the image is complete (it is written under a staging name and published
in one step), a failure leaves a failed record with its error and retry count, and an entry whose
bytes have not changed since its last complete ingest is not converted again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.records import ome_zarr_block
from em_platform.catalog.status import Status
from em_platform.formats import open_volume
from em_platform.ingest.checksum import combined_sha256, describe_files
from em_platform.ingest.convert import convert_volume, resolve_voxel_size
from em_platform.ingest.inbox import entry_files
from em_platform.storage import DataStore

SOURCE = "local"

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """An inbox entry could not be ingested; its catalog record is 'failed' with this message."""


@dataclass(frozen=True)
class IngestResult:
    record: dict[str, Any]
    volume_url: str
    thumbnail_url: str
    thumbnail_png: bytes
    converted: bool  # False when the entry was unchanged and its earlier output still stands


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
    logger: logging.Logger = log,
) -> IngestResult:
    """Convert one inbox entry to a published OME-Zarr image with a complete catalog record.

    ``dask_client`` is called only if there is pixel work to do (an unchanged entry starts no cluster).
    """
    key = entry_path.name
    name = output_name(key)
    volume_path = store.path("ingest", SOURCE, f"{name}.ome.zarr")
    thumb_path = store.path("ingest", SOURCE, f"{name}.thumbnail.png")
    if not entry_path.exists():
        raise IngestError(f"{entry_path}: no such file or folder in the inbox (was it moved or deleted?)")

    files = describe_files(entry_files(entry_path), inbox)  # 1. checksum
    logger.info("checksummed %d file(s) of %s: %s", len(files), key, combined_sha256(files)[:16])
    previous = catalog.find(SOURCE, key)
    if (
        previous
        and previous["status"] == Status.COMPLETE
        and previous["files"]["source"] == files
        and store.exists(volume_path)
    ):
        logger.info(
            "%s is unchanged since its last complete ingest; keeping %s", key, previous["files"]["volume"]
        )
        with store.fs.open(thumb_path, "rb") as f:
            png = f.read()
        return IngestResult(
            previous, store.to_url(volume_path), store.to_url(thumb_path), png, converted=False
        )

    run_id = lineage.get("run_id")
    record = catalog.begin(
        SOURCE, key, description=f"{key} from the local inbox", files=files, run_id=run_id
    )  # 2.
    rid = record["id"]
    staging = store.staging_path(volume_path)
    try:
        catalog.transition(rid, Status.PROCESSING, run_id=run_id)  # 3.
        vol = open_volume(entry_path)
        voxel_nm, voxel_source, units = resolve_voxel_size(vol)
        if voxel_source == "assumed":
            logger.warning(
                "%s records no physical size for every axis; assuming %s nm (flagged 'assumed')",
                key,
                voxel_nm,
            )
        logger.info(
            "converting %s: %s %s, axes %s, voxel %s nm",
            key,
            vol.data.shape,
            vol.data.dtype,
            vol.axes,
            voxel_nm,
        )
        converted = convert_volume(  # 4.
            vol,
            voxel_nm,
            store.to_url(staging),
            storage_options=_opts(store),
            name=key,
            dask_client=dask_client,
        )
        info, png = converted.info, converted.thumbnail_png
        core = {
            "volume_shape": [int(s) for s in vol.data.shape],
            "axes": list(vol.axes),
            "voxel_size_nm": voxel_nm,
            "voxel_size_source": voxel_source,
            "data_type": vol.data.dtype.name,
        }
        if units:
            core["units"] = units
        catalog.transition(rid, Status.SAVING_DATA, update={"metadata": {"core": core}}, run_id=run_id)  # 5.
        store.write_bytes(thumb_path, png)
        store.publish(staging, volume_path)
        record = catalog.transition(  # 6.
            rid,
            Status.COMPLETE,
            run_id=run_id,
            update={
                "metadata": {
                    "technical": converted.technical(vol, files, voxel_nm, vol.source_metadata),
                    "provenance": {
                        "processing_pipeline": "em_platform ingest/local",
                        "internal_zarr_path": "0",
                    },
                    "ome_zarr": ome_zarr_block(info, store.to_url(volume_path)),
                },
                "files": {"volume": store.to_url(volume_path), "thumbnail": store.to_url(thumb_path)},
                "lineage": {k: v for k, v in lineage.items() if v is not None or k == "partition_key"},
            },
        )
        return IngestResult(record, store.to_url(volume_path), store.to_url(thumb_path), png, converted=True)
    except BaseException as exc:
        store.remove(staging)
        catalog.transition(rid, Status.FAILED, error=exc, run_id=run_id)
        if isinstance(exc, Exception):
            raise IngestError(f"ingest of {key} failed: {exc}") from exc
        raise


def _opts(store: DataStore) -> dict | None:
    return store.storage_options or None if not store.is_local else None
