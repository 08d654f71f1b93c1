"""A dataset's download manifest: what has already been fetched and verified, so a re-run skips it.

One JSON object per line, appended and fsynced as each item (a file, or a block of a block source)
completes; the first line holds the fingerprint of the source version the items belong to. Opening the
manifest with a different fingerprint starts afresh: items of an older version must not be mixed in.
A torn last line (the process died while writing it) is ignored, so that item is simply fetched again.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class ManifestEntry:
    key: str  # the item's name within the dataset: a file name, or a block key such as "z0_y64_x128"
    url: str
    size_bytes: int
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)


class DownloadManifest:
    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / MANIFEST_NAME
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        self._entries: dict[str, ManifestEntry] = {}
        self.reset_because: str | None = None  # why an existing manifest was discarded, if it was
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            self._write_header()
            return
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if header.get("fingerprint") != self.fingerprint:
            self.reset_because = (
                f"the source changed since the last attempt (fingerprint {header.get('fingerprint')!r} "
                f"-> {self.fingerprint!r})"
            )
            self.reset()
            return
        for line in lines[1:]:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn write of the last line
            self._entries[d["key"]] = ManifestEntry(**d)

    def _write_header(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint}) + "\n")
        os.replace(tmp, self.path)

    def reset(self) -> None:
        """Forget every item (the caller removes the partial files it owns)."""
        with self._lock:
            self._entries.clear()
            self._write_header()

    def get(self, key: str) -> ManifestEntry | None:
        return self._entries.get(key)

    def entries(self) -> dict[str, ManifestEntry]:
        return dict(self._entries)

    def add(self, entry: ManifestEntry) -> None:
        """Record a complete, verified item (durably: the line is fsynced before this returns)."""
        line = json.dumps(asdict(entry), sort_keys=True) + "\n"
        with self._lock:
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._entries[entry.key] = entry
