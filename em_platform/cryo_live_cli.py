"""`em-platform cryo-live`: process every single-particle exposure of the cryo session roots as it lands
(:mod:`em_platform.cryo.live_sessions`) until SIGTERM or SIGINT; `--retry` puts the failed ones back first.

It runs behind the live TEM tiles and ahead of the batch work (nice 10, and its session's CPU share at nice
10 where it leads one: the batch workers' is at 19): an exposure has a minute, a live tile a second."""

from __future__ import annotations

import logging
import os
import sys
import threading


def add_arguments(parser) -> None:
    parser.add_argument(
        "--retry", action="store_true", help="process the failed exposures again (after fixing their files)"
    )


def run(args, settings) -> int:
    from em_platform.catalog.dead_letters import DeadLetters
    from em_platform.cluster.batch_priority import BATCH_NICENESS, lower_own_session, lower_thread_priority
    from em_platform.cryo.exposures_db import ExposureStore
    from em_platform.cryo.live_sessions import LiveCryo
    from em_platform.metrics.catalogue import CRYO_EXPOSURES
    from em_platform.metrics.cryo import CryoLag
    from em_platform.metrics.exporter import MetricsConfigError, serve_from
    from em_platform.resources import build_resources
    from em_platform.sql import DatabaseUnavailable
    from em_platform.stop_signals import on_stop_signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s cryo-live %(levelname)s %(message)s")
    try:
        store = ExposureStore(settings.catalog_url)
    except DatabaseUnavailable as exc:
        print(f"em-platform cryo-live: {exc}", file=sys.stderr)
        return 2
    if args.retry:
        print(f"cryo-live: {store.retry()} failed exposure(s) to process again", flush=True)
    from prometheus_client import REGISTRY

    REGISTRY.register(CryoLag(store.oldest_waiting))
    try:
        metrics = serve_from(os.environ, "EM_CRYO_LIVE_METRICS")
    except MetricsConfigError as exc:
        print(f"em-platform cryo-live: {exc}", file=sys.stderr)
        return 2
    lower_thread_priority(BATCH_NICENESS)  # before any thread starts: they inherit it
    lower_own_session(BATCH_NICENESS)
    resources = build_resources(settings)
    roots = resources["cryo_sessions"].roots()
    letters = DeadLetters(settings.catalog_url)

    def dead_letter(session: str, path, refused) -> None:
        letter = letters.add(
            source="session", topic=session, field=refused.field, reason=str(refused), body=str(path)
        )
        logging.getLogger(__name__).error("cryo-live: %s not processed, dead-lettered as #%s", path, letter)

    service = LiveCryo(
        roots,
        store,
        resources["storage"].cryo_live_root(),
        on_exposure=lambda state: CRYO_EXPOSURES.labels(state).inc(),
        dead_letter=dead_letter,
    )
    stop = threading.Event()
    on_stop_signal(lambda _signum: stop.set())
    watched = ", ".join(f"{tag}={root}" for tag, root in roots.items())
    try:
        service.run(
            stop,
            ready=lambda: print(
                f"cryo-live: processing each single-particle exposure as it lands in {watched} as "
                f"{service.owner}" + (f"; metrics at {metrics.url}" if metrics else ""),
                flush=True,
            ),
        )
    finally:
        service.write_stars(force=True)
        store.dispose()
        letters.dispose()
    print("cryo-live: stopped", flush=True)
    return 0
