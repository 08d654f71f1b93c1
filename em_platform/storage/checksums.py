"""sha256 of what was received or read: files, streams, and one digest for a multi-file dataset.

The one home of checksums for every part of the platform: the ingests (inbox files, downloads), the
acquisition archive and the download layer all hash through these.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path
from typing import Any


def sha256_file(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe_files(files: list[Path] | tuple[Path, ...], root: Path) -> list[dict[str, Any]]:
    """[{path (relative to root), size_bytes, sha256}] for each file: the record's ``files.source``."""
    return [
        {
            "path": str(f.relative_to(root)) if f.is_relative_to(root) else str(f),
            "size_bytes": f.stat().st_size,
            "sha256": sha256_file(f),
        }
        for f in files
    ]


def combined_sha256(described: list[dict[str, Any]]) -> str:
    """One digest for a dataset: the file's own sha256, or a digest of the sorted per-file digests."""
    if len(described) == 1:
        return described[0]["sha256"]
    lines = "".join(f"{d['sha256']}  {d['path']}\n" for d in sorted(described, key=lambda d: d["path"]))
    return hashlib.sha256(lines.encode()).hexdigest()


class StreamHash:
    """sha256 of a stream, computed on its own thread so it overlaps receiving (hashlib drops the GIL).

    ``update`` hands the block over (at most ``depth`` blocks wait, so memory stays bounded);
    ``hexdigest`` waits for the thread and returns the digest; ``close`` stops it without one.
    """

    def __init__(self, depth: int = 32):
        self._sha = hashlib.sha256()
        self._blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while (block := self._blocks.get()) is not None:
            self._sha.update(block)

    def update(self, block: bytes) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            self._thread.start()
        self._blocks.put(block)

    def close(self) -> None:
        if self._thread is not None:
            self._blocks.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        self.close()
        return self._sha.hexdigest()
