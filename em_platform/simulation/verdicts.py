"""Whether anyone heard the simulated scope: its tiles' ``qc.tile`` verdicts, as a microscope waits for them.

A STOMP broker drops a topic message nobody subscribes to, and says nothing: a scope publishing under
the wrong topic prefix (or with no listener running) sends every tile into the void. The platform
answers each ``tile.raw`` with a ``qc.tile`` within seconds once its montage run is up, so silence is
the sign. :class:`VerdictWatch` counts the tiles sent and the verdicts heard; while the scope acquires,
silence longer than ``timeout`` after the first tile stops it (``STOP_NOW``, as if QC had said so: a
real scope should not image a whole montage nobody judges), and at the end :meth:`VerdictWatch.wait`
waits for the rest of the verdicts as long as the platform is never silent for longer than that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from em_platform.simulation.scope import Emit, QCStatus


class VerdictWatch:
    """Tiles sent and ``qc.tile`` verdicts heard for one montage (thread-safe: verdicts arrive on the
    broker client's thread)."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic):
        if timeout <= 0:
            raise ValueError(f"the verdict timeout must be > 0 seconds, not {timeout}")
        self.timeout = timeout
        self.clock = clock
        self.sent: list[str] = []  # this montage's tiles, in the order sent
        self.judged: set[str] = set()  # those of them with a verdict (others' verdicts are not counted)
        self._heard: set[str] = set()
        self._sent_ids: set[str] = set()
        self._first_sent: float | None = None
        self._last_heard: float | None = None
        self._cond = threading.Condition()

    def emit(self, emit: Emit) -> Emit:
        """``emit`` that also notes each montage tile sent (reference frames get no verdict)."""

        def sending(topic: str, payload: dict[str, Any]) -> None:
            emit(topic, payload)
            if topic == "tile.raw" and not (payload.get("brightfield") or payload.get("darkfield")):
                with self._cond:
                    self.sent.append(payload["tile_id"])
                    self._sent_ids.add(payload["tile_id"])
                    self._first_sent = self._first_sent or self.clock()
                    self._take(payload["tile_id"])  # a verdict faster than this bookkeeping

        return sending

    def heard(self, tile_id: str) -> None:
        """A ``qc.tile`` for ``tile_id`` arrived (another montage's is ignored)."""
        with self._cond:
            self._heard.add(tile_id)
            if tile_id in self._sent_ids:
                self._take(tile_id)

    def _take(self, tile_id: str) -> None:
        if tile_id in self._heard and tile_id not in self.judged:
            self.judged.add(tile_id)
            self._last_heard = self.clock()
            self._cond.notify_all()

    def qc_status(self, obeyed: QCStatus | None) -> QCStatus:
        """The status the scope obeys: the platform's (``obeyed``), or STOP_NOW after ``timeout`` s of silence."""

        def status() -> tuple[str, str | None] | None:
            with self._cond:
                silent = (
                    not self.judged
                    and self._first_sent is not None
                    and self.clock() - self._first_sent > self.timeout
                )
            if silent:
                return "STOP_NOW", f"no qc.tile verdict for any tile within {self.timeout:g} s"
            return obeyed() if obeyed is not None else None

        return status

    def wait(self) -> list[str]:
        """Wait until every tile sent has its verdict while the platform is not silent for ``timeout`` s
        (since the last verdict, or the first tile when none came); the tiles still without one, in order."""
        with self._cond:
            while True:
                missing = [t for t in self.sent if t not in self.judged]
                if not missing:
                    return []
                heard = self._last_heard or self._first_sent
                assert heard is not None  # a tile was sent: it is missing
                left = heard + self.timeout - self.clock()
                if left <= 0:
                    return missing
                self._cond.wait(left)
