"""Per-montage assets after QC: where every tile sits, the fused image, and the move to long-term storage.

``montage_layout`` solves tile positions from the journal's matches (blocking checks: disconnected tiles,
seams, scale distortion); ``montage`` fuses the processed tiles into a multiscale OME-Zarr in the buffer;
``montage_upload`` copies buffer → storage root with checksums, writes the TEM tile records and the
catalog record, then frees the buffer. The algorithms live in ``em_platform.stitch`` and
``em_platform.tem.archive``; these assets only wire them to the partition, resources and metadata.
"""

import json
import math
import time
from pathlib import Path

import dagster as dg

from em_platform.assets.acquisition import MATCHES, PROCESSED, STATS
from em_platform.assets.presentation import FOCUS_LEGEND, partitioned_check, png_markdown, scaled_png_markdown
from em_platform.partitions import montages
from em_platform.resources import CatalogResource, DaskResource, StorageResource
from em_platform.resources.acquisition import AcquisitionHardware
from em_platform.stitch.fuse import ZarrTileGroup, fuse_montage
from em_platform.stitch.layout_qc import SEAM_PX
from em_platform.stitch.montage_layout import array_name, dumps, placed_tiles, solve_montage
from em_platform.stitch.previews import focus_map_png, minimap_png
from em_platform.tem.archive import FUSED, FUSED_INFO, LAYOUT, archive_montage
from em_platform.tem.archive import PROCESSED as PROCESSED_DIR
from em_platform.tem.protocol import buffer_status

LAYOUT_KEY, MONTAGE_KEY, UPLOAD_KEY = (
    dg.AssetKey(k) for k in ("montage_layout", "montage", "montage_upload")
)


class MontageLayoutConfig(dg.Config):
    """Limits of the layout's blocking checks (asap-modules' montage QC: seams are residuals ≥ 4 px)."""

    # translation (default), or a rigid / affine transform per tile from the matched patch centres
    model: str = "translation"
    seam_px: float = SEAM_PX
    max_seams: int = 0
    max_disconnected_tiles: int = 0
    # 0.5 %: 25 px across a 5000-px tile row of 10; a wrong pixel size or a bad solve is far beyond it
    max_scale_distortion: float = 0.005


class MontageFusionConfig(dg.Config):
    blend_px: int = 64  # feathering width; 0 = plain mean in overlaps
    chunk: int = 1024


class MontageUploadConfig(dg.Config):
    free_buffer: bool = True  # delete the uploaded buffer files once the storage root verifies


def _pixel_size(hardware: AcquisitionHardware, montage_id: str) -> tuple[float | None, str]:
    """The montage's own pixel size (montage.complete) or the scope's configured calibration."""
    m = hardware.montage(montage_id)
    if m is not None and m.pixel_size_nm:
        return m.pixel_size_nm, "header"
    return hardware.pixel_size_nm, "config"


def _check(name: str, description: str) -> dg.AssetCheckSpec:
    return partitioned_check(name, LAYOUT_KEY, montages, description, blocking=True)


@dg.asset(
    key=LAYOUT_KEY,
    deps=[MATCHES, STATS],
    partitions_def=montages,
    group_name="montage",
    description="Solved tile positions (global least squares over the neighbour matches, stage prior).",
    check_specs=[
        _check("disconnected_tiles", "No tile is left without a match tying it to the montage."),
        _check(
            "seams", "No accepted match disagrees with the solved layout by the seam limit (4 px) or more."
        ),
        _check("scale_distortion", "The solved montage has the stage grid's scale (pixel size is right)."),
    ],
    kinds={"json"},
)
def montage_layout(
    context: dg.AssetExecutionContext,
    config: MontageLayoutConfig,
    hardware: AcquisitionHardware,
    storage: StorageResource,
):
    montage_id = context.partition_key
    buffer = storage.buffer()
    group = ZarrTileGroup(buffer.to_url(buffer.path(montage_id, PROCESSED_DIR)))
    tiles = [t for t in hardware.tiles(montage_id) if not t.is_reference and t.status == "processed"]
    shapes = {(t.row, t.column): tuple(group.tile_info(array_name(t.row, t.column)).shape) for t in tiles}
    pixel_size, _ = _pixel_size(hardware, montage_id)
    started = time.monotonic()
    if config.model not in ("translation", "rigid", "affine"):
        raise ValueError(f"model {config.model!r}: choose translation, rigid or affine")
    result = solve_montage(
        montage_id,
        tiles,
        shapes,
        pixel_size,
        model=config.model,
        seam_px=config.seam_px,
        stage_rotation_rad=hardware.stage_rotation(montage_id),
    )
    seconds = time.monotonic() - started
    buffer.write_bytes(buffer.path(montage_id, LAYOUT), dumps(result))
    qc = result.qc
    context.log.info(
        "montage %s: %d tiles solved from %d matches (%d rejected) in %.2f s; RMS residual %.3f px",
        montage_id,
        qc.tiles,
        qc.edges,
        qc.rejected,
        seconds,
        qc.rms_residual_px,
    )
    yield dg.MaterializeResult(
        metadata={
            **qc.summary(),
            "prior": result.prior,
            "model": result.model,
            "solve_seconds": round(seconds, 3),
            # where it lives once montage_upload has run (the buffer copy is freed then)
            "path": dg.MetadataValue.path(storage.store().url("acquisition", montage_id, LAYOUT)),
            "buffer_path": dg.MetadataValue.path(buffer.path(montage_id, LAYOUT)),
            "rejected": dg.MetadataValue.json(
                [
                    {"tile": list(a), "neighbour": list(b), "residual_px": round(r, 2)}
                    for (a, b), r in result.layout.rejected.items()
                ]
            ),
        }
    )
    # A tile QC already failed (blank, out of focus, ...) has nothing to match; it is placed by the stage and
    # judged by its own checks. A good tile that nothing ties to the montage is what this check is about.
    faulty = {(t.row, t.column) for t in tiles if t.qc_passed is False}
    lost = [t for t in qc.disconnected if t not in faulty]
    yield dg.AssetCheckResult(
        check_name="disconnected_tiles",
        passed=len(lost) <= config.max_disconnected_tiles,
        metadata={
            "disconnected": dg.MetadataValue.json([list(t) for t in lost]),
            "faulty_tiles_placed_by_stage": dg.MetadataValue.json(
                [list(t) for t in qc.disconnected if t in faulty]
            ),
            "limit": config.max_disconnected_tiles,
        },
    )
    yield dg.AssetCheckResult(
        check_name="seams",
        passed=len(qc.seams) <= config.max_seams,
        metadata={
            "seams": dg.MetadataValue.json([[list(a), list(b), round(r, 2)] for a, b, r in qc.seams[:20]]),
            "max_residual_px": round(qc.max_residual_px, 3),
            "limit_px": config.seam_px,
        },
    )
    yield dg.AssetCheckResult(
        check_name="scale_distortion",
        passed=qc.scale_ok(config.max_scale_distortion),  # beyond the limit by more than 3 standard errors
        metadata={
            "scale_x": qc.scale[0],
            "scale_y": qc.scale[1],
            "standard_error": qc.scale_uncertainty if math.isfinite(qc.scale_uncertainty) else -1.0,
            "limit": config.max_scale_distortion,
        },
    )


@dg.asset(
    key=MONTAGE_KEY,
    deps=[LAYOUT_KEY, PROCESSED],
    partitions_def=montages,
    group_name="montage",
    description="The fused montage: multiscale OME-Zarr, feathered in the overlaps, written chunk by chunk.",
    kinds={"zarr", "dask"},
    pool="pixels",
)
def montage(
    context: dg.AssetExecutionContext,
    config: MontageFusionConfig,
    hardware: AcquisitionHardware,
    storage: StorageResource,
    dask: DaskResource,
) -> dg.MaterializeResult:
    montage_id = context.partition_key
    buffer = storage.buffer()
    layout = json.loads(Path(buffer.path(montage_id, LAYOUT)).read_text())
    pixel_size, _ = _pixel_size(hardware, montage_id)
    if not pixel_size:
        raise ValueError(
            f"montage {montage_id}: no pixel size (no montage.complete with one, and none configured); "
            "set EM_SCOPE_PIXEL_SIZE_NM to the scope's calibration"
        )
    final = buffer.path(montage_id, FUSED)
    staging = buffer.staging_path(final)
    started = time.monotonic()
    try:
        fused = fuse_montage(
            placed_tiles(layout),
            ZarrTileGroup(buffer.to_url(buffer.path(montage_id, PROCESSED_DIR))),
            buffer.to_url(staging),
            pixel_size_nm=pixel_size,
            client=dask.get_client(),
            blend_px=config.blend_px,
            chunk=config.chunk,
            name=montage_id,
        )
        buffer.publish(staging, final)
    except BaseException:
        buffer.remove(staging)
        raise
    seconds = time.monotonic() - started
    doc = {**fused.to_dict(), "url": buffer.to_url(final), "seconds": round(seconds, 3)}
    buffer.write_bytes(buffer.path(montage_id, FUSED_INFO), json.dumps(doc, indent=1).encode())
    focus = {
        (t.row, t.column): (t.results or {}).get("focus")
        for t in hardware.tiles(montage_id)
        if not t.is_reference
    }
    rows = max((r for r, _ in focus), default=-1) + 1
    cols = max((c for _, c in focus), default=-1) + 1
    mpix = fused.shape[0] * fused.shape[1] / 1e6
    return dg.MaterializeResult(
        metadata={
            # where it lives once montage_upload has run (the buffer copy is freed then)
            "path": dg.MetadataValue.path(storage.store().url("acquisition", montage_id, FUSED)),
            "buffer_path": dg.MetadataValue.path(final),
            "shape": str(fused.shape),
            "pixel_size_nm": pixel_size,
            "pyramid_levels": len(fused.info.levels),
            "tiles": fused.n_tiles,
            "seconds": round(seconds, 2),
            "mpix_per_second": round(mpix / seconds, 1) if seconds else 0.0,
            "focus_map": focus_map_markdown(focus, rows, cols),
            "minimap": png_markdown(minimap_png(final), "minimap"),
        }
    )


def focus_map_markdown(focus: dict, rows: int, cols: int) -> dg.MetadataValue:
    """The focus map with its legend, small enough for the UI to draw inline (one PNG pixel per tile)."""
    if rows < 1 or cols < 1:
        return dg.MetadataValue.md("(no tiles)")
    cell = max(4, min(24, 480 // max(rows, cols)))  # CSS pixels per tile: a 20 x 20 montage is 480 px wide
    png = focus_map_png(focus, rows, cols, cell_px=1)
    return scaled_png_markdown(png, cols * cell, rows * cell, "focus map", caption=FOCUS_LEGEND)


@dg.asset(
    key=UPLOAD_KEY,
    deps=[MONTAGE_KEY],
    partitions_def=montages,
    group_name="montage",
    description="Processed tiles, fused montage and metadata uploaded (checksummed) to the storage root, "
    "TEM tile records and a catalog record written, the local buffer freed.",
)
def montage_upload(
    context: dg.AssetExecutionContext,
    config: MontageUploadConfig,
    hardware: AcquisitionHardware,
    storage: StorageResource,
    catalog: CatalogResource,
) -> dg.MaterializeResult:
    montage_id = context.partition_key
    buffer, store = storage.buffer(), storage.store()
    row = hardware.montage(montage_id)
    if row is None:
        raise KeyError(f"montage {montage_id} is not in the acquisition journal")
    pixel_size, source = _pixel_size(hardware, montage_id)
    if not pixel_size:
        raise ValueError(f"montage {montage_id}: no pixel size; set EM_SCOPE_PIXEL_SIZE_NM")
    tiles = hardware.tiles(montage_id)
    judged = [t for t in tiles if not t.is_reference and t.qc_passed is not None]
    statuses = hardware.journal().qc_statuses(montage_id)
    qc = {
        "status": statuses[-1][0] if statuses else "GOOD",
        "reason": (statuses[-1][1] if statuses else None) or "",
        "tiles_judged": len(judged),
        "tiles_passed": sum(bool(t.qc_passed) for t in judged),
    }
    last_sent = [0.0]

    def progress(p):
        if p.objects_left == 0 or time.monotonic() - last_sent[0] >= 2.0:
            last_sent[0] = time.monotonic()
            hardware.send(
                "buffer.status", buffer_status(p.objects_left, p.free_space, p.upload_rate_bits_per_s)
            )

    result = archive_montage(
        row,
        tiles,
        buffer.path(montage_id),
        store.url("acquisition", montage_id),
        catalog=catalog.db(),
        tile_records=catalog.tile_records(),
        qc=qc,
        pixel_size_nm=pixel_size,
        pixel_size_source=source,
        storage_options=store.storage_options or None,
        lineage={"run_id": context.run.run_id, "asset_key": "montage_upload", "partition_key": montage_id},
        free=config.free_buffer,
        on_progress=progress,
    )
    up = result.upload
    stored = store.url("acquisition", montage_id, FUSED)
    return dg.MaterializeResult(
        metadata={
            "url": dg.MetadataValue.path(store.url("acquisition", montage_id)),
            "montage": dg.MetadataValue.path(stored),
            "processed_tiles": dg.MetadataValue.path(store.url("acquisition", montage_id, PROCESSED_DIR)),
            "minimap": png_markdown(
                minimap_png(stored, storage_options=store.storage_options or None), "minimap"
            ),
            "objects": up.objects,
            "sent": len(up.sent),
            "already_there": len(up.skipped),
            "retried": len(up.retried),
            "bytes": up.bytes_total,
            "mib_per_second": round(up.bytes_sent / 2**20 / up.seconds, 1) if up.seconds else 0.0,
            "tile_records": result.tile_records,
            "buffer_freed_bytes": result.freed_bytes,
            "catalog_id": result.record["id"],
        }
    )
