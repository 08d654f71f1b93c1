"""The acquisition journal as a montage run sees it: montages and tiles in, judged tiles and QC status out.

:class:`JournalTileSource` reads montages and tiles from the journal and writes each batch of judged tiles
(their outgoing TEM_comms messages and results) in one commit. When the scope listens on a broker, an
:class:`Outbox` then publishes the same messages on a thread of its own, in order, so the run never
waits on the broker; the embedded simulated scope reads the journal itself. ``qc.status`` history
(what the simulated scope obeys) is kept in the journal when the status changes; the message itself
also goes out at the end of a montage and every few seconds, so a scope that reconnects hears it.
With ``tile_shares``, a tile whose path is not on a scope share (:func:`em_platform.edge.under_shares`) is
never handed to the run: it is marked failed with the reason and dead-lettered, before anything opens it.
No Dagster here: the acquisition-hardware resource only builds one of these.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from em_platform.edge import Refused, under_shares
from em_platform.tem.journal import Journal, MontageRow, TileReport, TileRow
from em_platform.tem.protocol import qc_status

__all__ = ["JournalTileSource", "Outbox", "TileSource"]

log = logging.getLogger(__name__)

Message = tuple[str, dict[str, Any]]


class TileSource(Protocol):
    """What a montage run needs from the acquisition side (:class:`JournalTileSource` is the real one)."""

    pixel_size_nm: float | None  # the scope's calibration, for montages not yet complete
    rotation_rad: float | None  # the scope's image-to-stage rotation, likewise

    def montage(self, montage_id: str) -> MontageRow | None: ...
    def tiles(self, montage_id: str, after_seq: int = 0) -> list[TileRow]: ...
    def named_tiles(self, montage_id: str) -> dict[str, tuple[int | None, int | None]] | None: ...
    def report(self, reports: Sequence[TileReport]) -> None: ...
    def late_matches(self, tile_id: str, matches: dict[str, Any]) -> None: ...
    def send_status(self, montage_id: str, status: str, reason: str | None, *, changed: bool) -> None: ...
    def close(self) -> None: ...


class Outbox:
    """Sends batches of messages in order on a background thread through ``send`` (e.g. a
    :meth:`~em_platform.tem.broker.BrokerPublisher.publish_many`). A batch that cannot be sent (broker
    gone after the publisher's retries) is logged with its topics and dropped: the journal keeps it."""

    def __init__(self, send: Callable[[list[Message]], Any], logger: logging.Logger = log):
        self._send = send
        self._log = logger
        self._queue: queue.Queue[list[Message] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tem-outbox", daemon=True)
        self._thread.start()
        self.sent = 0
        self.failed = 0

    def put(self, messages: list[Message]) -> None:
        if messages:
            self._queue.put(list(messages))

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            while True:  # take whatever else is waiting: one round trip to the broker for all of it
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch += more
            try:
                self._send(batch)
                self.sent += len(batch)
            except Exception as exc:
                self.failed += len(batch)
                topics = ", ".join(sorted({t for t, _ in batch}))
                self._log.error(
                    "could not send %d message(s) (%s) to the microscope: %s", len(batch), topics, exc
                )

    def close(self, timeout: float = 30.0) -> None:
        """Send what is queued (waiting up to ``timeout`` s), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)


class JournalTileSource:
    """Montages and tiles from the acquisition journal; judged tiles into it (and out through ``outbox``)."""

    def __init__(
        self,
        journal: Journal,
        *,
        pixel_size_nm: float | None = None,
        rotation_rad: float | None = None,
        outbox: Outbox | None = None,
        tile_shares: Iterable[str | os.PathLike[str]] | None = None,
    ):
        self.journal = journal
        self.pixel_size_nm = pixel_size_nm
        self.rotation_rad = rotation_rad
        self.outbox = outbox
        self.tile_shares = None if tile_shares is None else tuple(tile_shares)
        self._refused: set[str] = set()

    def montage(self, montage_id: str) -> MontageRow | None:
        return self.journal.montage(montage_id)

    def tiles(self, montage_id: str, after_seq: int = 0) -> list[TileRow]:
        """New tiles; with ``tile_shares``, only those whose file lies on a scope share."""
        rows = self.journal.tiles(montage_id, after_seq=after_seq)
        if self.tile_shares is None:
            return rows
        return [t for t in rows if self._on_share(t)]

    def _on_share(self, t: TileRow) -> bool:
        try:
            under_shares(t.path, self.tile_shares or (), "path")
            return True
        except Refused as exc:
            if t.tile_id not in self._refused:  # reported once per run, however often the run polls
                self._refused.add(t.tile_id)
                log.error("montage %s: tile %s not read: %s", t.montage_id, t.tile_id, exc)
                self.journal.save_tile_results(t.tile_id, status="failed", error=str(exc))
                body = {"tile_id": t.tile_id, "montage_id": t.montage_id, "path": t.path}
                self.journal.dead_letter("journal", "tile.raw", exc.field, str(exc), body)
            return False

    def named_tiles(self, montage_id: str) -> dict[str, tuple[int | None, int | None]] | None:
        return self.journal.named_tiles(montage_id)

    def report(self, reports: Sequence[TileReport]) -> None:
        """Judged tiles: into the journal in one commit, then out to the scope in the same order."""
        self.journal.record_tile_reports(reports)
        if self.outbox is not None:
            self.outbox.put([m for r in reports for m in r.outgoing])

    def late_matches(self, tile_id: str, matches: dict[str, Any]) -> None:
        self.journal.save_match_results(tile_id, matches)

    def send_status(self, montage_id: str, status: str, reason: str | None, *, changed: bool) -> None:
        """``qc.status`` (TEM_comms carries no montage id: ``montage_id`` files it in the journal)."""
        payload = qc_status(status, reason)
        if changed:
            self.journal.record("qc.status", payload)
            self.journal.record_qc_status(montage_id, status, reason)
        if self.outbox is not None:
            self.outbox.put([("qc.status", payload)])

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.close()
