"""`em-platform metrics`: the facility's exporter. Serves, at ``EM_METRICS`` (default 127.0.0.1:9472), the
gauges read from the stores at each scrape (montages being acquired and their newest tile by scope, tiles
waiting for a verdict, the oldest montage not yet uploaded, the buffer's disk, the SLURM queue) and the runs
that ended, until SIGTERM or SIGINT. The live-QC service and the listener serve their own counters."""

from __future__ import annotations

import logging
import os
import sys
import threading
from datetime import UTC, datetime, timedelta

OPEN_MONTAGES_WINDOW = timedelta(days=1)  # a montage left open for longer was abandoned, not being acquired
UPLOAD_WINDOW = timedelta(days=7)  # montages completed this recently are watched until they are uploaded
DEFAULT_ADDRESS = "127.0.0.1:9472"


def _ingest_sources() -> tuple[str, ...]:
    from em_platform.ingest.local import SOURCE as LOCAL
    from em_platform.sources.registry import SOURCES

    return (*SOURCES, LOCAL)


def run(settings) -> int:
    from prometheus_client import REGISTRY

    from em_platform.catalog.db import CatalogDB
    from em_platform.cluster.slurm import queue_summary
    from em_platform.metrics.exporter import MetricsConfigError, serve_from
    from em_platform.metrics.facility import FacilityCollector, FacilityReaders
    from em_platform.metrics.ingest import IngestBytes
    from em_platform.stop_signals import on_stop_signal
    from em_platform.tem.journal import Journal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s metrics %(levelname)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Dagster's storage checks its schema at each open
    journal = Journal(settings.catalog_url, tile_shares=settings.scope_shares)
    catalog = CatalogDB(settings.catalog_url)
    readers = FacilityReaders(
        open_montages=lambda: journal.open_montages(datetime.now(UTC) - OPEN_MONTAGES_WINDOW),
        upload_lag=lambda now: upload_lag(journal, catalog, now),
        buffer=settings.buffer if "://" not in settings.buffer else None,
        slurm=queue_summary if settings.compute == "slurm" else None,
        shares=tuple(settings.scope_shares),
    )
    REGISTRY.register(FacilityCollector(readers))
    REGISTRY.register(IngestBytes(catalog.completions_after, _ingest_sources()))
    if os.environ.get("DAGSTER_HOME", "").strip():
        import dagster as dg

        from em_platform.run_metrics import RunCounts

        REGISTRY.register(RunCounts(dg.DagsterInstance.get()))
    env = {**os.environ, "EM_METRICS": os.environ.get("EM_METRICS", "").strip() or DEFAULT_ADDRESS}
    try:
        address = serve_from(env, "EM_METRICS")
    except MetricsConfigError as exc:
        print(f"em-platform metrics: {exc}", file=sys.stderr)
        return 2
    assert address is not None  # EM_METRICS is set (env above): it is served
    stop = threading.Event()
    on_stop_signal(lambda _signum: stop.set())
    print(f"metrics: the facility's gauges at {address.url}", flush=True)
    stop.wait()
    journal.dispose()
    print("metrics: stopped", flush=True)
    return 0


def upload_lag(journal, catalog, now: float) -> float:
    """Seconds the oldest montage completed (within :data:`UPLOAD_WINDOW`) and sent GOOD has waited without
    an archived catalog record; 0 when none waits. A montage its checks stopped (STOP_AT_END, STOP_NOW) is
    not expected upstairs, and one whose upload failed is a failed run's to report."""
    from em_platform.catalog.status import Status
    from em_platform.tem.archive import SOURCE

    completed = journal.completed_since(datetime.fromtimestamp(now, UTC) - UPLOAD_WINDOW)
    records = catalog.statuses(SOURCE, [m for m, _, qc in completed if qc in (None, "GOOD")])
    settled = {Status.COMPLETE, Status.FAILED, Status.CANCELLED}
    waiting = [
        at.timestamp()
        for m, at, qc in completed
        if qc in (None, "GOOD") and records.get(m, (None,))[0] not in settled
    ]
    return max(0.0, now - min(waiting)) if waiting else 0.0
