"""A finished montage, from the acquisition buffer to long-term storage, the TEM tile records and the catalog.

The buffer + aloha + TEM DB roles of the Allen system in one transaction-like sequence, each step safe to
repeat: the catalog record goes pending → processing → saving-data → complete (failed, with the error,
if anything goes wrong), moved by the one ingest lifecycle
(:class:`~em_platform.ingest.lifecycle.RecordLifecycle`); the buffer is uploaded object by object with
checksums, resuming what an earlier attempt finished (:mod:`em_platform.storage.upload`); the tile records
are replaced as a whole; and only when the storage root verifies against the upload manifest is the buffer
freed (if asked).

Dagster-free: the ``montage_upload`` asset calls :func:`archive_montage`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.records import ome_zarr_block
from em_platform.imaging.ome_zarr import MultiscaleInfo
from em_platform.ingest.lifecycle import RecordLifecycle
from em_platform.stitch.grid import array_name
from em_platform.storage.checksums import combined_sha256, describe_files
from em_platform.storage.upload import UploadProgress, UploadReport, free_buffer, upload_buffer
from em_platform.tem.buffer_layout import UPLOADED, MontageBuffer
from em_platform.tem.journal import MontageRow, TileRow
from em_platform.tem.tile_records import TileRecords, tile_records_from_journal

SOURCE = "acquisition"

log = logging.getLogger(__name__)

__all__ = ["ArchiveResult", "archive_montage"]


@dataclass(frozen=True)
class ArchiveResult:
    record: dict[str, Any]
    upload: UploadReport
    tile_records: int
    freed_bytes: int  # 0 when the buffer is kept


def _raw_files(tiles: list[TileRow]) -> list[dict[str, Any]]:
    """The camera's files (the record's ``files.source``), with their sha256, for those still on disk."""
    paths = [Path(t.path) for t in tiles if t.path and Path(t.path).is_file()]
    if not paths:
        return []
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return describe_files(paths, root)


def _write_json_atomic(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def archive_montage(
    montage: MontageRow,
    tiles: list[TileRow],
    buffer_dir: str | os.PathLike,
    dest_url: str,
    *,
    catalog: CatalogDB,
    tile_records: TileRecords,
    qc: Mapping[str, Any],
    pixel_size_nm: float,
    pixel_size_source: str,
    lineage: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None = None,
    free: bool = True,
    on_progress: Callable[[UploadProgress], None] | None = None,
) -> ArchiveResult:
    """Upload a montage's buffer folder (processed tiles, fused montage, layout) to ``dest_url``, record it.

    ``qc`` is the montage's QC summary (goes into the record's quality block); ``pixel_size_source`` is
    "header" (the scope's ``montage.complete``) or "config" (the configured calibration); ``lineage`` is
    the record's (``run_id``, ``asset_key``, ``partition_key``).
    """
    buffer = MontageBuffer(os.fspath(buffer_dir))
    montage_id = montage.montage_id
    _require_buffer(buffer, montage_id)
    tiles = [t for t in tiles if not t.is_reference]
    files = _source_files(tiles, buffer)
    lifecycle = RecordLifecycle(catalog, SOURCE, montage_id, run_id=lineage.get("run_id"))
    lifecycle.begin(description=f"TEM montage {montage_id} ({len(tiles)} tiles)", files=files)
    with lifecycle.failing_on_error():
        lifecycle.processing()
        archived = MontageBuffer(dest_url)  # the buffer folder's layout, where it will live
        fused = {**json.loads(Path(buffer.fused_info).read_text()), "url": archived.fused}
        layout = json.loads(Path(buffer.layout).read_text())
        _write_metadata(buffer, montage, pixel_size_nm, qc, layout, fused)
        lifecycle.saving_data()
        upload = upload_buffer(
            buffer_dir, dest_url, sources=UPLOADED, storage_options=storage_options, on_progress=on_progress
        )
        records = tile_records_from_journal(
            tiles, _tile_uris(tiles, archived), acquisition_id=montage.acquisition_id
        )
        tile_records.replace_montage(montage_id, records)
        record = lifecycle.complete(
            _complete_update(
                montage, tiles, files, archived, fused, layout, qc, pixel_size_nm, pixel_size_source, lineage
            )
        )
    freed = free_buffer(buffer_dir, dest_url, storage_options=storage_options) if free else 0
    return ArchiveResult(record, upload, len(records), freed)


def _require_buffer(buffer: MontageBuffer, montage_id: str) -> None:
    """Fail before any record is begun when the montage's own products are not in the buffer yet."""
    missing = [name for name, path in buffer.products().items() if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(
            f"montage {montage_id}: {', '.join(missing)} not in the buffer {buffer.folder}; materialize "
            "montage_layout and montage for this partition first"
        )


def _source_files(tiles: list[TileRow], buffer: MontageBuffer) -> list[dict[str, Any]]:
    """The record's source files: the camera's, or the processed tiles when the scope's buffer is gone."""
    files = _raw_files(tiles)
    if not files:  # the scope's buffer already gone: the processed tiles stand for the source
        processed = sorted(p for p in Path(buffer.processed_tiles).rglob("*") if p.is_file())
        files = describe_files(processed, Path(buffer.folder))
    return files


def _write_metadata(
    buffer: MontageBuffer,
    montage: MontageRow,
    pixel_size_nm: float,
    qc: Mapping[str, Any],
    layout: Mapping[str, Any],
    fused: Mapping[str, Any],
) -> None:
    """``metadata.json`` beside the products, so the archived folder describes itself without the catalog."""
    _write_json_atomic(
        Path(buffer.metadata),
        {
            "montage_id": montage.montage_id,
            "acquisition_id": montage.acquisition_id,
            "state": montage.state,
            "pixel_size_nm": pixel_size_nm,
            "qc": dict(qc),
            "layout_qc": layout.get("qc"),
            "fused": fused,
            "completed_at": montage.completed_at,
        },
    )


def _tile_uris(tiles: list[TileRow], archived: MontageBuffer) -> dict[str, str]:
    """Where each tile's image lives after the upload: its processed array, else the camera's file."""
    return {
        t.tile_id: f"{archived.processed_tiles}/{array_name(t.row, t.column)}"
        if t.status == "processed"
        else t.path
        for t in tiles
    }


def _complete_update(
    montage: MontageRow,
    tiles: list[TileRow],
    files: list[dict[str, Any]],
    archived: MontageBuffer,
    fused: Mapping[str, Any],
    layout: Mapping[str, Any],
    qc: Mapping[str, Any],
    pixel_size_nm: float,
    pixel_size_source: str,
    lineage: Mapping[str, Any],
) -> dict[str, Any]:
    """The catalog record's metadata, files and lineage once the montage is archived in ``archived``."""
    info = MultiscaleInfo.from_dict(fused)
    shape = [int(n) for n in fused["shape"]]
    return {
        "metadata": {
            "core": {
                "volume_shape": shape,
                "axes": ["y", "x"],
                "voxel_size_nm": {"x": pixel_size_nm, "y": pixel_size_nm},
                "voxel_size_source": pixel_size_source,
                "data_type": info.dtype,
                "modality": "TEM",
            },
            "technical": {
                "file_size_bytes": sum(f["size_bytes"] for f in files),
                "sha256": combined_sha256(files),
                "source_format": "TIFF tiles (TEM_comms tile.raw)",
                "compression": "blosc-zstd",
                "chunk_size": list(info.chunks),
                "dtype": info.dtype,
                "dimensions_nm": [float(n) * pixel_size_nm for n in shape],
            },
            "provenance": {
                "processing_pipeline": "em_platform montage: flatfield + CLAHE, neighbour matching, "
                "global translation solve, feathered fusion",
                "internal_zarr_path": "0",
            },
            "quality": {
                "completeness_score": _completeness(tiles, montage),
                "metrics": {"qc": dict(qc), "layout": layout.get("qc", {})},
            },
            "ome_zarr": ome_zarr_block(info, archived.fused),
        },
        "files": {
            "volume": archived.fused,
            "metadata": archived.metadata,
            "additional": {"processed_tiles": archived.processed_tiles, "layout": archived.layout},
        },
        "lineage": dict(lineage),
    }


def _completeness(tiles: list[TileRow], montage: MontageRow) -> float:
    planned = montage.total_tiles or len(tiles)
    processed = sum(t.status == "processed" for t in tiles)
    return round(min(1.0, processed / planned), 4) if planned else 0.0
