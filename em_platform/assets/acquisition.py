"""Per-montage acquisition assets, processed live while the scope is still imaging.

One step streams the montage: tiles are taken from the journal as they land, processed on Dask,
matched and QC'd, and verdicts go back to the microscope at once. The five assets are what that step
produces; their blocking checks keep downstream montage assets (layout, fusion, upload) off a failed montage.
"""

import statistics

import dagster as dg

from em_platform.partitions import montages
from em_platform.resources import DaskResource, StorageResource
from em_platform.resources.acquisition import AcquisitionHardware
from em_platform.storage.upload import abort_cleanup
from em_platform.tem.montage_run import MontageRunConfig, run_montage
from em_platform.tem.qc import BLANK, OUT_OF_FOCUS, SATURATED, QCConfig

RAW, FLAT, PROCESSED, STATS, MATCHES = (
    dg.AssetKey(k) for k in ("raw_tiles", "flatfield", "processed_tiles", "tile_stats", "tile_matches")
)


class MontageProcessingConfig(dg.Config):
    """Run configuration (the launchpad shows these); QC thresholds are documented in ``tem/qc.py``."""

    stall_timeout_seconds: float = 300.0
    poll_seconds: float = MontageRunConfig.poll_seconds
    write_tiffs: bool = False
    min_std: float = QCConfig.min_std
    saturated_fraction: float = QCConfig.saturated_fraction
    critical_saturated_fraction: float = QCConfig.critical_saturated_fraction
    max_focus: float = QCConfig.max_focus
    min_match_quality: float = QCConfig.min_match_quality
    # Montage-level checks: fraction of tiles (or edges) allowed to fail before the montage is rejected.
    max_out_of_focus_fraction: float = 0.05
    max_unmatched_edge_fraction: float = 0.05
    max_blank_fraction: float = 0.05
    max_saturated_fraction: float = 0.05

    def run_config(self) -> MontageRunConfig:
        return MontageRunConfig(
            poll_seconds=self.poll_seconds,
            stall_timeout_seconds=self.stall_timeout_seconds,
            write_tiffs=self.write_tiffs,
            qc=QCConfig(
                min_std=self.min_std,
                saturated_fraction=self.saturated_fraction,
                critical_saturated_fraction=self.critical_saturated_fraction,
                max_focus=self.max_focus,
                min_match_quality=self.min_match_quality,
            ),
        )


def _check(name: str, asset: dg.AssetKey, description: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description)


CHECKS = [
    _check(
        "acquisition_complete",
        RAW,
        "The scope completed the montage (a cancelled or failed one is cleaned up, not stitched).",
    ),
    _check("focus", STATS, "Fraction of out-of-focus tiles is within the limit."),
    _check("blank_tiles", STATS, "Fraction of blank (no-section) tiles is within the limit."),
    _check(
        "saturated_tiles",
        STATS,
        "Fraction of saturated tiles is within the limit; no critical over-exposure.",
    ),
    _check(
        "overlap",
        MATCHES,
        "Every tile overlaps its neighbours: fraction of unmatched edges within the limit.",
    ),
]


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            RAW, description="The montage's tile manifest from the acquisition journal.", kinds={"tiff"}
        ),
        dg.AssetSpec(
            FLAT, deps=[RAW], description="Brightfield/darkfield references for flatfield correction."
        ),
        dg.AssetSpec(
            PROCESSED,
            deps=[RAW, FLAT],
            description="Flatfield-corrected, CLAHE-enhanced tiles (zarr per montage).",
            kinds={"zarr", "dask"},
        ),
        dg.AssetSpec(
            STATS,
            deps=[PROCESSED],
            description="Min/max/mean/std, 256-bin histogram, focus score and QC verdict per tile.",
        ),
        dg.AssetSpec(
            MATCHES,
            deps=[PROCESSED],
            description="Each tile matched against its top and left neighbours (TEM_comms Match).",
        ),
    ],
    check_specs=CHECKS,
    partitions_def=montages,
    group_name="acquisition",
    can_subset=False,
    pool="pixels",
)
def montage_tiles(
    context: dg.AssetExecutionContext,
    config: MontageProcessingConfig,
    hardware: AcquisitionHardware,
    storage: StorageResource,
    dask: DaskResource,
):
    montage_id = context.partition_key
    store = storage.buffer()  # local until montage_upload moves it to the storage root
    final = store.path(montage_id, "processed_tiles.zarr")
    staging = store.staging_path(final)
    tiff_dir = store.path(montage_id, "processed") if config.write_tiffs else None
    try:
        result = run_montage(
            montage_id,
            hardware,
            dask.get_client(),
            processed_url=store.to_url(staging),
            storage_options=store.storage_options or None,
            tiff_dir=tiff_dir,
            config=config.run_config(),
            logger=context.log,
        )
        state = hardware.montage(montage_id).state
        if state == "completed":
            store.publish(staging, final)
        else:  # an aborted montage (cancelled, error): the buffer's job is to delete everything it holds
            store.remove(staging)
            gone = abort_cleanup(store.path(montage_id), storage.store().url("acquisition", montage_id))
            context.log.warning(
                "montage %s ended %r: its buffer is cleaned up (%d local files, %d stored objects removed)",
                montage_id,
                state,
                gone.local_files,
                gone.remote_objects,
            )
    except BaseException:
        store.remove(staging)
        raise
    yield from _results(result, store.to_url(final), config)
    yield dg.AssetCheckResult(
        check_name="acquisition_complete",
        asset_key=RAW,
        passed=state == "completed",
        metadata={"state": state},
    )


def _results(result, processed_url: str, config: MontageProcessingConfig):
    recs = list(result.tiles.values())
    ok = [r for r in recs if r.outcome is not None]
    failed = [r for r in recs if r.error is not None]
    summary = result.qc.summary()
    rows, cols = result.grid
    yield dg.MaterializeResult(
        asset_key=RAW,
        metadata={
            "tiles": len(recs),
            "grid": f"{rows} x {cols}",
            "missing": dg.MetadataValue.json([list(p) for p in result.missing]),
            "seconds": round(result.seconds, 2),
            "tiles_per_second": round(len(recs) / result.seconds, 2) if result.seconds else 0.0,
        },
    )
    yield dg.MaterializeResult(
        asset_key=FLAT, metadata={"flatfield": dg.MetadataValue.json(result.flatfield)}
    )
    yield dg.MaterializeResult(
        asset_key=PROCESSED,
        metadata={
            "path": dg.MetadataValue.path(processed_url),
            "processed": len(ok),
            "failed": len(failed),
            "failures": dg.MetadataValue.json({r.tile.tile_id: r.error for r in failed}),
        },
    )
    focus = [r.outcome.focus for r in ok]
    yield dg.MaterializeResult(
        asset_key=STATS,
        metadata={
            "qc_status": summary["status"],
            "qc_reason": summary["reason"] or "",
            "tiles_passed": summary["passed"],
            "faults": dg.MetadataValue.json(summary["faults"]),
            "focus_median": round(statistics.median(focus), 4) if focus else -1.0,
            "mean_intensity": round(statistics.fmean(r.outcome.stats["mean"] for r in ok), 2) if ok else -1.0,
        },
    )
    edges = result.edges()
    matched = [m for m in edges if m]
    yield dg.MaterializeResult(
        asset_key=MATCHES,
        metadata={
            "edges": len(edges),
            "matched": len(matched),
            "median_distance_px": round(statistics.median(m["distance"] for m in matched), 2)
            if matched
            else -1.0,
        },
    )
    frac = result.fault_fractions()
    yield _fraction_check("focus", STATS, frac[OUT_OF_FOCUS], config.max_out_of_focus_fraction)
    yield _fraction_check("blank_tiles", STATS, frac[BLANK], config.max_blank_fraction)
    yield _fraction_check(
        "saturated_tiles",
        STATS,
        frac[SATURATED],
        config.max_saturated_fraction,
        extra_fail=frac["critical_saturated"] > 0,
    )
    yield _fraction_check("overlap", MATCHES, frac["unmatched_edges"], config.max_unmatched_edge_fraction)


def _fraction_check(
    name: str, asset: dg.AssetKey, value: float, limit: float, extra_fail: bool = False
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=name,
        asset_key=asset,
        passed=value <= limit and not extra_fail,
        metadata={"fraction": round(value, 4), "limit": limit},
    )
