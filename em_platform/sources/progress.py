"""A progress line a user can follow in the run's logs: bytes done, rate and time left, at most every few s."""

from __future__ import annotations

import logging
import threading
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Thread-safe byte counter for one dataset's transfer; logs at most every ``interval_s`` seconds."""

    def __init__(
        self,
        what: str,
        total_bytes: int | None,
        logger: logging.Logger | logging.LoggerAdapter,
        *,
        interval_s: float = 5.0,
        already_bytes: int = 0,
    ):
        self.what = what
        self.total = total_bytes
        self.logger = logger
        self.interval_s = interval_s
        self.done = already_bytes
        self._resumed = already_bytes
        self._start = time.monotonic()
        self._last_log = 0.0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last_log < self.interval_s:
                return
            self._last_log = now
        self.logger.info(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = (self.done - self._resumed) / elapsed
        text = f"{self.what}: {human_bytes(self.done)}"
        if self.total:
            pct = 100.0 * self.done / self.total
            text += f" of {human_bytes(self.total)} ({pct:.0f} %)"
        text += f", {human_bytes(rate)}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", about {(self.total - self.done) / rate:.0f} s left"
        return text

    def finish(self) -> None:
        self.logger.info(self.line() + " — done")

    @property
    def rate_bytes_per_s(self) -> float:
        return (self.done - self._resumed) / max(time.monotonic() - self._start, 1e-6)
