"""Every metric the platform's own code counts, in one place, named by Prometheus's conventions (``em_``,
base units, ``_total`` for counters, which prometheus_client appends) and the field's words.

Counters and histograms live in the process that does the work (the live-QC service, the listener); a
process nobody scrapes (a Dagster run's) counts too, at no cost worth measuring, and is never read."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# tile arrival -> verdict: the live target is p95 < 1 s (issue 51), so the buckets are fine below 2 s and
# coarse beyond, where a tile is late whatever the figure
LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)

TILES_RECEIVED = Counter(
    "em_tiles_received", "tile.raw messages journaled for the first time, by scope share", ["scope"]
)
TILES_JUDGED = Counter(
    "em_tiles_judged",
    "tiles whose verdict (qc.tile) was sent, by scope share and verdict",
    ["scope", "verdict"],
)
LIVE_QC_LATENCY = Histogram(
    "em_live_qc_latency_seconds",
    "a tile's arrival in the journal to its verdict committed for the scope",
    buckets=LATENCY_BUCKETS,
)
DEAD_LETTERS = Counter(
    "em_dead_letters", "broker messages dead-lettered instead of journaled, by reason", ["reason"]
)
BROKER_CONNECTED = Gauge(
    "em_broker_connected", "1 while the service holds its broker subscription, else 0", ["service"]
)
CRYO_EXPOSURES = Counter(
    "em_cryo_exposures",
    "single-particle exposures of the live sessions, by what became of them: landed (the movie complete), "
    "processed, failed",
    ["session_state"],
)
