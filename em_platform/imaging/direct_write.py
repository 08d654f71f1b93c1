"""Files written around the page cache (``O_DIRECT``), for data that is streamed out and not read back soon.

A live-QC process writes every processed tile (25 MB for 5000² uint8) and reads it again only after the
montage (fusion, upload), long after the page cache would have dropped it on a real montage of thousands
of tiles. Through the page cache each write costs the writer a kernel copy into freshly allocated cache
pages, and later the kernel's flusher threads write the dirty pages back at normal priority, whatever the
writer's: on this 2-core machine a 5000² tile cost 35-55 ms of the writer's CPU (system time) while tiles
were written at 3-8 a second, against 15-17 ms with ``O_DIRECT`` (the device reads the pages from the
writer's buffer; no dirty pages, no writeback).

``O_DIRECT`` wants the buffer, the file offset and the length aligned to the device's logical block: the
data go through a page-aligned buffer kept for the next file, the aligned head of the file is written
directly and the tail (less than a block) through the page cache. A file system that refuses ``O_DIRECT``
(tmpfs before Linux 6.6, some FUSE mounts) or a platform without it gets an ordinary write. Readers see
the same bytes either way: Linux keeps the page cache coherent with direct writes.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue

import numpy as np

__all__ = ["ALIGN", "AlignedBuffer", "give_back", "take_buffer", "write_file"]

ALIGN = 4096  # a page: a multiple of every common logical block size (512, 4096)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_FREE: queue.SimpleQueue[AlignedBuffer] = queue.SimpleQueue()  # buffers kept for the next file
_MAX_KEPT_BYTES = 64 << 20  # a larger buffer is handed back to the kernel after its file


class AlignedBuffer:
    """A page-aligned scratch buffer of at least ``nbytes`` (anonymous memory, so aligned for ``O_DIRECT``)."""

    def __init__(self, nbytes: int):
        self.capacity = max(ALIGN, -(-int(nbytes) // ALIGN) * ALIGN)
        self._map = mmap.mmap(-1, self.capacity)
        self.bytes = np.frombuffer(self._map, np.uint8)

    def view(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The first bytes of the buffer as a C-contiguous array of ``shape`` and ``dtype``."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self.bytes[:nbytes].view(dtype).reshape(shape)

    def close(self) -> None:
        del self.bytes
        self._map.close()


def take_buffer(nbytes: int) -> AlignedBuffer:
    """A kept buffer that is large enough, or a new one; give it back with :func:`give_back`."""
    try:
        buffer = _FREE.get_nowait()
    except queue.Empty:
        return AlignedBuffer(nbytes)
    if buffer.capacity >= nbytes:
        return buffer
    buffer.close()
    return AlignedBuffer(nbytes)


def give_back(buffer: AlignedBuffer) -> None:
    if buffer.capacity > _MAX_KEPT_BYTES:
        buffer.close()
    else:
        _FREE.put(buffer)


def write_file(path: str, buffer: AlignedBuffer, nbytes: int) -> bool:
    """Write the first ``nbytes`` of ``buffer`` as the file ``path`` (created or truncated). True when the
    head went around the page cache, False when the file system (or platform) made it an ordinary write."""
    data = memoryview(buffer.bytes)[:nbytes]
    head = nbytes // ALIGN * ALIGN
    if not _O_DIRECT or head == 0:
        _write_buffered(path, data)
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o666)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: this file system does not do O_DIRECT
            raise
        _write_buffered(path, data)
        return False
    try:
        direct = 0
        try:
            while direct < head and direct % ALIGN == 0:
                written = os.write(fd, data[direct:head])
                if not written:
                    break
                direct += written
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: a logical block larger than ALIGN: the rest goes buffered
                raise
        # the tail (and whatever a refused or short direct write left) through the page cache
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
        done = direct
        while done < nbytes:
            done += os.pwrite(fd, data[done:], done)
        return direct > 0
    finally:
        os.close(fd)


def _write_buffered(path: str, data: memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)
