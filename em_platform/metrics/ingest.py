"""``em_ingest_bytes_total{source}``: the bytes of the source files of every dataset ingested (its catalog
record become complete), counted at each scrape from the catalog's status history.

A counter from the exporter's start (a restart is a reset, which Prometheus's ``increase`` handles), not a
sum of the records kept: a record ingested again counts again, as its bytes came again. Each source's series
starts at 0, so that its first ingest is an increase."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

log = logging.getLogger(__name__)

# cursor -> (the next cursor, (source, catalog record) of each completion after it); None: where to start
Completions = Callable[[int | None], tuple[int, list[tuple[str, dict[str, Any]]]]]


class IngestBytes:
    """A Prometheus collector over the catalog's completions of the ``sources`` ingested."""

    def __init__(self, completions: Completions, sources: Iterable[str]):
        self.completions = completions
        self.counts = dict.fromkeys(sorted(sources), 0)
        self.cursor, _ = completions(None)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            self.cursor, done = self.completions(self.cursor)
        except Exception as exc:  # noqa: BLE001 - the catalog down (em_store_up says so): read them next time
            log.warning("metrics: the catalog did not answer: %s", exc)
            done = []
        for source, record in done:
            if source in self.counts:
                self.counts[source] += int(record["metadata"]["technical"]["file_size_bytes"])
        family = CounterMetricFamily(
            "em_ingest_bytes", "bytes of the source files of the datasets ingested", labels=["source"]
        )
        for source, n in self.counts.items():
            family.add_metric([source], n)
        yield family
