"""The single-particle movies of a session root as they land: SerialEM's frame-set mdocs (one ``<movie>.mdoc``
beside each movie, written once the movie is saved), found by listing again only the folders whose
modification time changed, so a session of tens of thousands of files costs a scan the folders that grew.

A folder is walked under the session rule (:func:`em_platform.cryo.session.contained`): a symlinked folder
that resolves outside the root is refused, nothing behind it listed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from em_platform.cryo.session import SPA_SET, contained, is_frame_set, list_folder
from em_platform.edge import Refused

log = logging.getLogger(__name__)


@dataclass
class _Folder:
    mtime_ns: int
    folders: list[Path]
    mdocs: list[Path]


@dataclass
class FrameSetWatch:
    """The frame-set mdocs under ``root``; :meth:`scan` returns them by set folder."""

    root: Path
    tag: str
    folders: dict[Path, _Folder] = field(default_factory=dict)
    frame_sets: set[Path] = field(default_factory=set)  # mdocs read as frame-set mdocs: they stay so
    others: dict[Path, int] = field(default_factory=dict)  # mdocs that were not, by modification time
    refused: dict[Path, Refused] = field(default_factory=dict)

    def scan(self) -> dict[Path, list[Path]]:
        sets: dict[Path, list[Path]] = {}
        if not self.root.is_dir():
            return sets
        pending = [self.root]
        seen: set[Path] = set()
        walked: set[Path] = set()  # resolved: a symlink back to a folder above is not walked twice
        while pending:
            folder = pending.pop()
            real = folder.resolve()
            if real in walked:
                continue
            listing = self._listing(folder)
            if listing is None:
                continue
            walked.add(real)
            seen.add(folder)
            pending += listing.folders
            for mdoc in listing.mdocs:
                if self._is_frame_set(mdoc):
                    sets.setdefault(folder, []).append(mdoc)
        self.folders = {f: v for f, v in self.folders.items() if f in seen}
        return sets

    def session_key(self, folder: Path) -> str:
        """The set's key, as the cryo partitions name it: ``<tag>/<folder>/micrographs``."""
        rel = folder.relative_to(self.root).as_posix()
        return "/".join(p for p in (self.tag, "" if rel == "." else rel, SPA_SET) if p)

    def _listing(self, folder: Path) -> _Folder | None:
        try:
            mtime = folder.stat().st_mtime_ns
        except OSError:
            return None
        cached = self.folders.get(folder)
        if cached is not None and cached.mtime_ns == mtime:
            return cached
        listing = list_folder(self.root, folder)
        if listing is None:
            return None
        for path, exc in listing.refused:
            if path not in self.refused:
                log.error("cryo-live: %s refused: %s", path, exc)
            self.refused[path] = exc
        found = _Folder(mtime, [path for path, _ in listing.folders], listing.mdocs)
        self.folders[folder] = found
        return found

    def _is_frame_set(self, mdoc: Path) -> bool:
        """Read once it says so; until then again whenever it changes (an mdoc caught half-written)."""
        if mdoc in self.frame_sets:
            return True
        try:
            mtime = mdoc.stat().st_mtime_ns
            if self.others.get(mdoc) == mtime:
                return False
            contained(self.root, mdoc, "mdoc")
            if is_frame_set(mdoc):
                self.frame_sets.add(mdoc)
                return True
        except (OSError, Refused):
            return False  # a refused or unreadable file is looked at again at the next scan
        self.others[mdoc] = mtime
        return False
