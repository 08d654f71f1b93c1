"""A file still downloading, readable as its bytes arrive: so conversion overlaps the transfer.

The download layer reports how long the complete prefix of the file is (``reached``); a reader asks for a
byte range and waits until it is there (``read_at``), or gets the download's error if it failed. Reads
open the file anew each time (the ``.part`` name while downloading, the final name after), so a transfer
that restarts from byte 0 or a rename never leaves a reader on a stale handle. Nothing here trusts the
bytes: the file's sha256 and its full parse happen when the download is done, before anything is published.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

from em_platform.sources.retry import SourceError


class DownloadCancelled(SourceError):
    """The consumer of an arriving file gave up (its conversion failed): the download stops."""


class Arrival:
    """How much of ``dest`` (written as ``part`` until complete) has arrived, with a wait for more."""

    def __init__(self, dest: Path, part: Path, size: int):
        self.dest = Path(dest)
        self.part = Path(part)
        self.size = int(size)
        self._cond = threading.Condition()
        self._prefix = 0
        self._error: BaseException | None = None
        self._cancelled = False

    # -- the download's side -----------------------------------------------------------------------

    def reached(self, prefix: int) -> None:
        """The first ``prefix`` bytes are written (and flushed); raises DownloadCancelled if the reader quit."""
        with self._cond:
            if self._cancelled:
                raise DownloadCancelled(f"{self.dest.name}: the conversion reading it stopped", url=None)
            if prefix > self._prefix:
                self._prefix = prefix
                self._cond.notify_all()

    def restart(self) -> None:
        """The transfer starts again from byte 0 (a server ignored Range): readers wait for the new bytes."""
        with self._cond:
            self._prefix = 0

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    # -- the reader's side -------------------------------------------------------------------------

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    @property
    def prefix(self) -> int:
        with self._cond:
            return self._prefix

    def wait_for(self, end: int) -> None:
        """Block until bytes [0, end) have arrived; raise the download's error if it failed first."""
        end = min(int(end), self.size)
        with self._cond:
            while self._prefix < end:
                if self._error is not None:
                    raise SourceError(
                        f"{self.dest.name}: the download failed before byte {end} arrived ({self._error})"
                    ) from self._error
                if self._cancelled:
                    raise DownloadCancelled(f"{self.dest.name}: reading was cancelled")
                self._cond.wait()

    def read_at(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset``, once they have arrived."""
        self.wait_for(offset + n)
        for path in (self.part, self.dest):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # renamed between the two names: try the other
            try:
                return os.pread(fd, n, offset)
            finally:
                os.close(fd)
        raise FileNotFoundError(f"{self.dest}: neither it nor {self.part.name} exists while being read")

    def reader(self) -> ArrivingReader:
        return ArrivingReader(self)


class ArrivingReader(io.RawIOBase):
    """A read-only, seekable file object over an :class:`Arrival`: reads wait for their bytes (for parsers
    such as tifffile that want a file; its size is the final one)."""

    def __init__(self, arrival: Arrival):
        super().__init__()
        self.arrival = arrival
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.arrival.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), max(0, self.arrival.size - self._pos))
        if n == 0:
            return 0
        data = self.arrival.read_at(self._pos, n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)
