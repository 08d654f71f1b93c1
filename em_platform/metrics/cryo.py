"""``em_cryo_processing_lag_seconds``: how far processing is behind acquisition, read at each scrape: the age
of the oldest exposure whose movie is complete and that is not yet processed (0 when none waits). It grows
while the service is down or falls behind, which a counter of exposures processed cannot tell."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)


class CryoLag:
    """A Prometheus collector over ``oldest_waiting`` (when the longest-waiting exposure was complete)."""

    def __init__(self, oldest_waiting: Callable[[], datetime | None], clock: Callable[[], float] = time.time):
        self.oldest_waiting, self.clock = oldest_waiting, clock

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            oldest = self.oldest_waiting()
        except Exception as exc:  # noqa: BLE001 - the database away: no figure rather than a wrong one
            log.warning("metrics: the results database did not answer: %s", exc)
            return
        lag = max(0.0, self.clock() - oldest.timestamp()) if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "em_cryo_processing_lag_seconds",
            "age of the oldest complete exposure not yet processed (0 when none waits)",
            value=lag,
        )
