"""The files `em-platform viewer` may serve: those of published OME-Zarr images, and nothing else.

A ``/data/<key>`` is a file of a published image when these hold for the key as asked and, on a local disk,
again for the path it resolves to (every symlink on the way followed, then every rule checked once more):

- it lies under a folder where the platform publishes images (:data:`IMAGE_FAMILIES`); never in the
  inbox, the buffer, the downloads, the scope share, or on the catalog database (journal, dead letters)
  beside them;
- no segment is ``.staging`` (a half-written image), hidden (but zarr v2's own ``.zattrs``, ``.zarray``,
  ... as the file's name) or a download in progress (:data:`IN_PROGRESS`, named by
  :mod:`em_platform.sources.download`);
- its first ``*.zarr`` segment is an OME-Zarr group: a folder holding ``zarr.json`` (zarr v3) or
  ``.zgroup`` / ``.zattrs`` (v2), never a file of that name. On object storage (no symlinks) the group's
  ``zarr.json`` is written last by :meth:`~em_platform.storage.store.DataStore.publish`, so an image being
  copied has none and is refused;
- the file opened is the file checked (on Linux, ``/proc/self/fd``): a symlink swapped in between is caught.

A refusal names the rule and the key as asked, never a server path or where a symlink points: the cause
(chained) says that, for the log. Bytes are sent in bounded blocks, never a whole file in memory.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time
import urllib.parse
from pathlib import Path
from typing import BinaryIO

from em_platform.edge import Refused, inside, join_key
from em_platform.sources.download import PART_MAP_SUFFIX, PART_SUFFIX
from em_platform.storage.store import STAGING, DataStore

FIELD = "viewer path"
# The top-level folders assets publish images into: acquisition/<montage>/ (montage_upload), ingest/<source>/
# (local and public ingests), cryo/<series>/ (tomograms), simulation/<name>/ (simulated tilt series).
IMAGE_FAMILIES = ("acquisition", "ingest", "cryo", "simulation")
GROUP_MARKERS = ("zarr.json", ".zgroup", ".zattrs")  # zarr v3, then v2
ZARR_V2_FILES = frozenset({".zarray", ".zattrs", ".zgroup", ".zmetadata"})  # the only hidden names served
IN_PROGRESS = (PART_SUFFIX, PART_MAP_SUFFIX)  # a download's bytes so far and its map of finished parts
BLOCK_BYTES = 256 << 10  # bytes read from object storage per request (and held per connection) at a time
# an object store's image group, once seen, is believed this long (one HEAD, not one a chunk)
GROUP_SECONDS = 2.0


def requested_key(raw: str) -> str:
    """The data-root key a ``/data/...`` request names: URL-decoded, every segment checked like a storage
    key (:func:`em_platform.edge.join_key`), or :class:`Refused`. :meth:`ImageFiles.open` judges the rest."""
    key = urllib.parse.unquote(raw)
    if "\x00" in key:
        raise Refused(FIELD, key, "contains a NUL byte")
    return join_key("", key.rstrip("/"), field=FIELD)  # no '', '.', '..', '\\', control characters


def image_root(key: str) -> str:
    """The key of the image ``key`` lies in (down to its first ``*.zarr`` segment), or :class:`Refused`."""
    segments = key.split("/")
    for i, segment in enumerate(segments):
        if segment == STAGING:
            raise Refused(FIELD, key, "is a half-written image (.staging); only published images are served")
        if segment.startswith(".") and not (i == len(segments) - 1 and segment in ZARR_V2_FILES):
            raise Refused(FIELD, key, f"has a hidden segment {segment!r}: no part of a published image")
        if segment.endswith(IN_PROGRESS):
            raise Refused(FIELD, key, "is a download in progress; only published images are served")
    if segments[0] not in IMAGE_FAMILIES:
        raise Refused(FIELD, key, f"is not in a folder of published images ({', '.join(IMAGE_FAMILIES)})")
    for i, segment in enumerate(segments):
        if segment.endswith(".zarr"):
            return "/".join(segments[: i + 1])
    raise Refused(FIELD, key, "is not inside an OME-Zarr image (*.zarr): the viewer serves images only")


class Body:
    """An open file and its size; :meth:`send` puts a span of it on a socket in bounded blocks."""

    def __init__(self, file: BinaryIO, size: int, local: bool):
        self.file, self.size, self.local = file, size, local

    def __enter__(self) -> Body:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def send(self, sock: socket.socket, first: int, count: int) -> int:
        """Send ``count`` bytes from ``first``; the bytes sent (fewer when the file ended early)."""
        if self.local:  # the kernel copies page by page (sendfile): nothing passes through Python
            return sock.sendfile(self.file, first, count)
        self.file.seek(first)
        sent = 0
        while sent < count:
            block = self.file.read(min(BLOCK_BYTES, count - sent))
            if not block:
                break
            sock.sendall(block)
            sent += len(block)
        return sent


def open_local(path: str | os.PathLike[str]) -> Body:
    """``path`` opened for reading: a regular file, not a symlink, and never a FIFO that blocks the open;
    FileNotFoundError for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ENAMETOOLONG):  # under a file, or a name no file can have
            raise FileNotFoundError(path) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO, a device
        os.close(fd)
        raise FileNotFoundError(path)
    return Body(os.fdopen(fd, "rb", buffering=0), info.st_size, local=True)


class ImageFiles:
    """The data root's published images, file by file (:meth:`open`)."""

    def __init__(self, store: DataStore):
        self.store = store
        self.root = Path(store.root).resolve() if store.is_local else None
        self._groups: dict[str, float] = {}  # object storage: image roots seen to be groups, until when
        self._lock = threading.Lock()

    def open(self, key: str) -> Body:
        """The file ``key`` (from :func:`requested_key`): :class:`Refused` when it is no file of a published
        image, FileNotFoundError when the image has no such file (an absent chunk, a folder)."""
        root = image_root(key)
        local_root = self.root
        if local_root is not None:
            return self._open_local(local_root, key, root)
        return self._open_object(key, root)

    # -- a local folder: the resolved path is checked again ------------------------------------------------

    def _open_local(self, local_root: Path, key: str, root: str) -> Body:
        path = self._resolved(local_root, key)
        real = path.relative_to(local_root).as_posix()
        try:
            real_root = image_root(real)
        except Refused as exc:
            raise Refused(FIELD, key, "leads (through a symlink) out of every published image") from exc
        if not (_is_group(local_root / root) and _is_group(local_root / real_root)):
            raise Refused(
                FIELD, key, "its *.zarr is no OME-Zarr group (a folder with zarr.json, .zgroup or .zattrs)"
            )
        if real == real_root:
            raise FileNotFoundError(key)  # the image's folder itself
        try:
            body = open_local(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # the last segment became a symlink after the check
                raise Refused(FIELD, key, "changed while it was opened") from exc
            raise
        opened = _opened_path(body.file.fileno())
        if opened is not None and opened != str(path):
            body.file.close()
            raise Refused(FIELD, key, "changed while it was opened") from None
        return body

    def _resolved(self, local_root: Path, key: str) -> Path:
        try:
            return inside(local_root, key, field=FIELD)
        except Refused as exc:
            raise Refused(FIELD, key, "resolves outside the data root") from exc
        except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
            raise Refused(FIELD, key, "cannot be resolved (a symlink loop)") from exc

    # -- object storage: no symlinks; the group's zarr.json marks a published image --------------------------

    def _open_object(self, key: str, root: str) -> Body:
        if not self._is_remote_group(root):
            raise Refused(
                FIELD, key, "its *.zarr is no published OME-Zarr group (no zarr.json, .zgroup or .zattrs)"
            )
        if key == root:
            raise FileNotFoundError(key)
        # one HEAD (FileNotFoundError when absent); then no read-ahead cache: each read of BLOCK_BYTES is one
        # ranged GET, held only while it is sent
        file = self.store.fs.open(self.store.path(key), "rb", block_size=BLOCK_BYTES, cache_type="none")
        if file.details.get("type", "file") != "file":  # a prefix ("folder") of the image
            file.close()
            raise FileNotFoundError(key)
        return Body(file, int(file.size), local=False)

    def _is_remote_group(self, root: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if self._groups.get(root, 0.0) > now:
                return True
        if not any(self.store.fs.isfile(self.store.path(root, m)) for m in GROUP_MARKERS):
            return False
        with self._lock:
            if len(self._groups) > 4096:  # bounded: one entry per image being viewed
                self._groups.clear()
            self._groups[root] = now + GROUP_SECONDS
        return True


def _is_group(folder: Path) -> bool:
    return os.path.isdir(folder) and any(os.path.isfile(folder / marker) for marker in GROUP_MARKERS)


def _opened_path(fd: int) -> str | None:
    """The path the kernel has for an open file (Linux), None where that is not known."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
