"""Asset jobs (what sensors, schedules and `dagster job backfill` target)."""

import dagster as dg

ingest_local_job = dg.define_asset_job(
    "ingest_local_job",
    selection=dg.AssetSelection.assets(["ingest", "local"]),
    description="Convert one inbox entry (a partition) to OME-Zarr and catalog it.",
    tags={"em/workload": "ingest", "em/ingest-weight": "heavy"},
)

catalog_job = dg.define_asset_job(
    "catalog_job",
    selection=dg.AssetSelection.groups("catalog"),
    description="Consolidate, export and check every catalog record.",
)

montage_job = dg.define_asset_job(
    "montage_job",
    selection=dg.AssetSelection.groups("acquisition", "montage"),
    description="One montage (a partition): tiles processed, matched and QC'd live, then laid out, fused "
    "and uploaded once its checks pass.",
    tags={"em/workload": "acquisition"},
)
