"""A simulated stack as a microscope session on a local folder, for cryo processing when the data root is
object storage.

Cryo processing reads sessions from folders, as a microscope's share provides them (mdoc, stack, movies,
gain). The simulator publishes its stacks to the data root; when that is S3 (the deployment), the simulation
run also puts a copy of each stack in ``<downloads>/simulation/<spec>/<stack>/``, which the cryo sensor watches
as its simulation root. The copy is made in a hidden folder and renamed into place whole (the sensor skips
hidden folders), so a reader never sees half a session; an existing copy with every file at its published
size is kept.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from em_platform.storage import DataStore

COPIES = "simulation"  # under the download cache (EM_DOWNLOADS)


def session_copies_root(downloads: str | os.PathLike[str]) -> Path:
    """Where local copies of simulated stacks live: the cryo sensor's simulation root for a remote data root."""
    return Path(downloads) / COPIES


def _published_sizes(store: DataStore, folder: str) -> dict[str, int]:
    sizes = {}
    for path, info in store.fs.find(folder, detail=True).items():
        sizes[Path(path).relative_to(Path(folder)).as_posix()] = int(info.get("size") or 0)
    return sizes


def _local_sizes(folder: Path) -> dict[str, int]:
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def copy_session(store: DataStore, folder: str, root: Path, spec_name: str, stack: str) -> Path:
    """``root/<spec_name>/<stack>``: the published stack ``folder`` of ``store``, whole; returns it."""
    dest = root / spec_name / stack
    published = _published_sizes(store, folder)
    if not published:
        raise FileNotFoundError(f"{store.to_url(folder)}: no published stack there to copy")
    if _local_sizes(dest) == published:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".{stack}.{uuid.uuid4().hex[:8]}.partial"
    try:
        for rel in published:
            target = partial / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            store.fs.get(f"{folder}/{rel}", str(target))
        if dest.exists():  # an older or torn copy
            shutil.rmtree(dest)
        os.replace(partial, dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest
