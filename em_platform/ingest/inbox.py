"""What is waiting in the inbox folder, and whether it has finished arriving.

Each top-level entry is one dataset: a supported file, or a folder of image files (TIFF slices of one
stack, or a collection of images: see :func:`em_platform.ingest.local.ingest_entry`). An entry
is settled once nothing in it has been modified for ``settle_seconds``: a file still being copied keeps
getting newer, so it is left for a later tick. Hidden files and the usual partial-download names are
never entries.

The inbox is an edge (:mod:`em_platform.edge`): an entry whose name is not one safe file name, or that is
or holds a symlink resolving outside the inbox, is returned *refused* (never ingested; the sensor
dead-letters it). A symlink that resolves inside the inbox is followed: it cannot show anything the inbox
does not already hold.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from em_platform.edge import Refused, check_file_name, inside
from em_platform.formats import SUPPORTED_SUFFIXES
from em_platform.formats.image_set import natural_key
from em_platform.formats.raw import RAW_SUFFIXES, sidecar_for

PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", ".filepart", "~")


@dataclass(frozen=True)
class InboxEntry:
    key: str  # the partition key: the entry's name in the inbox
    path: Path
    fingerprint: str  # changes whenever any byte may have changed (sizes and mtimes of every file)
    newest_mtime: float
    files: tuple[Path, ...]
    refused: Refused | None = None  # not to be ingested: the name or a symlink fails the edge checks

    def settled(self, now: float, settle_seconds: float) -> bool:
        return now - self.newest_mtime >= settle_seconds


def _is_partial(name: str) -> bool:
    return name.startswith(".") or name.endswith(PARTIAL_SUFFIXES)


COLLECTION_SUFFIX = ".collection"


def folder_images(folder: Path) -> tuple[Path, ...]:
    """The image files of a folder entry, in natural name order (hidden and partial files left out)."""
    return tuple(
        sorted(
            (
                p
                for p in folder.iterdir()
                if p.is_file() and not _is_partial(p.name) and p.suffix.lower() in SUPPORTED_SUFFIXES
            ),
            key=lambda p: natural_key(p.name),
        )
    )


def is_section_stack(folder: Path, files: tuple[Path, ...]) -> bool:
    """A folder is a stack of sections when it holds only TIFF slices and is not named ``*.collection``."""
    return not folder.name.endswith(COLLECTION_SUFFIX) and all(
        f.suffix.lower() in (".tif", ".tiff") for f in files
    )


def entry_files(path: Path) -> tuple[Path, ...]:
    """The source files that make up an inbox entry (a raw file's JSON sidecar included)."""
    if path.is_dir():
        return folder_images(path)
    if path.suffix.lower() in RAW_SUFFIXES and sidecar_for(path).exists():
        return (path, sidecar_for(path))
    return (path,)


def checked_entry_files(path: Path, inbox: Path) -> tuple[Path, ...]:
    """The entry's files, after the edge checks: a safe name, and the entry and every file it is made of
    resolve inside the inbox (symlinks followed). Raises :class:`~em_platform.edge.Refused`."""
    try:
        name = str(path.relative_to(inbox))
    except ValueError:
        raise Refused("entry", str(path), f"not in the inbox {inbox}") from None
    check_file_name(name, "entry")  # one name: no '..', no sub-folder
    inside(inbox, name, field="entry")
    files = entry_files(path)
    for f in files:
        inside(inbox, f.relative_to(inbox), field="entry file")
    return files


def _refused_entry(path: Path, exc: Refused) -> InboxEntry:
    st = path.lstat()
    target = os.readlink(path) if path.is_symlink() else ""
    digest = hashlib.sha1(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0{target}\0{exc}".encode())
    return InboxEntry(path.name, path, digest.hexdigest()[:16], st.st_mtime, (), refused=exc)


def _entry(path: Path, inbox: Path) -> InboxEntry | None:
    if _is_partial(path.name):
        return None
    try:
        check_file_name(path.name, "entry")
        inside(inbox, path.name, field="entry")
    except Refused as exc:
        return _refused_entry(path, exc)
    if path.is_dir():
        if any(_is_partial(p.name) for p in path.iterdir() if not p.name.startswith(".")):
            return None  # a slice is still arriving
    elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
        return None
    try:
        files = checked_entry_files(path, inbox)
    except Refused as exc:
        return _refused_entry(path, exc)
    if not files:
        return None
    stats = [(f.name, f.stat()) for f in files]
    digest = hashlib.sha1()
    for name, st in stats:
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    newest = max(st.st_mtime for _, st in stats)
    if path.is_dir():
        newest = max(newest, path.stat().st_mtime)
    return InboxEntry(
        key=path.name, path=path, fingerprint=digest.hexdigest()[:16], newest_mtime=newest, files=files
    )


def scan_inbox(inbox: Path) -> list[InboxEntry]:
    """Every candidate entry in the inbox, sorted by name (an absent inbox is empty); refused ones marked."""
    if not inbox.is_dir():
        return []
    entries = []
    for child in sorted(inbox.iterdir()):
        try:
            entry = _entry(child, inbox)
        except FileNotFoundError:  # removed while we looked
            continue
        if entry is not None:
            entries.append(entry)
    return entries
