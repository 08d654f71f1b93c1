"""Everything the platform writes goes under one fsspec root URL, and is published atomically.

Writers put data under a staging name (``<root>/.staging/<uuid>/...``) and call :meth:`DataStore.publish`
when it is complete. On a local file system publish is a rename (atomic). On object storage there is no
rename, so publish copies every object to its final key and writes the root ``zarr.json`` last: a zarr
reader cannot open the group until that object exists, so nobody ever sees half an image.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from em_platform.edge import join_key

STAGING = ".staging"
ROOT_MARKER = "zarr.json"


def storage_options_for(root_url: str, s3_endpoint_url: str | None) -> dict[str, Any]:
    """fsspec options for a storage root: an S3-compatible endpoint when one is set (credentials come
    from the usual AWS_* variables), nothing for a local folder."""
    if root_url.startswith("s3://") and s3_endpoint_url:
        return {"client_kwargs": {"endpoint_url": s3_endpoint_url}}
    return {}


class DataStore:
    """A storage root URL plus the fsspec file system that serves it."""

    def __init__(self, root_url: str, storage_options: dict[str, Any] | None = None):
        if not root_url:
            raise ValueError("storage root URL is empty; set EM_DATA_ROOT to a folder or an s3:// URL")
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(root_url, **self.storage_options)
        self.root = root.rstrip("/") or "/"
        self.protocol = self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.fs.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"DataStore({self.url()!r})"

    # -- names ------------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """File-system path (no protocol) of ``parts`` under the root.

        Each part is checked (:func:`em_platform.edge.join_key`): an absolute part or a ``..`` segment is
        refused, so a name from outside (a montage id, a partition key) can never leave the root.
        """
        return join_key(self.root, *parts, field="storage path") if parts else self.root

    def url(self, *parts: str) -> str:
        """Full URL of ``parts`` under the root (what zarr and readers open)."""
        p = self.path(*parts)
        return p if self.is_local else f"{self.protocol}://{p}"

    def staging_path(self, name: str, *, resumable_as: str | None = None) -> str:
        """A fresh staging location for something that will be published as ``name``; with
        ``resumable_as``, the same location for every run that passes that key, so a killed run's partial
        output is there for the run that retries it."""
        return self.path(STAGING, resumable_as or uuid.uuid4().hex, posixpath.basename(name))

    def to_url(self, path: str) -> str:
        return path if self.is_local else f"{self.protocol}://{path}"

    # -- operations ---------------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def reachable(self) -> bool:
        """Whether the root answers now (a listing of it, not from cache): False while the object store or
        the file server is down. See :func:`em_platform.storage.outage.storage_outage`."""
        try:
            self.fs.invalidate_cache(self.root)
            self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return not self.is_local  # an empty prefix on S3 is no folder; a missing local root is gone
        except Exception:
            return False
        return True

    def remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def publish(self, staging: str, final: str) -> None:
        """Make the complete object or tree at ``staging`` appear at ``final``, replacing what was there."""
        if self.is_local:
            self._publish_local(staging, final)
        else:
            self._publish_object_store(staging, final)
        self._drop_empty_staging_parent(staging)

    def take_back(self, final: str, staging: str) -> bool:
        """Move what was published at ``final`` back to ``staging`` (which must not exist) so a retried run
        resumes from it and publishes it again; False when there is nothing at ``final``. A local buffer
        only (one rename: a kill leaves it at one place or the other, never half)."""
        import os

        if not self.is_local:
            raise ValueError("take_back moves within a local buffer, not an object store")
        if os.path.exists(staging) or not os.path.exists(final):
            return False
        os.makedirs(os.path.dirname(staging), exist_ok=True)
        os.replace(final, staging)
        return True

    def _publish_local(self, staging: str, final: str) -> None:
        import os
        import shutil

        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.isdir(staging) and os.path.exists(final):
            # Two renames: the old tree steps aside, the new one steps in; then the old one goes.
            old = f"{final}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
        else:
            os.replace(staging, final)

    def _publish_object_store(self, staging: str, final: str) -> None:
        fs = self.fs
        if not fs.isdir(staging):
            fs.copy(staging, final)
            fs.rm(staging)
            return
        if fs.exists(final):
            marker = posixpath.join(final, ROOT_MARKER)
            if fs.exists(marker):
                fs.rm(marker)  # the old image becomes unopenable before any of its objects change
            fs.rm(final, recursive=True)
        keys = [k for k in fs.find(staging) if not k.endswith("/")]
        root_marker = posixpath.join(staging, ROOT_MARKER)
        for key in sorted(keys, key=lambda k: k == root_marker):  # root zarr.json last
            fs.copy(key, posixpath.join(final, posixpath.relpath(key, staging)))
        fs.rm(staging, recursive=True)

    def _drop_empty_staging_parent(self, staging: str) -> None:
        parent = posixpath.dirname(staging)
        if posixpath.dirname(parent) == self.path(STAGING) and self.fs.exists(parent):
            try:
                if not self.fs.ls(parent):
                    self.fs.rm(parent, recursive=True)
            except FileNotFoundError:
                pass

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a small file atomically (staging + publish)."""
        staging = self.staging_path(path)
        self.fs.makedirs(posixpath.dirname(staging), exist_ok=True)
        with self.fs.open(staging, "wb") as f:
            f.write(data)
        self.publish(staging, path)

    def write_json(self, path: str, doc: Any) -> None:
        self.write_bytes(path, json.dumps(doc, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.load(f)
