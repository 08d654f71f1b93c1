"""The facility's gauges, read from the stores at each scrape (a Prometheus custom collector): the montages
being acquired by scope and their newest tile, the tiles waiting for a verdict, the oldest montage not yet
uploaded, the buffer's disk, the SLURM queue.

Each reader is a callable the caller wires to its store, so this module knows no store. A reader that fails
(the database or slurmctld down) gives ``em_store_up{store} 0`` and its gauges are left out: its alerts
neither fire nor resolve on a guess, and ``em_store_up == 0`` says why."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric

from em_platform.metrics.scopes import scope_of

log = logging.getLogger(__name__)


@dataclass
class FacilityReaders:
    """Where each gauge comes from; None leaves a part out (no SLURM on a laptop)."""

    open_montages: Callable[[], Iterable] | None = None  # objects with last_arrival, a_tile_path, unjudged
    upload_lag: Callable[[float], float] | None = None  # now -> seconds the oldest unuploaded montage waits
    buffer: str | None = None  # a local folder
    # now -> an object with jobs (state -> n) and oldest_pending_s
    slurm: Callable[[float], object] | None = None
    shares: tuple[str, ...] = ()


class FacilityCollector:
    def __init__(self, readers: FacilityReaders, clock: Callable[[], float] = time.time):
        self.readers, self.clock = readers, clock

    def describe(self) -> list[Metric]:
        return []  # nothing read when it is registered: a scrape reads the stores

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        up = GaugeMetricFamily("em_store_up", "1 if the store answered this scrape, else 0", labels=["store"])
        r = self.readers
        # Only the readers that are wired, in this order; None leaves a store (and its em_store_up) out.
        parts: list[tuple[str, Callable[[], list[Metric]]]] = []
        if (open_montages := r.open_montages) is not None:
            parts.append(("journal", lambda: self._montages(open_montages())))
        if (upload_lag := r.upload_lag) is not None:
            parts.append(
                (
                    "catalog",
                    lambda: [
                        _gauge(
                            "em_montage_upload_lag_seconds",
                            "how long the oldest montage completed and not yet uploaded has waited since its "
                            "last tile",
                            upload_lag(now),
                        )
                    ],
                )
            )
        if (buffer := r.buffer) is not None:
            parts.append(("buffer", lambda: self._buffer(buffer)))
        if (slurm := r.slurm) is not None:
            parts.append(("slurm", lambda: self._slurm(slurm(now))))
        for store, part in parts:
            try:
                metrics = list(part())
            except Exception as exc:  # noqa: BLE001 - a store down is a reading, not a crash
                log.warning("metrics: the %s did not answer: %s", store, exc)
                up.add_metric([store], 0)
                continue
            up.add_metric([store], 1)
            yield from metrics
        yield up

    def _montages(self, open_montages: Iterable) -> list[Metric]:
        counts: dict[str, int] = {}
        newest: dict[str, float] = {}
        unjudged = 0
        for m in open_montages:
            scope = scope_of(m.a_tile_path or "", self.readers.shares)
            counts[scope] = counts.get(scope, 0) + 1
            newest[scope] = max(newest.get(scope, 0.0), m.last_arrival.timestamp())
            unjudged += m.unjudged
        opened = GaugeMetricFamily(
            "em_montages_open", "montages being acquired, by scope share", labels=["scope"]
        )
        last = GaugeMetricFamily(
            "em_montage_last_tile_timestamp_seconds",
            "when the newest tile of a scope's open montages arrived",
            labels=["scope"],
        )
        for scope in sorted(counts):
            opened.add_metric([scope], counts[scope])
            last.add_metric([scope], newest[scope])
        backlog = _gauge("em_journal_backlog", "tiles of the open montages without a verdict yet", unjudged)
        return [opened, last, backlog]

    @staticmethod
    def _buffer(folder: str) -> list[Metric]:
        """The filesystem the buffer is (or, before its first montage, will be) on."""
        path = Path(folder)
        while not path.exists() and path != path.parent:
            path = path.parent
        usage = shutil.disk_usage(path)
        return [
            _gauge("em_buffer_free_bytes", "free bytes on the acquisition buffer's filesystem", usage.free),
            _gauge("em_buffer_size_bytes", "size of the acquisition buffer's filesystem", usage.total),
        ]

    @staticmethod
    def _slurm(queue) -> list[Metric]:
        jobs = GaugeMetricFamily("em_slurm_jobs", "the platform's SLURM jobs, by state", labels=["state"])
        for state in sorted({"PENDING", "RUNNING", *queue.jobs}):
            jobs.add_metric([state.lower()], queue.jobs.get(state, 0))
        waited = _gauge(
            "em_slurm_oldest_pending_seconds",
            "how long the longest-waiting pending job has waited",
            queue.oldest_pending_s,
        )
        return [jobs, waited]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
