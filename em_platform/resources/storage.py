"""The storage root as a resource: a local folder by default, s3:// in production."""

from __future__ import annotations

import dagster as dg

from em_platform.storage import DataStore


class StorageResource(dg.ConfigurableResource):
    """Where every output goes; writes are staged and published atomically."""

    root_url: str
    s3_endpoint_url: str | None = None

    def store(self) -> DataStore:
        options = {}
        if self.root_url.startswith("s3://") and self.s3_endpoint_url:
            options = {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}}
        return DataStore(self.root_url, options)
