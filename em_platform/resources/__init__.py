"""Dagster resources, chosen per deployment (EM_DEPLOYMENT=local|docker), never by editing code."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from em_platform.resources.acquisition import AcquisitionHardware, BrokerScope, SimulatedScope
from em_platform.resources.catalog import CatalogResource
from em_platform.resources.cryo import CryoSessionsResource
from em_platform.resources.dask import DaskResource
from em_platform.resources.inbox import InboxResource
from em_platform.resources.simulation import SimulationSpecsResource
from em_platform.resources.storage import StorageResource
from em_platform.settings import Settings, load_settings
from em_platform.simulation.cryoet.session_copy import session_copies_root
from em_platform.simulation.scope_config import ScopeConfig

__all__ = [
    "AcquisitionHardware",
    "BrokerScope",
    "SimulatedScope",
    "CatalogResource",
    "DaskResource",
    "InboxResource",
    "SimulationSpecsResource",
    "CryoSessionsResource",
    "StorageResource",
    "build_resources",
]


def build_resources(settings: Settings | None = None, env: Mapping[str, str] | None = None) -> dict:
    """The resource set for the current deployment; the local one is the embedded default."""
    s = settings or load_settings(env)
    return {
        "storage": StorageResource(
            root_url=s.data_root,
            s3_endpoint_url=s.s3_endpoint_url,
            buffer_root=s.buffer,
            downloads_root=s.downloads,
            viewer_url=s.viewer_url,
        ),
        "catalog": CatalogResource(url=s.catalog_url),
        "dask": DaskResource(
            scheduler_address=s.dask_scheduler_address, compute=s.compute, data_root=s.data_root
        ),
        "inbox": InboxResource(path=s.inbox, settle_seconds=s.inbox_settle_seconds),
        "simulation_specs": SimulationSpecsResource(path=s.simulations),
        "cryo_sessions": CryoSessionsResource(
            sessions=s.cryo_sessions,
            # published stacks on a local data root; their local copies where the data root is S3
            simulation=str(
                session_copies_root(s.downloads) if "://" in s.data_root else Path(s.data_root) / "simulation"
            ),
        ),
        "hardware": BrokerScope(
            journal_url=s.catalog_url,
            broker=s.broker,
            pixel_size_nm=s.scope_pixel_size_nm,
            topic_prefix=s.broker_topic_prefix,
            username=s.broker_username,
            tile_shares=list(s.scope_shares),
        )
        if s.broker
        else SimulatedScope(
            journal_url=s.catalog_url,
            pixel_size_nm=s.scope_pixel_size_nm or ScopeConfig.model_fields["pixel_size_nm"].default,
            tile_shares=list(s.scope_shares),
        ),
    }
