"""The one Dagster code location: every asset, check, sensor, job and resource of em_platform."""

from __future__ import annotations

import dagster as dg

from em_platform.assets.acquisition import montage_tiles
from em_platform.assets.catalog import metadata_catalog
from em_platform.assets.cryo import cryo_assets
from em_platform.assets.cryo_live import cryo_session_job, session
from em_platform.assets.ingest_local import ingest_local
from em_platform.assets.ingest_public import (
    public_ingest_assets,
    public_ingest_jobs,
    public_ingest_schedules,
)
from em_platform.assets.montage import lens_correction, montage, montage_layout, montage_upload
from em_platform.assets.simulation import simulation_assets
from em_platform.assets.simulation_evaluation import evaluation
from em_platform.assets.storage_consistency import (
    storage_consistency,
    storage_consistency_job,
    storage_consistency_schedule,
)
from em_platform.jobs import catalog_job, cryo_job, ingest_local_job, montage_job, simulation_job
from em_platform.resources import build_resources
from em_platform.retention_job import build_retention
from em_platform.sensors.cryo import cryo_sensor
from em_platform.sensors.cryo_sessions import cryo_session_sensor
from em_platform.sensors.dead_letters import dead_letter_sensor
from em_platform.sensors.inbox import inbox_sensor
from em_platform.sensors.montage import montage_sensor
from em_platform.sensors.recovery import recovery_sensors
from em_platform.sensors.simulation import simulation_sensor

catalog_automation = dg.AutomationConditionSensorDefinition(
    "catalog_automation",
    target=dg.AssetSelection.groups("catalog"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Refreshes the metadata catalog after ingests (declarative automation).",
)


def build_definitions(resources: dict) -> dg.Definitions:
    """Everything, bound to one resource set (tests pass their own)."""
    assets = [
        ingest_local,
        *public_ingest_assets,
        metadata_catalog,
        montage_tiles,
        montage_layout,
        montage,
        montage_upload,
        lens_correction,
        *simulation_assets,
        *cryo_assets,
        evaluation,
        session,
    ]
    # what the retention job keeps a run for: a partition of these that still exists, their latest materialization
    retention_job, retention_schedule = build_retention(assets)
    return dg.Definitions(
        assets=assets,
        asset_checks=[storage_consistency],
        jobs=[
            ingest_local_job,
            *public_ingest_jobs,
            catalog_job,
            montage_job,
            simulation_job,
            cryo_job,
            cryo_session_job,
            storage_consistency_job,
            retention_job,
        ],
        schedules=[*public_ingest_schedules, storage_consistency_schedule, retention_schedule],
        sensors=[
            inbox_sensor,
            montage_sensor,
            catalog_automation,
            simulation_sensor,
            cryo_sensor,
            cryo_session_sensor,
            dead_letter_sensor,
            *recovery_sensors,
        ],
        resources=resources,
        # Every job is one step or a chain, and the pixel parallelism is Dask's: a process per step (the
        # multiprocess default) would only import the code location again for each step (~8 CPU s apiece,
        # 4 times per montage run, in each run container of the Docker deployment).
        executor=dg.in_process_executor,
    )


defs = build_definitions(build_resources())
