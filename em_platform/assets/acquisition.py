"""Per-montage acquisition assets, processed live while the scope is still imaging.

One step streams the montage: tiles are taken from the journal as they land, processed on Dask,
matched and QC'd, and verdicts go back to the microscope at once. The five assets are what that step
produces; their blocking checks keep downstream montage assets (layout, fusion, upload) off a failed montage.
"""

from datetime import UTC, datetime

import dagster as dg

from em_platform.assets.presentation import (
    check_sentence,
    materialize_result,
    montage_check,
    montage_check_result,
)
from em_platform.assets.signals import gate_blocking_checks
from em_platform.partitions import montages
from em_platform.resources import DaskResource, StorageResource
from em_platform.resources.acquisition import AcquisitionHardware
from em_platform.storage.upload import abort_cleanup
from em_platform.tem.buffer_layout import MontageBuffer
from em_platform.tem.heap import keep_freed_memory
from em_platform.tem.judging import JudgingClaim, processed_tile_paths
from em_platform.tem.montage_run import MontageRunConfig, run_montage
from em_platform.tem.qc import QCConfig
from em_platform.tem.qc_summary import MontageLimits, MontageSummary

RAW, FLAT, PROCESSED, STATS, MATCHES = (
    dg.AssetKey(k) for k in ("raw_tiles", "flatfield", "processed_tiles", "tile_stats", "tile_matches")
)


class MontageProcessingConfig(dg.Config):
    """Run configuration (the launchpad shows these); QC thresholds are documented in ``tem/qc.py``."""

    stall_timeout_seconds: float = MontageRunConfig.stall_timeout_seconds
    poll_seconds: float = MontageRunConfig.poll_seconds
    late_tile_seconds: float = MontageRunConfig.late_tile_seconds
    status_every_seconds: float = MontageRunConfig.status_every_seconds
    write_tiffs: bool = False
    # False: tiles a killed or earlier run of this montage judged keep their verdicts (resumed from the journal)
    rejudge: bool = MontageRunConfig.rejudge
    min_std: float = QCConfig.min_std
    min_specimen_contrast: float = QCConfig.min_specimen_contrast
    saturated_fraction: float = QCConfig.saturated_fraction
    critical_saturated_fraction: float = QCConfig.critical_saturated_fraction
    max_focus: float = QCConfig.max_focus
    min_match_quality: float = QCConfig.min_match_quality
    # Montage-level checks: fraction of tiles (or edges) allowed to fail before the montage is rejected.
    max_out_of_focus_fraction: float = MontageLimits.max_out_of_focus_fraction
    max_unmatched_edge_fraction: float = MontageLimits.max_unmatched_edge_fraction
    max_blank_fraction: float = MontageLimits.max_blank_fraction
    max_saturated_fraction: float = MontageLimits.max_saturated_fraction

    def limits(self) -> MontageLimits:
        return MontageLimits(
            self.max_out_of_focus_fraction,
            self.max_unmatched_edge_fraction,
            self.max_blank_fraction,
            self.max_saturated_fraction,
        )

    def run_config(self) -> MontageRunConfig:
        return MontageRunConfig(
            poll_seconds=self.poll_seconds,
            stall_timeout_seconds=self.stall_timeout_seconds,
            late_tile_seconds=self.late_tile_seconds,
            status_every_seconds=self.status_every_seconds,
            write_tiffs=self.write_tiffs,
            rejudge=self.rejudge,
            limits=self.limits(),
            qc=QCConfig(
                min_std=self.min_std,
                min_specimen_contrast=self.min_specimen_contrast,
                saturated_fraction=self.saturated_fraction,
                critical_saturated_fraction=self.critical_saturated_fraction,
                max_focus=self.max_focus,
                min_match_quality=self.min_match_quality,
            ),
        )


def _check(name: str, asset: dg.AssetKey, description: str) -> dg.AssetCheckSpec:
    return montage_check(name, asset, description, blocking=True)


CHECKS = [
    _check(
        "acquisition_complete",
        RAW,
        "The scope completed the montage (a cancelled or failed one is cleaned up, not stitched).",
    ),
    _check("focus", STATS, "Fraction of out-of-focus tiles is within the limit."),
    _check(
        "blank_tiles",
        STATS,
        "Fraction of blank and no-tissue (film or resin only) tiles is within the limit.",
    ),
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
    _check(
        "tiles_received",
        RAW,
        "Every tile montage.complete names reached the platform (else the montage would have a hole).",
    ),
]
CHECK_ASSET = {
    "focus": STATS,
    "blank_tiles": STATS,
    "saturated_tiles": STATS,
    "overlap": MATCHES,
    "tiles_received": RAW,
}


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
    # no op pool: the live step of every scope's montage runs at once (dagster.yaml limits them per run)
)
@gate_blocking_checks
def montage_tiles(
    context: dg.AssetExecutionContext,
    config: MontageProcessingConfig,
    hardware: AcquisitionHardware,
    storage: StorageResource,
    dask: DaskResource,
):
    montage_id = context.partition_key
    store = storage.buffer()  # local until montage_upload moves it to the storage root
    # the same staging for every judge of this montage: the live service, this run, a retry of it
    final, staging = processed_tile_paths(store, montage_id)
    tiff_dir = MontageBuffer(store.path(montage_id)).processed_tiffs if config.write_tiffs else None
    keep_freed_memory()  # this run process judges tile after tile: their arrays from the heap (tem.heap)
    client = dask.get_client()
    source = hardware.tile_source()
    # one judge at a time: while the live-QC service judges this montage, the run waits, then resumes
    claim = JudgingClaim(hardware.journal(), montage_id, f"run {context.run_id}")
    claim.wait(
        on_waiting=lambda holder: context.log.info(
            f"montage {montage_id} is judged live by {holder}; this run records it when that ends"
        )
    )
    try:
        if not config.rejudge and store.is_local and store.take_back(final, staging):
            context.log.info(
                f"montage {montage_id}: processed tiles of an earlier run taken back to resume from"
            )
        result = run_montage(
            montage_id,
            source,
            client,
            processed_url=store.to_url(staging),
            storage_options=store.storage_options or None,
            tiff_dir=tiff_dir,
            announce_url=store.to_url(final),
            config=config.run_config(),
            logger=context.log,
        )
        row = hardware.montage(montage_id)
        assert row is not None  # the journal's montage this run just processed
        state = row.state
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
    finally:
        source.close()  # what is still queued for the broker goes out first
        claim.release()
    summary = MontageSummary.of(result)
    # where montage_upload puts it
    stored = MontageBuffer(storage.store().url("acquisition", montage_id)).processed_tiles
    yield from _results(summary, stored)
    for check in summary.checks(config.limits()):
        yield montage_check_result(
            montage_id,
            check_name=check.name,
            asset_key=CHECK_ASSET[check.name],
            passed=check.passed,
            metadata=check.metadata,
            description=check.description,
        )
    yield montage_check_result(
        montage_id,
        check_name="acquisition_complete",
        asset_key=RAW,
        passed=state == "completed",
        description=check_sentence(
            f"the scope reported the montage {state}",
            "completed",
            state == "completed",
            "the acquisition stopped before its end (montage.status): acquire the rest again, or accept the "
            "montage as it is knowing its checks say what is missing",
        ),
        metadata={"state": state},
    )


def _rounded(value: float | None, digits: int) -> float:
    return round(value, digits) if value is not None else -1.0


def _results(s: MontageSummary, processed_url: str):
    rows, cols = s.grid
    yield materialize_result(
        asset_key=RAW,
        metadata={
            "tiles": s.tiles,
            "grid": f"{rows} x {cols}",
            "missing": dg.MetadataValue.json([list(p) for p in s.missing]),
            "not_received": dg.MetadataValue.json(sorted(s.not_received)),
            "seconds": round(s.seconds, 2),
            "tiles_per_second": round(s.tiles_per_second, 2),
            "polling_since": datetime.fromtimestamp(s.polling_since or 0, UTC).isoformat(),
            # pixel size and rotation that turned stage positions into search centres, fixed for the run
            "stage_calibration": dg.MetadataValue.json(s.calibration),
            "cpu_ms_per_tile": dg.MetadataValue.json(
                {stage: round(1000 * v / max(s.tiles, 1), 2) for stage, v in sorted(s.cpu.items())}
            ),
            # where each tile's latency (tile.raw journaled -> qc.tile journaled) went, per stage
            "latency_ms_by_stage": dg.MetadataValue.json(s.latency_ms),
        },
    )
    yield materialize_result(asset_key=FLAT, metadata={"flatfield": dg.MetadataValue.json(s.flatfield)})
    yield materialize_result(
        asset_key=PROCESSED,
        metadata={
            "path": dg.MetadataValue.path(processed_url),
            "processed": s.processed,
            "failed": len(s.failures),
            "failures": dg.MetadataValue.json(s.failures),
        },
    )
    yield materialize_result(
        asset_key=STATS,
        metadata={
            "qc_status": s.qc["status"],
            "qc_reason": s.qc["reason"] or "",
            "tiles_passed": s.qc["passed"],
            "faults": dg.MetadataValue.json(s.qc["faults"]),
            "focus_median": _rounded(s.focus_median, 4),
            "mean_intensity": _rounded(s.mean_intensity, 2),
        },
    )
    yield materialize_result(
        asset_key=MATCHES,
        metadata={
            "edges": s.edges,
            "matched": s.matched,
            "median_distance_px": _rounded(s.median_distance_px, 2),
        },
    )
