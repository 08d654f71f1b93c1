"""A session root's folders as the cryo sensor and cryo-live list them: each folder's sub-folders and mdocs,
hidden names left out, every symlinked folder checked inside the root (:func:`contained`, the inbox's rule,
:func:`em_platform.edge.inside`) before anything behind it is read. Below both the full walk
(:func:`em_platform.cryo.session.scan_sessions`) and the incremental one (:mod:`em_platform.cryo.frame_sets`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from em_platform.edge import Refused, inside

SPA_SET = "micrographs"  # the last part of a single-particle movie set's partition key


def contained(root: Path, path: Path, field: str) -> Path:
    """``path`` (built under ``root``) as it resolves, refused (:class:`~em_platform.edge.Refused` naming
    ``field``) unless that is inside ``root``: the inbox's rule, :func:`em_platform.edge.inside`."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        raise Refused(field, str(path), f"not under the session root {root}") from None
    return inside(root, relative, field=field)


def is_frame_set(path: Path) -> bool:
    with open(path, errors="replace") as f:
        head = f.read(4096)
    return "[FrameSet" in head and "[ZValue" not in head


@dataclass(frozen=True)
class FolderListing:
    """One folder of a session root, hidden names left out: its sub-folders (each with where it resolves,
    by name), its mdocs' names, and the symlinked folders refused because they resolve outside the root."""

    folders: list[tuple[Path, Path]]
    mdocs: list[str]  # names, not paths: a session's folder holds 10⁴-10⁵ of them
    refused: list[tuple[Path, Refused]]


def list_folder(root: Path, folder: Path) -> FolderListing | None:
    """``folder`` listed under the session rule; None when it cannot be (vanished or unreadable meanwhile:
    as Path.rglob, nothing under it). The mdocs come in the order the file system gives."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return None
    listing = FolderListing([], [], [])
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()  # a symlink's target
        except OSError:
            is_dir = False
        if not is_dir:
            if entry.name.endswith(".mdoc"):
                listing.mdocs.append(entry.name)
            continue
        path = folder / entry.name
        if entry.is_symlink():
            try:
                listing.folders.append((path, contained(root, path, "session folder")))
            except Refused as exc:
                listing.refused.append((path, exc))
        else:
            listing.folders.append((path, path.resolve()))
    listing.folders.sort()
    return listing
