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
    # the storage consistency check reads every object back on a local root: its own job and schedule
    selection=dg.AssetSelection.groups("catalog")
    - dg.AssetSelection.checks(
        dg.AssetCheckKey(dg.AssetKey(["catalog", "metadata_catalog"]), "storage_consistency")
    ),
    description="Consolidate, export and check every catalog record.",
)

montage_job = dg.define_asset_job(
    "montage_job",
    selection=dg.AssetSelection.groups("acquisition", "montage"),
    description="One montage (a partition): tiles processed, matched and QC'd live, then laid out, fused "
    "and uploaded once its checks pass.",
    # two scopes' montages run at once (dagster.yaml); queued ahead of other runs when a slot frees
    tags={"em/workload": "acquisition", "dagster/priority": "10"},
)

simulation_job = dg.define_asset_job(
    "simulation_job",
    selection=dg.AssetSelection.groups("simulation") - dg.AssetSelection.assets(["simulation", "evaluation"]),
    description="One simulated cryo-ET tilt series (a partition `<spec>_<NNN>`): particles, sample, tilt series "
    "with its OME-Zarr and catalog record, ground truth.",
    tags={"em/workload": "simulation"},
)

cryo_job = dg.define_asset_job(
    "cryo_job",
    # simulation/evaluation (group simulation, as its key) is scored per tilt series, with the processing
    selection=dg.AssetSelection.groups("cryo") | dg.AssetSelection.assets(["simulation", "evaluation"]),
    description="One tilt series (a partition of cryo_tilt_series): motion correction, CTF, alignment, "
    "tomograms, denoising, thumbnails, results tables and, for simulated ones, the evaluation against truth.",
    tags={"em/workload": "cryo"},
)
