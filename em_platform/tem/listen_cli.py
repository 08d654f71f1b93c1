"""``em-platform listen --broker HOST:PORT``: journal the microscope's messages until SIGINT / SIGTERM.

Wiring (in ``em_platform/cli.py``)::

    listen = sub.add_parser("listen", help="journal the TEM's STOMP messages (tile.raw, montage.*)")
    listen_cli.add_arguments(listen)
    ...
    if args.command == "listen":
        return listen_cli.run(args, lambda: Journal(load_settings().catalog_url))
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from em_platform.metrics.exporter import MetricsConfigError, serve_from
from em_platform.stop_signals import on_stop_signal, restore
from em_platform.tem import protocol
from em_platform.tem.broker import DEFAULT_SUBSCRIPTION, DEFAULT_TOPIC_PREFIX, BrokerSettings, BrokerSpecError

if TYPE_CHECKING:
    from em_platform.tem.listener import JournalSink

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        default=None,
        metavar="HOST:PORT",
        help="STOMP broker, e.g. 127.0.0.1:61613 (RabbitMQ STOMP plugin) or broker:61616 (ActiveMQ Artemis); "
        "default: $EM_BROKER",
    )
    parser.add_argument(
        "--subscription",
        default=DEFAULT_SUBSCRIPTION,
        metavar="NAME",
        help="durable subscription (= broker queue) name; keep it stable so nothing is lost across restarts "
        f"(default: {DEFAULT_SUBSCRIPTION})",
    )
    parser.add_argument(
        "--topic-prefix",
        default=None,
        help="destination prefix of the topics, as pigeon's topic_prefix: '' on ActiveMQ Artemis "
        f"(default: $EM_BROKER_TOPIC_PREFIX, else {DEFAULT_TOPIC_PREFIX}); the verdict publisher uses the same",
    )
    parser.add_argument(
        "--username",
        default=None,
        help="broker login (default: $EM_BROKER_USERNAME; the password is read from $EM_BROKER_PASSWORD)",
    )
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="longest wait between reconnection attempts (default: 30; the first wait is 1 s, doubling)",
    )
    parser.add_argument(
        "--share",
        action="append",
        default=[],
        metavar="DIR",
        help="folder this scope's tiles may lie in, repeatable: a tile.raw path elsewhere is dead-lettered "
        "(default: $EM_SCOPE_SHARES; one listener per scope gives each scope its own shares)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log every journaled message")


def run(args: argparse.Namespace, journal_factory: Callable[[], JournalSink]) -> int:
    """Run the listener in this (main) thread until SIGINT/SIGTERM; 0 on a clean stop, 2 on a usage error."""
    # imported here, not on top: TEM_comms (pigeon) takes 1.4 s to import, which every `em-platform` command paid
    from em_platform.tem.listener import check_subscription_name, run_listener

    try:
        broker = BrokerSettings.from_env(broker=args.broker)
        if broker is None:
            raise ValueError("give --broker HOST:PORT or set EM_BROKER")
        if args.topic_prefix is not None:
            broker = replace(broker, topic_prefix=args.topic_prefix)
        if args.username is not None:
            broker = replace(broker, username=args.username)
        check_subscription_name(args.subscription)
        if not args.max_backoff >= 1:
            raise ValueError(f"--max-backoff must be at least 1 second, not {args.max_backoff}")
    except (BrokerSpecError, ValueError) as exc:
        print(f"em-platform listen: {exc}", file=sys.stderr)
        return 2

    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    log = logging.getLogger("em_platform.listen")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("stomp").setLevel(logging.ERROR)  # its connection warnings duplicate ours

    try:
        journal = journal_factory()
    except Exception as exc:  # DatabaseUnavailable and friends: the message says what to do
        print(f"em-platform listen: cannot open the acquisition journal: {exc}", file=sys.stderr)
        return 2
    try:
        metrics = serve_from(os.environ, "EM_LISTENER_METRICS")
    except MetricsConfigError as exc:
        print(f"em-platform listen: {exc}", file=sys.stderr)
        return 2
    if metrics is not None:
        log.info("metrics at %s", metrics.url)

    shares = getattr(journal, "tile_shares", None)
    if shares is not None:
        log.info(
            "tile.raw paths must lie under %s; anything refused goes to `em-platform dead-letters`",
            ", ".join(shares),
        )
    stop = threading.Event()

    def _stop(signum: int) -> None:  # in a thread of its own (em_platform.stop_signals), once
        log.info("received %s: finishing the current message and disconnecting", signal.Signals(signum).name)
        stop.set()

    previous = on_stop_signal(_stop) if threading.current_thread() is threading.main_thread() else {}
    try:
        stats = run_listener(
            broker.host,
            broker.port,
            journal,
            stop=stop,
            subscription_name=args.subscription,
            backoff=(1.0, float(args.max_backoff)),
            log=log,
            **broker.connection(),
        )
    finally:
        restore(previous)
        dispose = getattr(journal, "dispose", None)
        if callable(dispose):
            dispose()
    print(
        f"em-platform listen: stopped; {stats.journaled} new message(s) journaled, {stats.duplicates} "
        f"redelivered, {stats.rejected} rejected ({', '.join(protocol.CONSUMED)} from {broker.address})"
    )
    return 0
