"""The mdocs of a session root as they land: SerialEM's frame-set mdocs (one ``<movie>.mdoc`` beside each
movie, written once the movie is saved) and the others (tilt series), found incrementally. A scan lists again
only the folders whose modification time changed and reads only the mdocs new to it, so a session of tens of
thousands of movies costs a scan what landed since the last one (and a listing of the folder that grew),
not a look at every file. cryo-live takes the new frame sets; the cryo sensor the other mdocs and the
folders that hold frame sets.

An mdoc that was not a frame set is read again whenever it changes (SerialEM caught half-way through one);
one that was stays one (SerialEM only appends). A folder is walked under the session rule
(:func:`em_platform.cryo.session_folders.contained`): a symlinked folder that resolves outside the root is refused,
nothing behind it listed, and reported by every scan."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from em_platform.cryo.session_folders import SPA_SET, contained, is_frame_set, list_folder
from em_platform.edge import Refused

log = logging.getLogger(__name__)


@dataclass
class _Folder:
    mtime_ns: int
    folders: list[Path]
    refused: list[tuple[Path, Refused]]
    mdocs: set[str]


@dataclass(frozen=True)
class WatchScan:
    """What one scan found."""

    new: dict[Path, list[Path]]  # frame-set mdocs first seen as such by this scan, by folder, in name order
    set_folders: list[Path]  # every folder holding frame-set mdocs
    others: list[Path]  # every other mdoc (tilt series; unreadable or refused ones, for the caller to report)
    refused: list[tuple[Path, Refused]]  # folders that resolve outside the root


@dataclass
class FrameSetWatch:
    """The mdocs under ``root``, kept between scans. With ``aliases`` a symlinked folder that resolves to
    one walked already (inside the root) is walked again under its own name, as the sensor's keys name it;
    without, each folder is walked once (cryo-live: one session per folder)."""

    root: Path
    tag: str
    aliases: bool = False
    folders: dict[Path, _Folder] = field(default_factory=dict)
    frame_sets: dict[Path, set[str]] = field(default_factory=dict)  # folder -> its frame-set mdocs' names
    others: dict[Path, tuple | None] = field(default_factory=dict)  # mdoc -> file_state when read as not
    # (None: not read, refused or unreadable: looked at again by every scan)

    def scan(self) -> WatchScan:
        new: dict[Path, list[Path]] = {}
        refused: list[tuple[Path, Refused]] = []
        if not self.root.is_dir():
            self.folders, self.frame_sets, self.others = {}, {}, {}
            return WatchScan(new, [], [], refused)
        pending: list[tuple[Path, frozenset[Path]]] = [(self.root, frozenset())]
        seen: set[Path] = set()
        walked: set[Path] = set()  # resolved
        while pending:
            folder, above = pending.pop()
            real = folder.resolve()
            if real in above or (not self.aliases and real in walked):  # a symlink back up: not again
                continue
            listing = self._listing(folder, new)
            if listing is None:
                continue
            walked.add(real)
            seen.add(folder)
            pending += [(f, above | {real}) for f in reversed(listing.folders)]
            refused += listing.refused
        for mdoc, state in list(self.others.items()):
            if mdoc.parent in seen and (state is None or file_state_or_none(mdoc) != state):
                del self.others[mdoc]
                self._read(mdoc, new)
        self.folders = {f: v for f, v in self.folders.items() if f in seen}
        self.frame_sets = {f: names for f, names in self.frame_sets.items() if f in seen and names}
        self.others = {m: v for m, v in self.others.items() if m.parent in seen}
        for mdocs in new.values():
            mdocs.sort(key=lambda m: m.name)  # one folder's
        return WatchScan(new, sorted(self.frame_sets), sorted(self.others), refused)

    def session_key(self, folder: Path) -> str:
        """The set's key, as the cryo partitions name it: ``<tag>/<folder>/micrographs``."""
        rel = folder.relative_to(self.root).as_posix()
        return "/".join(p for p in (self.tag, "" if rel == "." else rel, SPA_SET) if p)

    def _listing(self, folder: Path, new: dict[Path, list[Path]]) -> _Folder | None:
        """The folder as last listed, listed again if it changed: the mdocs it gained are read, those it
        lost forgotten."""
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
            if cached is None or path not in {p for p, _ in cached.refused}:
                log.error("cryo session folder %s refused: %s", path, exc)
        names = set(listing.mdocs)
        before = cached.mdocs if cached is not None else set()
        sets = self.frame_sets.setdefault(folder, set())
        for name in before - names:
            sets.discard(name)
            self.others.pop(folder / name, None)
        for name in names - before:
            self._read(folder / name, new)
        found = _Folder(mtime, [path for path, _ in listing.folders], listing.refused, names)
        self.folders[folder] = found
        return found

    def _read(self, mdoc: Path, new: dict[Path, list[Path]]) -> None:
        try:
            state = file_state(mdoc)
            if mdoc.is_symlink():  # its folder was walked inside the root: only a link can lead out
                contained(self.root, mdoc, "mdoc")
            if is_frame_set(mdoc):
                self.frame_sets.setdefault(mdoc.parent, set()).add(mdoc.name)
                new.setdefault(mdoc.parent, []).append(mdoc)
                return
        except (OSError, Refused):
            state = None
        self.others[mdoc] = state


def file_state(path: Path) -> tuple[int, int]:
    """(size, modification time in ns): what changes when a file is written again."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def file_state_or_none(path: Path) -> tuple[int, int] | None:
    """:func:`file_state`, or None for a file that is not there (or cannot be read)."""
    try:
        return file_state(path)
    except OSError:
        return None
