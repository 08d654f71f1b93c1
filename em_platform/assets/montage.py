"""Per-montage assets after QC: where every tile sits, the fused image, and the move to long-term storage.

``montage_layout`` solves tile positions from the journal's matches (blocking checks: disconnected tiles,
seams, scale distortion); ``montage`` fuses the processed tiles into a multiscale OME-Zarr in the buffer
(blocking check ``fused_seams``: the matched overlaps measured on the pixels, which sees a torn block the
solve's residuals cannot);
``montage_upload`` copies buffer → storage root with checksums, writes the TEM tile records and the
catalog record, then frees the buffer. The algorithms live in ``em_platform.stitch`` and
``em_platform.tem.archive``; these assets only wire them to the partition, resources and metadata.

``lens_correction`` (group ``calibration``, not part of ``montage_job``: materialized on demand for a
calibration montage, as em_stitch's mesh lens correction is) estimates the scope's lens distortion from one
montage's matches and stores it under ``lens_correction/<scope>/`` in the storage root; ``montage_layout``
applies the scope's latest one (config ``lens``) to the montages that follow, and writes it into
``layout.json`` so the fusion applies the same correction.
"""

import json
import math
import re
import time
import typing
from collections import Counter
from pathlib import Path

import dagster as dg

from em_platform.assets.acquisition import CHECK_ASSET, MATCHES, PROCESSED, STATS
from em_platform.assets.presentation import (
    FOCUS_LEGEND,
    check_sentence,
    materialize_result,
    montage_check,
    montage_check_result,
    neuroglancer_link,
    png_markdown,
    scaled_png_markdown,
)
from em_platform.assets.retries import retry_on_outage
from em_platform.assets.signals import gate_blocking_checks
from em_platform.partitions import montages
from em_platform.resources import CatalogResource, DaskResource, StorageResource
from em_platform.resources.acquisition import AcquisitionHardware
from em_platform.stitch.fuse import ZarrTileGroup, fuse_montage
from em_platform.stitch.interop import read_point_matches
from em_platform.stitch.layout_qc import SEAM_PX
from em_platform.stitch.lens import LensModel, parse_lens_order
from em_platform.stitch.model_choice import Requested
from em_platform.stitch.montage_layout import (
    array_name,
    dumps,
    estimate_montage_lens,
    layout_lens,
    layout_seams,
    placed_tiles,
    scope_point_edges,
    solve_montage,
)
from em_platform.stitch.previews import focus_map_png, minimap_png
from em_platform.stitch.seams import SEAM_LIMIT_PX, seams_beyond
from em_platform.tem.archive import archive_montage
from em_platform.tem.buffer_layout import MontageBuffer
from em_platform.tem.protocol import buffer_status
from em_platform.tem.qc import BLANK, NO_TISSUE
from em_platform.tem.stitch_inputs import grid_tiles

LAYOUT_KEY, MONTAGE_KEY, UPLOAD_KEY, LENS_KEY = (
    dg.AssetKey(k) for k in ("montage_layout", "montage", "montage_upload", "lens_correction")
)
LENS_DIR = "lens_correction"  # in the storage root: <scope>/<montage>.json and <scope>/latest.json
LATEST_LENS = "latest.json"


class MontageLayoutConfig(dg.Config):
    """Limits of the layout's blocking checks (asap-modules' montage QC: seams are residuals ≥ 4 px)."""

    # auto (default): translation, rigid or affine, each step up only when the matched patch centres pay for
    # its parameters (em_platform.stitch.model_choice); or one of those three
    model: str = "auto"
    seam_px: float = SEAM_PX
    max_seams: int = 0
    max_disconnected_tiles: int = 0
    # 0.5 %: 25 px across a 5000-px tile row of 10; a wrong pixel size or a bad solve is far beyond it
    max_scale_distortion: float = 0.005
    # lens correction: "latest" (the scope's newest lens_correction; none while there is none, or when it is
    # for another tile size), "none", or the path/URL of a lens JSON (lens_correction's or --estimate-lens's)
    lens: str = "latest"
    scope: str = "default"  # whose lens_correction "latest" means
    # the scope's own point matches, solved instead of the journal's (a TEMCA scope's matcher): the path or
    # URL of a render point-match collection (plain, .json.gz or em_stitch's template form) whose pId/qId
    # are the journal's tile ids; "" (default) solves the journal's matches
    matches: str = ""


class LensCorrectionConfig(dg.Config):
    """Where the estimate goes and what it is: one polynomial correction per scope (camera setting)."""

    scope: str = "default"  # stored under lens_correction/<scope>/ in the storage root
    # highest polynomial degree (terms 2..order: 3 covers radial and decentering), or "auto": the order of
    # 2..5 with the lowest held-out residual (em_platform.stitch.lens.estimate_lens)
    order: str = "auto"
    # make it the scope's latest (what montage_layout applies) when it lowers the residual per point pair
    make_latest: bool = True


class MontageFusionConfig(dg.Config):
    blend_px: int = 64  # feathering width; 0 = plain mean in overlaps
    chunk: int = 1024
    # fused_seams: a matched overlap whose two tiles still disagree by more than this on the pixels (px)
    seam_limit_px: float = SEAM_LIMIT_PX
    max_seams: int = 0


class MontageUploadConfig(dg.Config):
    free_buffer: bool = True  # delete the uploaded buffer files once the storage root verifies


def _pixel_size(hardware: AcquisitionHardware, montage_id: str) -> tuple[float | None, str]:
    """The montage's own pixel size (montage.complete) or the scope's configured calibration."""
    m = hardware.montage(montage_id)
    if m is not None and m.pixel_size_nm:
        return m.pixel_size_nm, "header"
    return hardware.pixel_size_nm, "config"


def _check(name: str, description: str) -> dg.AssetCheckSpec:
    return montage_check(name, LAYOUT_KEY, description, blocking=True)


def _scope_dir(scope: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", scope):
        raise ValueError(
            f"scope {scope!r}: name the scope with letters, digits, '.', '_' or '-' (it is a folder name)"
        )
    return scope


def _processed(hardware: AcquisitionHardware, storage: StorageResource, montage_id: str):
    """The montage's processed tiles (journal rows) and their (height, width) in the buffer."""
    buffer = storage.buffer()
    group = ZarrTileGroup(buffer.to_url(MontageBuffer(buffer.path(montage_id)).processed_tiles))
    tiles = [t for t in hardware.tiles(montage_id) if not t.is_reference and t.status == "processed"]
    shapes = {(t.row, t.column): tuple(group.tile_info(array_name(t.row, t.column)).shape) for t in tiles}
    return tiles, shapes


def _lens_for(
    config: MontageLayoutConfig, storage: StorageResource, shapes: dict, log
) -> tuple[LensModel | None, str]:
    """The lens correction the layout applies and where it came from (for the metadata)."""
    choice = config.lens.strip()
    if choice.lower() == "none":
        return None, "none"
    sizes = {(w, h) for h, w in shapes.values()}
    if choice.lower() == "latest":
        store = storage.store()
        path = store.path(LENS_DIR, _scope_dir(config.scope), LATEST_LENS)
        if not store.exists(path):
            return None, f"none (no lens_correction for scope {config.scope!r} yet)"
        doc = store.read_json(path)
        lens = LensModel.from_dict(doc)
        if sizes != {tuple(lens.tile_size)}:
            log.warning(
                "scope %s's latest lens correction is for %s px tiles, this montage has %s: not applied",
                config.scope,
                lens.tile_size,
                sorted(sizes),
            )
            return None, f"none (latest of scope {config.scope!r} is for {lens.tile_size} px tiles)"
        source = store.url(LENS_DIR, config.scope, LATEST_LENS)
        return lens, f"{source} (from montage {doc.get('montage_id')})"
    import fsspec

    store = storage.store()  # a file on the storage root's S3 needs its endpoint and credentials
    options = store.storage_options if choice.startswith("s3://") else {}
    try:
        with fsspec.open(choice, "rb", **options) as f:
            lens = LensModel.from_dict(json.load(f))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"lens {choice!r}: not a lens correction file ({exc}); give 'latest', 'none' or the path of a "
            "lens_correction / --estimate-lens JSON"
        ) from exc
    return lens, choice


def _scope_matches(config: MontageLayoutConfig, storage: StorageResource, tiles) -> list | None:
    """The scope's own point matches of ``config.matches`` keyed by grid position (None: the journal's)."""
    source = config.matches.strip()
    if not source:
        return None
    store = storage.store()  # a file on the storage root's S3 needs its endpoint and credentials
    options = store.storage_options if source.startswith("s3://") else {}
    try:
        return scope_point_edges(read_point_matches(source, storage_options=options), grid_tiles(tiles))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"matches {source!r}: {exc}; give the path or URL of a render point-match collection whose "
            "pId/qId are this montage's tile ids, or \"\" for the journal's matches"
        ) from exc


@dg.asset(
    key=LAYOUT_KEY,
    # lens 'latest' reads the newest lens_correction of any calibration montage: a lineage edge from them all
    deps=[MATCHES, STATS, dg.AssetDep(LENS_KEY, partition_mapping=dg.AllPartitionMapping())],
    partitions_def=montages,
    group_name="montage",
    description="Solved tile transforms (global least squares over the neighbour matches, stage prior; "
    "the scope's lens correction applied).",
    check_specs=[
        _check("disconnected_tiles", "No tile is left without a match tying it to the montage."),
        _check(
            "seams", "No accepted match disagrees with the solved layout by the seam limit (4 px) or more."
        ),
        _check("scale_distortion", "The solved montage has the stage grid's scale (pixel size is right)."),
    ],
    kinds={"json"},
)
@gate_blocking_checks
def montage_layout(
    context: dg.AssetExecutionContext,
    config: MontageLayoutConfig,
    hardware: AcquisitionHardware,
    storage: StorageResource,
):
    montage_id = context.partition_key
    buffer = storage.buffer()
    tiles, shapes = _processed(hardware, storage, montage_id)
    pixel_size, _ = _pixel_size(hardware, montage_id)
    if config.model not in ("auto", "translation", "rigid", "affine"):
        raise ValueError(f"model {config.model!r}: choose auto, translation, rigid or affine")
    lens, lens_source = _lens_for(config, storage, shapes, context.log)
    scope_edges = _scope_matches(config, storage, tiles)
    started = time.monotonic()
    result = solve_montage(
        montage_id,
        grid_tiles(tiles),
        shapes,
        pixel_size,
        model=typing.cast(Requested, config.model),  # one of them: checked above
        seam_px=config.seam_px,
        stage_rotation_rad=hardware.stage_rotation(montage_id),
        lens=lens,
        point_edges=scope_edges,
    )
    seconds = time.monotonic() - started
    buffer.write_bytes(MontageBuffer(buffer.path(montage_id)).layout, dumps(result))
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
    yield materialize_result(
        metadata={
            **qc.summary(),
            "prior": result.prior,
            "model": result.model,
            "lens": lens_source,
            "matches": config.matches.strip() or "journal",
            "lens_max_displacement_px": round(lens.max_displacement(), 3) if lens is not None else 0.0,
            "resampled": not result.is_translation(),  # the fusion resamples (rotation, scale or lens)
            "residual_per_point_pair": dg.MetadataValue.json(
                {k: round(v, 4) for k, v in result.layout.residual_stats.items()}
            ),
            "solve_seconds": round(seconds, 3),
            # where it lives once montage_upload has run (the buffer copy is freed then)
            "path": dg.MetadataValue.path(
                MontageBuffer(storage.store().url("acquisition", montage_id)).layout
            ),
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
    yield montage_check_result(
        montage_id,
        check_name="disconnected_tiles",
        passed=len(lost) <= config.max_disconnected_tiles,
        description=check_sentence(
            f"{len(lost)} good tile(s) tied to the montage by no match",
            f"at most {config.max_disconnected_tiles}",
            len(lost) <= config.max_disconnected_tiles,
            "they are placed by the stage alone: check their overlaps (metadata `disconnected`), then re-run "
            "with a larger `stage_error_px` or the scope's matches",
        ),
        metadata={
            "disconnected": dg.MetadataValue.json([list(t) for t in lost]),
            "faulty_tiles_placed_by_stage": dg.MetadataValue.json(
                [list(t) for t in qc.disconnected if t in faulty]
            ),
            "limit": config.max_disconnected_tiles,
        },
    )
    yield montage_check_result(
        montage_id,
        check_name="seams",
        passed=len(qc.seams) <= config.max_seams,
        description=check_sentence(
            f"{len(qc.seams)} tile pair(s) whose solved positions disagree with their match by more than "
            f"{config.seam_px:g} px (worst {qc.max_residual_px:.2f} px)",
            f"at most {config.max_seams}",
            len(qc.seams) <= config.max_seams,
            "the montage would show a step there: look at the pairs in `seams`, then re-run with "
            "`model: rigid` or `affine` (rotated or scaled tiles) or a lens correction",
        ),
        metadata={
            "seams": dg.MetadataValue.json([[list(a), list(b), round(r, 2)] for a, b, r in qc.seams[:20]]),
            "max_residual_px": round(qc.max_residual_px, 3),
            "limit_px": config.seam_px,
        },
    )
    scale_ok = qc.scale_ok(config.max_scale_distortion)  # beyond the limit by more than 3 standard errors
    yield montage_check_result(
        montage_id,
        check_name="scale_distortion",
        passed=scale_ok,
        description=check_sentence(
            f"the solved tile spacing is {qc.scale[0]:.4f} × {qc.scale[1]:.4f} of the stage's (x × y)",
            f"within {config.max_scale_distortion:.1%} of 1, allowing 3 standard errors",
            scale_ok,
            "the pixel size the scope reports does not match the images: check EM_SCOPE_PIXEL_SIZE_NM and "
            "the scope's calibration",
        ),
        metadata={
            "scale_x": qc.scale[0],
            "scale_y": qc.scale[1],
            "standard_error": qc.scale_uncertainty if math.isfinite(qc.scale_uncertainty) else -1.0,
            "limit": config.max_scale_distortion,
        },
    )


@dg.asset(
    key=LENS_KEY,
    deps=[MATCHES],
    partitions_def=montages,
    group_name="calibration",
    description="The scope's lens distortion (polynomial), estimated from this calibration montage's matched "
    "point pairs and stored for the montages that follow (montage_layout's lens='latest').",
    kinds={"json"},
)
def lens_correction(
    context: dg.AssetExecutionContext,
    config: LensCorrectionConfig,
    hardware: AcquisitionHardware,
    storage: StorageResource,
) -> dg.MaterializeResult:
    montage_id = context.partition_key
    scope = _scope_dir(config.scope)
    tiles, shapes = _processed(hardware, storage, montage_id)
    try:
        order = parse_lens_order(config.order)
    except ValueError as exc:
        raise dg.Failure(f"lens_correction: {exc}") from exc
    fit = estimate_montage_lens(grid_tiles(tiles), shapes, order=order)
    summary = fit.summary()
    doc = {**fit.model.to_dict(), "fit": summary, "scope": scope, "montage_id": montage_id}
    store = storage.store()
    store.write_json(store.path(LENS_DIR, scope, f"{montage_id}.json"), doc)
    improves = fit.residual_after_px < fit.residual_before_px
    latest = config.make_latest and improves
    if latest:
        store.write_json(store.path(LENS_DIR, scope, LATEST_LENS), doc)
    elif config.make_latest:
        context.log.warning(
            "montage %s: the lens correction does not lower the residual per point pair (%.3f -> %.3f px); "
            "scope %s's latest is left as it was",
            montage_id,
            fit.residual_before_px,
            fit.residual_after_px,
            scope,
        )
    context.log.info(
        "scope %s lens from montage %s: %d point pairs, residual %.3f -> %.3f px, max |D| %.2f px",
        scope,
        montage_id,
        fit.pairs,
        fit.residual_before_px,
        fit.residual_after_px,
        summary["max_displacement_px"],
    )
    return materialize_result(
        metadata={
            **summary,
            "scope": scope,
            "latest": latest,
            "path": dg.MetadataValue.path(store.url(LENS_DIR, scope, f"{montage_id}.json")),
            "model": dg.MetadataValue.json(doc),
        }
    )


@dg.asset(
    key=MONTAGE_KEY,
    deps=[LAYOUT_KEY, PROCESSED],
    partitions_def=montages,
    group_name="montage",
    description="The fused montage: multiscale OME-Zarr, feathered in the overlaps, written chunk by chunk.",
    check_specs=[
        montage_check(
            "fused_seams",
            MONTAGE_KEY,
            "Every matched overlap agrees on the pixels: both tiles resampled as placed, their offset "
            "measured (phase correlation, then Lucas-Kanade) is within the limit (1 px). A torn block "
            "hanging on one wrong match passes the layout's checks; here its seams are pixels wide.",
            blocking=True,
        )
    ],
    kinds={"zarr", "dask"},
    pool="pixels",
)
@gate_blocking_checks
def montage(
    context: dg.AssetExecutionContext,
    config: MontageFusionConfig,
    hardware: AcquisitionHardware,
    storage: StorageResource,
    dask: DaskResource,
) -> dg.MaterializeResult:
    montage_id = context.partition_key
    buffer = storage.buffer()
    folder = MontageBuffer(buffer.path(montage_id))
    layout = json.loads(Path(folder.layout).read_text())
    tiles = ZarrTileGroup(buffer.to_url(folder.processed_tiles))
    pixel_size, _ = _pixel_size(hardware, montage_id)
    if not pixel_size:
        raise ValueError(
            f"montage {montage_id}: no pixel size (no montage.complete with one, and none configured); "
            "set EM_SCOPE_PIXEL_SIZE_NM to the scope's calibration"
        )
    final = folder.fused
    staging = buffer.staging_path(final)
    placed, lens = placed_tiles(layout), layout_lens(layout)
    started = time.monotonic()
    try:
        fused = fuse_montage(
            placed,
            tiles,
            buffer.to_url(staging),
            pixel_size_nm=pixel_size,
            client=dask.get_client(),
            blend_px=config.blend_px,
            chunk=config.chunk,
            name=montage_id,
            lens=lens,
        )
        buffer.publish(staging, final)
    except BaseException:
        buffer.remove(staging)
        raise
    seconds = time.monotonic() - started
    doc = {**fused.to_dict(), "url": buffer.to_url(final), "seconds": round(seconds, 3)}
    buffer.write_bytes(folder.fused_info, json.dumps(doc, indent=1).encode())
    journal_tiles = [t for t in hardware.tiles(montage_id) if not t.is_reference]
    # tiles QC failed are placed by the stage and judged by their own checks, as in disconnected_tiles
    started = time.monotonic()
    seams = layout_seams(
        layout,
        tiles,
        exclude=[(t.row, t.column) for t in journal_tiles if t.qc_passed is False],
        client=dask.get_client(),
    )
    seam_check = _fused_seams_check(montage_id, seams, time.monotonic() - started, config, context.log)
    focus = {(t.row, t.column): (t.results or {}).get("focus") for t in journal_tiles}
    rows = max((r for r, _ in focus), default=-1) + 1
    cols = max((c for _, c in focus), default=-1) + 1
    mpix = fused.shape[0] * fused.shape[1] / 1e6
    stored = MontageBuffer(storage.store().url("acquisition", montage_id)).fused  # after montage_upload
    return materialize_result(
        metadata={
            # where it lives once montage_upload has run (the buffer copy is freed then) ...
            "path": dg.MetadataValue.path(stored),
            # ... and where it opens at full resolution then (made now from the buffer's copy)
            **neuroglancer_link(storage, stored, context.log, buffer.to_url(final)),
            "shape": str(fused.shape),
            "pixel_size_nm": pixel_size,
            "pyramid_levels": len(fused.info.levels),
            "tiles": fused.n_tiles,
            # tiles resampled (bicubic) by their rigid/affine transforms and the lens, or pasted at whole pixels
            "placement": "resampled" if fused.resampled else "whole pixels",
            "lens_corrected": lens is not None,
            "seconds": round(seconds, 2),
            "mpix_per_second": round(mpix / seconds, 1) if seconds else 0.0,
            "tile_qc": tile_qc_markdown(journal_tiles),
            "focus_map": focus_map_markdown(focus, rows, cols, _nothing_to_focus_on(journal_tiles)),
            "minimap": png_markdown(minimap_png(final), "minimap"),
        },
        check_results=[seam_check],
    )


def _fused_seams_check(montage_id, seams, seconds, config: MontageFusionConfig, log) -> dg.AssetCheckResult:
    beyond = seams_beyond(seams, config.seam_limit_px)
    measured = sorted(s.offset_px for s in seams if s.offset_px is not None)
    log.info(
        "montage %s: %d overlaps measured on the pixels in %.2f s (%d not measurable), %d seam(s) beyond %g px",
        montage_id,
        len(measured),
        seconds,
        len(seams) - len(measured),
        len(beyond),
        config.seam_limit_px,
    )
    return montage_check_result(
        montage_id,
        check_name="fused_seams",
        passed=len(beyond) <= config.max_seams,
        description=check_sentence(
            f"{len(beyond)} overlap(s) of the fused montage offset by more than {config.seam_limit_px:g} px "
            f"on the pixels ({len(measured)} measured)",
            f"at most {config.max_seams}",
            len(beyond) <= config.max_seams,
            "the fused image shows a step there (`beyond_limit`): re-run montage_layout with another model "
            "or the lens correction, then fuse again",
        ),
        metadata={
            "measured": len(measured),
            "not_measurable": len(seams) - len(measured),
            "max_px": round(measured[-1], 3) if measured else 0.0,
            "median_px": round(measured[len(measured) // 2], 3) if measured else 0.0,
            "beyond_limit": dg.MetadataValue.json(
                [
                    {"tile": s.tile, "neighbour": s.neighbour, "offset_px": round(s.measured_px, 2)}
                    for s in beyond[:20]
                ]
            ),
            "seams_beyond_limit": len(beyond),
            "limit_px": config.seam_limit_px,
            "max_seams": config.max_seams,
            "seconds": round(seconds, 2),
        },
    )


def _nothing_to_focus_on(tiles) -> list[tuple[int, int]]:
    """Grid positions of tiles QC judged blank or without tissue (their focus score means nothing)."""
    return [
        (t.row, t.column)
        for t in tiles
        if any(isinstance(f, dict) and f.get("fault_type") in (BLANK, NO_TISSUE) for f in (t.qc_faults or []))
    ]


def tile_qc_markdown(tiles) -> dg.MetadataValue:
    """The live QC of the montage's tiles, on the montage's own page: how many passed, the faults of those that
    did not, and where the montage-level tile checks (blank tiles, focus, saturation) are: on tile_stats, the
    asset the live step makes (a check belongs to the step that evaluates it)."""
    judged = [t for t in tiles if t.qc_passed is not None]
    failed = [t for t in judged if not t.qc_passed]
    faults = Counter(
        f.get("fault_type", "?").replace("_", " ")
        for t in failed
        for f in (t.qc_faults or [])
        if isinstance(f, dict)
    )
    said = f"{len(judged)} tiles judged live: {len(judged) - len(failed)} passed, {len(failed)} failed"
    if faults:
        said += " (" + ", ".join(f"{kind}: {n}" for kind, n in sorted(faults.items())) + ")"
    checks = ", ".join(f"`{name}`" for name, key in CHECK_ASSET.items() if key == STATS)
    return dg.MetadataValue.md(
        f"{said}. The montage's tile checks ({checks}) are on "
        f"[tile_stats](/assets/{'/'.join(STATS.path)}?view=checks), with each tile's faults in its QC."
    )


def focus_map_markdown(focus: dict, rows: int, cols: int, no_tissue=()) -> dg.MetadataValue:
    """The focus map with its legend, small enough for the UI to draw inline (one PNG pixel per tile);
    ``no_tissue``: positions QC found nothing to focus on (their own colour, not "blurred")."""
    if rows < 1 or cols < 1:
        return dg.MetadataValue.md("(no tiles)")
    cell = max(4, min(24, 480 // max(rows, cols)))  # CSS pixels per tile: a 20 x 20 montage is 480 px wide
    png = focus_map_png(focus, rows, cols, cell_px=1, no_tissue=no_tissue)
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

    try:
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
            lineage={
                "run_id": context.run.run_id,
                "asset_key": "montage_upload",
                "partition_key": montage_id,
            },
            free=config.free_buffer,
            on_progress=progress,
        )
    except Exception as exc:
        retry_on_outage(context, exc, storage)  # the upload resumes: verified objects are kept
        raise
    up = result.upload
    archived = MontageBuffer(store.url("acquisition", montage_id))
    return materialize_result(
        metadata={
            "url": dg.MetadataValue.path(archived.folder),
            "montage": dg.MetadataValue.path(archived.fused),
            **neuroglancer_link(storage, archived.fused, context.log),
            "processed_tiles": dg.MetadataValue.path(archived.processed_tiles),
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
