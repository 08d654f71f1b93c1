"""Do the storage root's objects still back the catalog? Every ``complete`` record against what it names.

A catalog that says ``complete`` while the object store lost the data (a restarted S3 server, a deleted
prefix, a corrupted object) is silent data loss. :func:`check_consistency` takes the complete records
(plain dicts, as the catalog stores them) and, for each, the objects it names under the storage root
(``files.volume``, ``thumbnail``, ``metadata``, ``raw``, ``additional``):

* **presence** of every one of them; an OME-Zarr image counts as present when its group and every level
  the record lists (``metadata.ome_zarr.levels``) still have their zarr metadata;
* **checksums** where the platform recorded them: an upload manifest (``upload-manifest.json``, size and
  MD5 of every object, :mod:`em_platform.storage.upload`) beside the record's volume, which every
  archived montage has, is verified object by object (S3: the listed ETags, no download; a folder: MD5
  of the bytes read back). Ingests and simulated stacks record the sha256 of their *source* files, not of
  what they published: their objects are checked for presence only, and the report says which records
  those are.

Objects a record names outside the storage root cannot be checked here; they are listed, not failed.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from em_platform.storage.store import DataStore
from em_platform.storage.upload import MANIFEST_NAME, verify_upload

NAMED = ("volume", "thumbnail", "metadata", "raw")
ZARR_METADATA = ("zarr.json", ".zgroup", ".zarray")  # zarr v3, v2 group, v2 array


@dataclass(frozen=True)
class RecordAudit:
    """One complete record against the storage root."""

    record_id: str
    name: str  # "<source>/<source_id>", how an operator finds it
    objects: int  # objects (files, images, manifest entries) looked at
    checksummed: int  # of them, verified against a recorded checksum
    missing: tuple[str, ...] = ()
    corrupted: tuple[str, ...] = ()
    elsewhere: tuple[str, ...] = ()  # named outside the storage root: not checked here

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupted


@dataclass(frozen=True)
class ConsistencyReport:
    root: str
    audits: list[RecordAudit] = field(default_factory=list)

    @property
    def problems(self) -> list[RecordAudit]:
        return [a for a in self.audits if not a.ok]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def presence_only(self) -> list[str]:
        """Records none of whose objects has a recorded checksum (checked for presence only)."""
        return [a.name for a in self.audits if a.checksummed == 0]

    def summary(self) -> str:
        checked = sum(a.objects for a in self.audits)
        summed = sum(a.checksummed for a in self.audits)
        head = (
            f"{len(self.audits)} complete record(s), {checked} object(s) in {self.root}: {summed} verified "
            f"against recorded checksums, the rest (records of {len(self.presence_only)}) for presence only"
        )
        if self.ok:
            return head + "; all present and intact"
        shown = []
        for a in self.problems[:10]:
            parts = [f"missing {', '.join(a.missing[:3])}"] if a.missing else []
            parts += [f"corrupted {', '.join(a.corrupted[:3])}"] if a.corrupted else []
            shown.append(f"{a.name}: " + "; ".join(parts))
        return f"{len(self.problems)} record(s) name lost objects: " + " | ".join(shown) + f" ({head})"


def check_consistency(
    records: Iterable[Mapping[str, Any]], store: DataStore, *, workers: int = 8
) -> ConsistencyReport:
    """Audit every ``complete`` record in ``records`` against ``store`` (see the module docstring)."""
    complete = [r for r in records if r.get("status") == "complete"]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="consistency") as pool:
        audits = list(pool.map(lambda r: _audit(r, store), complete))
    return ConsistencyReport(store.url(), audits)


def _audit(record: Mapping[str, Any], store: DataStore) -> RecordAudit:
    files = record.get("files") or {}
    urls = [files[k] for k in NAMED if isinstance(files.get(k), str)]
    urls += [v for v in (files.get("additional") or {}).values() if isinstance(v, str)]
    name = f"{record.get('source')}/{record.get('source_id')}"
    inside: list[tuple[str, str]] = []
    elsewhere: list[str] = []
    for url in dict.fromkeys(urls):
        path = _path_in(store, url)
        if path is None:
            elsewhere.append(url)
        else:
            inside.append((url, path))
    missing = [url for url, path in inside if not _present(store, path, record, url == files.get("volume"))]
    objects, checksummed, corrupted = len(inside), 0, []
    volume = files.get("volume")
    manifest_dir = _path_in(store, posixpath.dirname(volume)) if isinstance(volume, str) else None
    if manifest_dir is not None and store.exists(posixpath.join(manifest_dir, MANIFEST_NAME)):
        audit = verify_upload(store.to_url(manifest_dir), storage_options=store.storage_options or None)
        base = store.to_url(manifest_dir).rstrip("/")
        objects += audit.objects_checked
        checksummed = audit.objects_checked - len(audit.missing)
        missing += [f"{base}/{k}" for k in audit.missing]
        corrupted += [f"{base}/{k}" for k in audit.corrupted]
    return RecordAudit(
        str(record.get("id")),
        name,
        objects,
        checksummed,
        tuple(dict.fromkeys(missing)),
        tuple(corrupted),
        tuple(elsewhere),
    )


def _path_in(store: DataStore, url: str) -> str | None:
    """``url`` as a path of the store's file system when it lies under the storage root, else None."""
    prefix = f"{store.protocol}://"
    if store.is_local:
        if "://" in url and not url.startswith("file://"):
            return None
        path = posixpath.normpath(url.removeprefix("file://"))
    elif url.startswith(prefix):
        path = posixpath.normpath(url[len(prefix) :])
    else:
        return None
    return path if path == store.root or path.startswith(store.root.rstrip("/") + "/") else None


def _present(store: DataStore, path: str, record: Mapping[str, Any], is_volume: bool) -> bool:
    """The object is there; an OME-Zarr image with its group's and its levels' zarr metadata."""
    if not path.endswith(".zarr"):
        return store.exists(path)
    if not _zarr_node(store, path):
        return False
    levels = (record.get("metadata") or {}).get("ome_zarr", {}).get("levels", []) if is_volume else []
    return all(_zarr_node(store, posixpath.join(path, str(level["path"]))) for level in levels)


def _zarr_node(store: DataStore, path: str) -> bool:
    return any(store.exists(posixpath.join(path, marker)) for marker in ZARR_METADATA)
