"""The one Dagster code location: every asset, check, sensor, job and resource of em_platform."""

from __future__ import annotations

import dagster as dg

from em_platform.assets.acquisition import montage_tiles
from em_platform.assets.catalog import metadata_catalog
from em_platform.assets.ingest_local import ingest_local
from em_platform.assets.ingest_public import (
    public_ingest_assets,
    public_ingest_jobs,
    public_ingest_schedules,
)
from em_platform.assets.montage import montage, montage_layout, montage_upload
from em_platform.jobs import catalog_job, ingest_local_job, montage_job
from em_platform.resources import build_resources
from em_platform.sensors.inbox import inbox_sensor
from em_platform.sensors.montage import montage_sensor

catalog_automation = dg.AutomationConditionSensorDefinition(
    "catalog_automation",
    target=dg.AssetSelection.groups("catalog"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Refreshes the metadata catalog after ingests (declarative automation).",
)


def build_definitions(resources: dict) -> dg.Definitions:
    """Everything, bound to one resource set (tests pass their own)."""
    return dg.Definitions(
        assets=[
            ingest_local,
            *public_ingest_assets,
            metadata_catalog,
            montage_tiles,
            montage_layout,
            montage,
            montage_upload,
        ],
        jobs=[ingest_local_job, *public_ingest_jobs, catalog_job, montage_job],
        schedules=public_ingest_schedules,
        sensors=[inbox_sensor, montage_sensor, catalog_automation],
        resources=resources,
    )


defs = build_definitions(build_resources())
