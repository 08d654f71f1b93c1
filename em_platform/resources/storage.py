"""The storage root as a resource: a local folder by default, s3:// in production.

Every default (where the buffer and the download cache live, the S3 endpoint options) is decided once, by
:mod:`em_platform.settings`; :func:`em_platform.resources.build_resources` passes them in.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from em_platform.storage import DataStore, storage_options_for


class StorageResource(dg.ConfigurableResource):
    """Where every output goes; writes are staged and published atomically."""

    root_url: str
    s3_endpoint_url: str | None = None
    # Local folder for acquisition intermediates (processed tiles, the fused montage) until they are
    # uploaded to the root (settings: EM_BUFFER).
    buffer_root: str
    # Local folder for public-dataset downloads, kept across failed runs so a re-run resumes
    # (settings: EM_DOWNLOADS).
    downloads_root: str
    # A storage outage (the root does not answer) is retried within the run: this many times, the first
    # after this many seconds, doubling each time (5 retries from 15 s ride out about 8 minutes).
    outage_retries: int = 5
    outage_retry_seconds: float = 15.0
    # where browsers reach `em-platform viewer` (settings: EM_VIEWER_URL); images get links to it
    viewer_url: str = ""

    def store(self) -> DataStore:
        return DataStore(self.root_url, storage_options_for(self.root_url, self.s3_endpoint_url))

    def buffer(self) -> DataStore:
        """The local acquisition buffer, with the same staged, atomic writes as the root."""
        return DataStore(self.buffer_root)

    def cryo_root(self) -> Path:
        """Cryo processing outputs: ``<data root>/cryo`` (local), else the local buffer's ``cryo`` folder."""
        store = self.store()
        return Path(store.path("cryo")) if store.is_local else Path(self.buffer().path("cryo"))

    def cryo_live_root(self) -> Path:
        """cryo-live's outputs (a live session's, a tilt series' tilts corrected as they landed)."""
        return self.cryo_root() / "live"

    def downloads(self) -> Path:
        """The local download cache of the public-dataset ingests."""
        return Path(self.downloads_root)

    def viewer_link(self, image_url: str, read_from: str | None = None) -> str:
        """The Neuroglancer link that opens the stored OME-Zarr at ``image_url`` (see em_platform.viewer);
        ``read_from``: the same image in the local buffer, for a link made before it is uploaded."""
        from em_platform.viewer.links import link_for

        if not self.viewer_url:
            raise ValueError("no viewer address: set EM_VIEWER_URL")
        store = self.store()
        return link_for(
            image_url, self.viewer_url, store.url(), store.storage_options or None, read_from=read_from
        )
