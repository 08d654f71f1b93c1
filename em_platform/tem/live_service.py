"""`em-platform live-qc`: the warm live-QC service. One long-lived process, imports done and its Dask
client connected, watches the acquisition journal and judges every live montage's tiles as they land
(flatfield, CLAHE, statistics, focus, matching, the QC verdict back to the scope), so the first tile of a
montage is judged as fast as the hundredth: no run to start (3.4-3.8 s, 8-10 tiles queued behind it).

It judges a montage while holding its claim (:mod:`em_platform.tem.judging`); the montage's Dagster run
waits for the claim and then records what happened as assets, resuming every tile from the journal. A
montage that is over, or that another judge holds, is left alone. Killed, the service's claims lapse: the
restarted service (or the run) resumes from the journal, judging each tile once.

The service judges with the default QC limits (the run's config applies only to the tiles a run judges).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from em_platform.tem.judging import JudgingClaim, processed_tile_paths
from em_platform.tem.montage_result import MontageRunResult
from em_platform.tem.montage_run import MontageRunConfig, run_montage
from em_platform.tem.qc_summary import MontageSummary
from em_platform.tem.tile_tasks import warm_up

log = logging.getLogger(__name__)

PAGE = 1000  # montages read from the journal at a time
RECENT_SECONDS = 600.0  # a montage over for longer than this is its run's to finish, not the service's
RETRY_SECONDS = 1.0  # how often a montage another judge holds is tried again


class LiveQCService:
    """Judges live montages from the journal of ``hardware`` (an :class:`AcquisitionHardware`), storing
    processed tiles in ``buffer`` (a :class:`DataStore`) and computing on the Dask ``client``."""

    def __init__(
        self,
        hardware,
        buffer,
        client,
        *,
        config: MontageRunConfig | None = None,
        poll_seconds: float = 0.2,
        owner: str | None = None,
        on_judged: Callable[[MontageRunResult], None] | None = None,
    ):
        self.hardware, self.buffer, self.client = hardware, buffer, client
        self.config = config or MontageRunConfig()
        self.poll_seconds = poll_seconds
        self.owner = owner or f"live-qc@{socket.gethostname()}:{os.getpid()}"
        self.on_judged = on_judged
        self.judging: dict[str, threading.Thread] = {}  # montage id -> the thread judging it
        self.done: set[str] = set()
        self._last_seq = 0

    def run(self, stop: threading.Event, ready: Callable[[], None] | None = None) -> None:
        """Watch the journal until ``stop`` is set."""
        warning = priority_warning()
        if warning:
            log.warning("live-qc: %s", warning)
        journal = self.hardware.journal()
        # every worker process warm before the first montage: a montage run warms them too, but there the
        # first tiles would queue behind it (numba's import alone is 0.4 s)
        self.client.run(warm_up)
        recent = datetime.now(UTC) - timedelta(seconds=RECENT_SECONDS)
        self._last_seq = max(self._last_seq, journal.live_since(recent))
        if ready is not None:  # watching: a montage started from now on is seen at the next poll
            ready()
        candidates: set[str] = set()  # live montages this service does not judge (yet): another holds them
        next_retry = 0.0
        while not stop.is_set():
            while True:  # every page before the next wait: a backlog costs queries, not polls
                page = journal.montages_after(self._last_seq, limit=PAGE)
                for m in page:
                    self._last_seq = max(self._last_seq, m.seq)
                    if self._live(journal, m):
                        self._try(m.montage_id, candidates)
                if len(page) < PAGE:
                    break
            for montage_id, thread in list(self.judging.items()):
                if not thread.is_alive():
                    del self.judging[montage_id]
                    self.done.add(montage_id)
            if candidates and time.monotonic() >= next_retry:
                # a holder that died lets go when its claim lapses; a montage no longer live is not ours
                for montage_id in list(candidates):
                    m = journal.montage(montage_id)
                    if m is None or not self._live(journal, m):
                        candidates.discard(montage_id)
                    else:
                        self._try(montage_id, candidates)
                next_retry = time.monotonic() + RETRY_SECONDS
            stop.wait(self.poll_seconds)
        # Stopping does not wait for the montages being judged: their claims lapse and the restarted service
        # (or the montage's run) resumes them from the journal. Letting go now could put a second judge on a
        # montage while this process still judges it.

    def _live(self, journal, m) -> bool:
        """Being acquired, or over within ``RECENT_SECONDS`` with tiles still unjudged (the service was down
        while the scope finished: its verdicts are still due)."""
        if m.montage_id in self.done:
            return False
        if not m.finished:
            return True
        if time.time() - m.updated_at.timestamp() > RECENT_SECONDS:
            return False
        return any(t.qc_passed is None and not t.is_reference for t in journal.tiles(m.montage_id))

    def _try(self, montage_id: str, candidates: set[str]) -> None:
        """Judge the montage if its claim is free; else keep it among the candidates."""
        if montage_id in self.judging:
            return
        claim = JudgingClaim(self.hardware.journal(), montage_id, self.owner)
        if not claim.take():
            candidates.add(montage_id)
            return
        candidates.discard(montage_id)
        thread = threading.Thread(
            target=self._judge, args=(montage_id, claim), name=f"judge-{montage_id}", daemon=True
        )
        self.judging[montage_id] = thread
        thread.start()

    def _judge(self, montage_id: str, claim: JudgingClaim) -> None:
        source = self.hardware.tile_source()
        try:
            final, staging = processed_tile_paths(self.buffer, montage_id)
            result = run_montage(
                montage_id,
                source,
                self.client,
                processed_url=self.buffer.to_url(staging),
                storage_options=self.buffer.storage_options or None,
                announce_url=self.buffer.to_url(final),
                config=self.config,
                logger=log,
            )
            log.info(
                "live-qc: montage %s judged (%d tiles): %s%s",
                montage_id,
                len(result.tiles),
                result.qc.status,
                _latency(result),
            )
            if self.on_judged is not None:
                self.on_judged(result)
        except Exception:
            log.exception(
                "live-qc: montage %s: judging stopped; its run takes over from the journal", montage_id
            )
        finally:
            source.close()
            claim.release()


def priority_warning() -> str | None:
    """Why this process may not get the cores first, or None. Live tiles want normal priority: batch work
    yields to them (:mod:`em_platform.cluster.batch_priority`), but a service started under ``nice``, or in
    a session whose autogroup is niced (the batch workers' own, say), waits behind everything else."""
    from em_platform.cluster.batch_priority import autogroup_niceness

    niceness, group = os.getpriority(os.PRIO_PROCESS, 0), autogroup_niceness()
    if niceness <= 0 and (group is None or group <= 0):
        return None
    session = "" if group is None else f", in a session whose CPU share (autogroup) is at nice {group}"
    return (
        f"running at nice {niceness}{session}: live verdicts wait behind other work; start the service at "
        "normal priority, in a session of its own"
    )


def _latency(result: MontageRunResult) -> str:
    """tile.raw -> qc.tile over the tiles this service judged, and the stage that took longest at p95."""
    spread = MontageSummary.of(result).latency_ms
    total = spread.pop("total", None)
    if total is None:
        return ""
    stage, worst = max(spread.items(), key=lambda kv: kv[1]["p95"])
    return (
        f"; tile.raw -> qc.tile p50 {total['p50'] / 1000:.2f} s, p95 {total['p95'] / 1000:.2f} s, "
        f"max {total['max'] / 1000:.2f} s (longest stage at p95: {stage}, {worst['p95']:.0f} ms)"
    )
