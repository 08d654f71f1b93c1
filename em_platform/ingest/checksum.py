"""sha256 over the bytes of each source file, as received."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
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
