"""The acquisition buffer (``EM_BUFFER``) kept in bounds: which montage folders go, and which never do.

A montage's folder (``<buffer>/<montage id>/``: processed tiles, layout, fused montage, metadata) is a working
copy: ``montage_upload`` frees the files it uploaded once the archive verifies (unless asked to keep them), and
a montage the scope aborted is cleaned up by its run. What is left over (``free_buffer: false``, a run that
failed after processing, files the upload does not take such as ``write_tiffs``' TIFFs, the resumable staging
``.staging/montage-<id>`` and the staging of a killed write) grew without a bound before this policy:

* a montage **in flight** is never touched: the journal holds it in progress, a run of it is queued or running
  or ran within the window, the live-QC service holds its judging claim, or something in its folder changed
  within the window;
* an **archived** montage (its catalog record ``complete`` before the window) loses its folder once the archive
  verifies against the upload manifest (:func:`~em_platform.storage.upload.free_buffer`, which deletes nothing
  when it does not); what the upload did not take goes with it;
* a montage **never archived** (failed, abandoned) loses its folder only while every raw tile the journal
  names is still on disk, so a run of it makes it again; otherwise the folder is the only copy of its pixels
  and is kept, and said so;
* a folder of no montage the journal knows, a name the platform reserves (the cryo work root when the data root
  is object storage), a file, and any symlink are never touched; nothing is deleted through a link.

Dagster-free: ``retention_job`` passes which montages have runs (``busy``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.status import Status
from em_platform.edge import MONTAGE_ID, Refused
from em_platform.retention.files import NotFollowed, changed_since, checked, remove
from em_platform.sql import aware
from em_platform.storage.store import STAGING
from em_platform.storage.upload import UploadIncomplete, free_buffer
from em_platform.tem.archive import SOURCE
from em_platform.tem.buffer_layout import UPLOADED
from em_platform.tem.journal import Journal, MontageRow

RESUMABLE = "montage-"  # .staging/montage-<id>: a montage's processed tiles a killed run left to resume from


@dataclass
class BufferReport:
    """What the policy did: montages whose folders went, bytes freed, and what it kept and why."""

    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept: dict[str, str] = field(default_factory=dict)  # folder (relative to the buffer) -> why
    warnings: list[str] = field(default_factory=list)  # what an operator should look at


def apply_buffer_policy(
    buffer_root: str | os.PathLike,
    *,
    journal: Journal,
    catalog: CatalogDB,
    before: datetime,
    busy: Collection[str],
    archive_url: Callable[[str], str],
    storage_options: Mapping[str, Any] | None = None,
    reserved: Collection[str] = (),
    now: datetime | None = None,
) -> BufferReport:
    """Let go of the buffer folders the module's policy no longer keeps; idempotent.

    ``before``: the window's start (nothing changed since is touched); ``busy``: montages with a run queued,
    running, or ended since ``before``; ``archive_url(id)``: where ``montage_upload`` put the montage.
    """
    root, now = Path(buffer_root), now or datetime.now(UTC)
    report = BufferReport()
    if not root.is_dir():
        return report
    folders: dict[str, list[str]] = {}  # montage id -> its folders, relative to the root
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name == STAGING:
            _staging(root, before, folders, report)
        elif entry.name in reserved or entry.name.startswith("."):
            continue
        elif entry.is_symlink():
            report.kept[entry.name] = "a symlink: never followed"
            report.warnings.append(f"buffer entry {entry.path} is a symlink: not followed, kept")
        elif entry.is_dir(follow_symlinks=False) and _montage_id(entry.name):
            folders.setdefault(entry.name, []).insert(0, entry.name)
        else:
            report.kept[entry.name] = "not a montage's folder"
    records = catalog.statuses(SOURCE, folders)
    for montage_id, rels in folders.items():
        record = records.get(montage_id)
        why = _kept_because(root, montage_id, rels, journal, record, before, busy, now, report.warnings)
        if why is None and record is not None and record[0] == Status.COMPLETE:
            why = _free_archived(root, montage_id, rels, archive_url(montage_id), storage_options, report)
        if why is not None:
            report.kept.update(dict.fromkeys(rels, why))
            continue
        for rel in rels:
            report.freed_bytes += _remove(root, rel, report)
        report.removed.append(montage_id)
    return report


def _montage_id(name: str) -> bool:
    try:
        MONTAGE_ID.check(name, "montage_id")
    except Refused:
        return False
    return True


def _staging(root: Path, before: datetime, folders: dict[str, list[str]], report: BufferReport) -> None:
    """A montage's resumable staging joins its folder; the staging of a killed write goes after the window."""
    if os.path.islink(root / STAGING):
        report.kept[STAGING] = "a symlink: never followed"
        return
    for entry in sorted(os.scandir(root / STAGING), key=lambda e: e.name):
        rel = f"{STAGING}/{entry.name}"
        montage_id = entry.name.removeprefix(RESUMABLE)
        if entry.is_symlink():
            report.kept[rel] = "a symlink: never followed"
        elif entry.name.startswith(RESUMABLE) and _montage_id(montage_id):
            folders.setdefault(montage_id, []).append(rel)
        elif changed_since(Path(entry.path), before.timestamp()):
            report.kept[rel] = "a write within the window"
        else:
            report.freed_bytes += _remove(root, rel, report)


def _kept_because(
    root: Path,
    montage_id: str,
    rels: list[str],
    journal: Journal,
    record: tuple[str, datetime] | None,
    before: datetime,
    busy: Collection[str],
    now: datetime,
    warnings: list[str],
) -> str | None:
    """Why the montage's folders stay (None: they may go)."""
    montage: MontageRow | None = journal.montage(montage_id)
    if montage is None:
        return "a montage the journal does not know"
    if montage_id in busy:
        return "in flight: a run of it is queued, running or ended within the window"
    if not montage.finished:
        return f"in flight: the journal holds it {montage.state}"
    claim = journal.judging(montage_id)
    if claim is not None and claim[1] > now:
        return f"in flight: judged live by {claim[0]}"
    if record is not None and record[1] >= before:
        return f"its catalog record changed within the window ({record[0]})"
    archived = record is not None and record[0] == Status.COMPLETE
    if not archived and aware(montage.updated_at) >= before:
        return "its journal row changed within the window"
    if any(changed_since(root / rel, before.timestamp()) for rel in rels):
        return "written within the window"
    if archived:
        return None
    raw = [t.path for t in journal.tiles(montage_id)]
    missing = [p for p in raw if not (p and os.path.isfile(p))]
    if not raw:
        return "never archived, and the journal names no raw tile to make it again from"
    if missing:
        why = f"never archived and {len(missing)} raw tile(s) are gone (e.g. {missing[0]}): the only copy"
        warnings.append(f"montage {montage_id}: its buffer folder is kept: {why}")
        return why
    return None


def _free_archived(
    root: Path,
    montage_id: str,
    rels: list[str],
    dest_url: str,
    storage_options: Mapping[str, Any] | None,
    report: BufferReport,
) -> str | None:
    """Delete the archived montage's uploaded files once the archive verifies; why not, if it does not."""
    if montage_id not in rels or not any((root / montage_id / name).exists() for name in UPLOADED):
        return None  # nothing uploaded is left here: nothing to verify against
    try:
        folder = checked(root, montage_id)
        report.freed_bytes += free_buffer(folder, dest_url, storage_options=storage_options)
    except NotFollowed as exc:
        return str(exc)
    except (UploadIncomplete, FileNotFoundError) as exc:
        report.warnings.append(f"montage {montage_id}: its buffer folder is kept: {exc}")
        return "archived, but the archive does not verify against its upload manifest"
    except Exception as exc:  # the storage root does not answer: tomorrow's run checks again
        report.warnings.append(
            f"montage {montage_id}: its archive could not be checked, its buffer kept: {exc}"
        )
        return "archived, but its archive could not be checked"
    return None


def _remove(root: Path, rel: str, report: BufferReport) -> int:
    try:
        return remove(checked(root, rel)) if os.path.lexists(root / rel) else 0
    except NotFollowed as exc:
        report.kept[rel] = str(exc)
        report.warnings.append(str(exc))
        return 0
