"""`em-platform live-qc`: run the warm live-QC service (:mod:`em_platform.tem.live_service`) on this
deployment's journal and acquisition buffer, with threads of its own, until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import os
import sys
import threading


def run(settings) -> int:
    from em_platform.metrics.exporter import MetricsConfigError, serve_from
    from em_platform.resources import DaskResource, build_resources
    from em_platform.stop_signals import on_stop_signal
    from em_platform.tem.heap import keep_freed_memory
    from em_platform.tem.live_service import LiveQCService

    keep_freed_memory()  # tile after tile: the same arrays, from the heap, not faulted in again
    logging.basicConfig(level=logging.INFO, format="%(asctime)s live-qc %(levelname)s %(message)s")
    try:
        metrics = serve_from(os.environ, "EM_LIVE_QC_METRICS")
    except MetricsConfigError as exc:
        print(f"em-platform live-qc: {exc}", file=sys.stderr)
        return 2
    resources = build_resources(settings)
    hardware = resources["hardware"]
    # Live tiles get threads of their own: an in-process cluster, not the deployment's, where a live tile
    # queues behind batch tasks already running whatever its priority (bench_tiles_live --with-batch: p95 8 s
    # on the shared cluster, 0.2 s on its own). EM_LIVE_QC_SCHEDULER points it at a cluster anyway.
    dask = DaskResource(scheduler_address=os.environ.get("EM_LIVE_QC_SCHEDULER", "").strip() or None)
    buffer = resources["storage"].buffer()
    stop = threading.Event()
    on_stop_signal(lambda _signum: stop.set())  # not stop.set() in the handler: the main thread waits on it
    import distributed  # noqa: F401  its logging set-up first, then quieter: one line per montage is enough

    for noisy in ("distributed", "urllib3", "stomp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    client = dask.get_client()
    service = LiveQCService(hardware, buffer, client)
    where = (
        dask.scheduler_address or f"its own in-process cluster of {sum(client.nthreads().values())} threads"
    )
    try:
        service.run(
            stop,
            ready=lambda: print(
                f"live-qc: watching the journal for live montages as {service.owner} (Dask: {where})"
                + (f"; metrics at {metrics.url}" if metrics else ""),
                flush=True,
            ),
        )
    finally:
        dask.teardown_after_execution(None)
        hardware.teardown_after_execution(None)
    print("live-qc: stopped", flush=True)
    return 0


if __name__ == "__main__":
    from em_platform.settings import load_settings

    sys.exit(run(load_settings()))
