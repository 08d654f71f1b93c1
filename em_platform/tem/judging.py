"""Who judges a montage's tiles: one holder at a time (the warm live-QC service, else the montage's Dagster
run), through a claim in the acquisition journal that its holder renews and that lapses when it dies.

With the claim, the service judges a live montage's tiles the moment they land while the montage's Dagster
run waits; when the service lets go (the montage is over) or dies (the claim lapses), the run takes over and
resumes from the journal (:meth:`MontageRun._resumed`): what the service judged is kept, the rest is judged
by the run. So neither restart loses or double-judges a tile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from em_platform.storage.store import DataStore
from em_platform.tem.buffer_layout import MontageBuffer
from em_platform.tem.journal import Journal

CLAIM_SECONDS = 6.0  # a dead holder's claim lapses this long after its last renewal
RENEW_EVERY_SECONDS = 1.0

log = logging.getLogger(__name__)


def processed_tile_paths(buffer: DataStore, montage_id: str) -> tuple[str, str]:
    """(final, staging) of a montage's processed tiles in the acquisition buffer: the staging is the same
    for every judge of the montage (service, run, retried run), so each resumes what the last one stored."""
    final = MontageBuffer(buffer.path(montage_id)).processed_tiles
    return final, buffer.staging_path(final, resumable_as=f"montage-{montage_id}")


class JudgingClaim:
    """The claim on one montage, renewed on a thread while held."""

    def __init__(self, journal: Journal, montage_id: str, owner: str, seconds: float = CLAIM_SECONDS):
        self.journal, self.montage_id, self.owner, self.seconds = journal, montage_id, owner, seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> bool:
        """Take the claim now if nobody else holds it (renewed until :meth:`release`)."""
        if not self.journal.claim_judging(self.montage_id, self.owner, self.seconds):
            return False
        self._thread = threading.Thread(target=self._renew, name=f"claim-{self.montage_id}", daemon=True)
        self._thread.start()
        return True

    def wait(
        self,
        poll_seconds: float = 0.5,
        on_waiting: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Take the claim, waiting while another holder has it (``on_waiting(holder)`` is told once)."""
        told = False
        while not self.take():
            if on_waiting is not None and not told:
                holder = self.journal.judging(self.montage_id)
                on_waiting(holder[0] if holder else "?")
                told = True
            sleep(poll_seconds)

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY_SECONDS):
            try:
                if not self.journal.claim_judging(self.montage_id, self.owner, self.seconds):
                    log.error("montage %s: %s lost its claim to judge the tiles", self.montage_id, self.owner)
            except Exception as exc:  # the database away for a moment: the next renewal tries again
                log.warning("montage %s: renewing the judging claim failed: %s", self.montage_id, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.journal.release_judging(self.montage_id, self.owner)
