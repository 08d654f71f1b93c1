"""The storage root as a resource: a local folder by default, s3:// in production."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from em_platform.storage import DataStore


class StorageResource(dg.ConfigurableResource):
    """Where every output goes; writes are staged and published atomically."""

    root_url: str
    s3_endpoint_url: str | None = None
    # Local folder for acquisition intermediates (processed tiles, the fused montage) until they are
    # uploaded to the root; default ``<root>/buffer`` when the root is a local folder.
    buffer_root: str | None = None
    # Local folder for public-dataset downloads (kept across failed runs so a re-run resumes); default
    # ``<root>/downloads`` when the root is a local folder.
    downloads_root: str | None = None

    def store(self) -> DataStore:
        options = {}
        if self.root_url.startswith("s3://") and self.s3_endpoint_url:
            options = {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}}
        return DataStore(self.root_url, options)

    def buffer(self) -> DataStore:
        """The local acquisition buffer, with the same staged, atomic writes as the root."""
        if self.buffer_root:
            return DataStore(self.buffer_root)
        store = self.store()
        if not store.is_local:
            raise ValueError(
                f"the storage root {self.root_url} is object storage: set EM_BUFFER to a local folder "
                "for the acquisition buffer"
            )
        return DataStore(store.path("buffer"))

    def downloads(self) -> Path:
        """The local download cache of the public-dataset ingests."""
        if self.downloads_root:
            return Path(self.downloads_root)
        store = self.store()
        if not store.is_local:
            raise ValueError(
                f"the storage root {self.root_url} is object storage: set EM_DOWNLOADS to a local folder "
                "for the download cache"
            )
        return Path(store.path("downloads"))
