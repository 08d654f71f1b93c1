"""The STOMP listener that feeds the acquisition journal: nothing the microscope sends is lost.

A broker keeps no topic message for a consumer that is not connected, so the listener holds a *durable
subscription*: on RabbitMQ's STOMP plugin, a SUBSCRIBE to ``/topic/<topic>`` with ``durable:true``,
``auto-delete:false`` and ``x-queue-name:<subscription name>`` declares one durable queue of that name bound
to ``amq.topic`` with each consumed topic as routing key, and the broker keeps filling it while the listener is
down or restarting. All consumed topics share the one queue, so the journal sees them in the order the
microscope sent them (a ``montage.complete`` never overtakes the montage's last ``tile.raw``).

Each MESSAGE is deserialised as pigeon does (the JSON body validated by the topic's TEM_comms model),
written to the journal, and acknowledged (``ack:client-individual``) only after the journal commit. A
redelivery after a crash between commit and ACK is recognised by the journal (same topic and body) and
changes nothing. A message that fails validation or the edge checks (:mod:`em_platform.edge`: safe ids,
sizes within the montage bounds, a tile path on a scope share) is logged with the topic, the field and the reason, written to the dead
letters (the journal's database, raw body and headers kept) and acknowledged only once that row is
committed: never lost, never retried forever, listed by ``em-platform dead-letters``. A message body larger
than ``max_message_bytes`` (``EM_BROKER_MAX_MESSAGE_BYTES``, 16 MiB) is refused before it is decoded: stomp.py
holds a whole frame before it hands it on, so the connection reads such a body past as it streams (holding at
most the bound: :class:`~em_platform.tem.stomp_connection.FrameBound`), and the listener dead-letters its first
bytes with the whole body's length and SHA-256, then acknowledges it. The broker's own bound (RabbitMQ's
``max_message_size``, ``docker/rabbitmq/40-limits.conf``) refuses it at the sender first. A journal that is
unavailable (database down) leaves the message unacknowledged and is retried with backoff. A lost broker
connection is logged and reconnected with bounded exponential backoff; ``stop`` ends the listener cleanly
(unacknowledged messages return to the queue).

Stopping the listener never deletes its queue (only :func:`delete_subscription` does); run one listener
per subscription name. No Dagster here.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import sqlalchemy as sa
import stomp
import stomp.exception

from em_platform.catalog.dead_letters import KEPT_BODY_BYTES, LetterBody
from em_platform.edge import Refused
from em_platform.metrics.catalogue import BROKER_CONNECTED, DEAD_LETTERS, TILES_RECEIVED
from em_platform.metrics.scopes import scope_of
from em_platform.settings import broker_max_message_bytes
from em_platform.sql import DatabaseUnavailable
from em_platform.tem.broker import (
    DEFAULT_SUBSCRIPTION,
    DEFAULT_TOPIC_PREFIX,
    destination,
    normalize_prefix,
    topic_of,
)
from em_platform.tem.protocol import CONSUMED, ProtocolError, decode, message_version
from em_platform.tem.stomp_connection import (
    BrokerUnavailable,
    StompEvents,
    close_connection,
    drop_connection,
    open_stomp,
    oversized_body,
)

__all__ = [
    "DEFAULT_SUBSCRIPTION",
    "ListenerStats",
    "delete_subscription",
    "run_listener",
    "subscription_headers",
]

DEFAULT_PREFETCH = 200

_log = logging.getLogger(__name__)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
_LOST = object()  # _handle's verdict: the connection is gone (or we are stopping); nothing was acknowledged


class JournalSink(Protocol):
    def record(self, topic: str, payload: dict[str, Any]) -> bool: ...

    def dead_letter(
        self, source: str, topic: str, field: str, reason: str, body: Any, headers: dict[str, Any] | None
    ) -> int: ...


@dataclass
class ListenerStats:
    """What a listener run did (returned by :func:`run_listener`)."""

    received: int = 0
    journaled: int = 0
    duplicates: int = 0  # redeliveries / repeated bodies: acknowledged, journal unchanged
    rejected: int = 0  # invalid, refused or oversized messages: logged, dead-lettered, then acknowledged
    journal_errors: int = 0  # transient journal failures (retried, message not acknowledged meanwhile)
    connections: int = 0
    connect_failures: int = 0

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


def check_subscription_name(name: str) -> str:
    if not _NAME_RE.match(name or "") or name.startswith("amq."):
        raise ValueError(
            f"subscription name {name!r} is not usable as a RabbitMQ queue name: use 1-200 letters, digits, "
            "'_', '.', ':' or '-', starting with a letter or digit and not with 'amq.'"
        )
    return name


def subscription_headers(subscription_name: str) -> dict[str, str]:
    """SUBSCRIBE headers of the durable subscription (RabbitMQ STOMP): one durable, named, kept queue."""
    return {
        "durable": "true",
        "auto-delete": "false",
        "x-queue-name": check_subscription_name(subscription_name),
    }


def subscription_id(subscription_name: str, topic: str) -> str:
    return f"{subscription_name}.{topic}"


def _is_transient(exc: BaseException) -> bool:
    """A journal failure worth waiting out (database down, locked, unreachable), as opposed to a bad message."""
    if isinstance(
        exc,
        DatabaseUnavailable
        | sa.exc.OperationalError
        | sa.exc.InterfaceError
        | sa.exc.TimeoutError
        | sa.exc.DisconnectionError
        | OSError,
    ):
        return True
    return isinstance(exc, sa.exc.DBAPIError) and bool(exc.connection_invalidated)


class _Consumer(StompEvents):
    """Connection events plus MESSAGE frames handed to the listener thread (tagged with the connection)."""

    def __init__(self, generation: int, inbox: queue.Queue):
        super().__init__()
        self.generation = generation
        self.inbox = inbox

    def on_message(self, frame) -> None:
        self.inbox.put((self.generation, frame))

    def on_disconnected(self) -> None:
        super().on_disconnected()
        self.inbox.put((self.generation, None))  # wake the listener now

    def on_error(self, frame) -> None:
        super().on_error(frame)
        if self.connected:  # e.g. "Server cancelled subscription" (queue deleted): reconnect and resubscribe
            self.inbox.put((self.generation, None))


class _JournalListener:
    def __init__(
        self,
        host: str,
        port: int,
        journal: JournalSink,
        *,
        stop: threading.Event,
        subscription_name: str,
        backoff: tuple[float, float],
        log: logging.Logger,
        topic_prefix: str,
        username: str | None,
        password: str | None,
        vhost: str | None,
        tls: str | None,
        prefetch: int,
        connect_timeout: float,
        ready: threading.Event | None,
        max_message_bytes: int,
    ):
        self.host, self.port = host, int(port)
        self.address = f"{host}:{self.port}"
        self.journal = journal
        self.stop = stop
        self.subscription = check_subscription_name(subscription_name)
        self.backoff = (float(backoff[0]), float(backoff[1]))
        if not 0 < self.backoff[0] <= self.backoff[1]:
            raise ValueError(
                f"backoff must be (initial, maximum) seconds with 0 < initial <= maximum, not {backoff}"
            )
        self.log = log
        self.prefix = normalize_prefix(topic_prefix)
        self.username, self.password, self.vhost, self.tls = username, password, vhost, tls
        self.prefetch = int(prefetch)
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be at least 1 byte, not {max_message_bytes}")
        self.max_message_bytes = int(max_message_bytes)
        self.connect_timeout = connect_timeout
        self.ready = ready
        self.stats = ListenerStats()
        self.tile_shares = getattr(journal, "tile_shares", None)  # what names a tile's scope in the metrics
        self.inbox: queue.Queue = queue.Queue()
        self.generation = 0

    # -- connection ---------------------------------------------------------------------------------

    def connect(self) -> tuple[stomp.Connection12, _Consumer]:
        self.generation += 1
        events = _Consumer(self.generation, self.inbox)
        conn = open_stomp(
            self.host,
            self.port,
            events,
            username=self.username,
            password=self.password,
            vhost=self.vhost,
            tls=self.tls,
            timeout=self.connect_timeout,
            max_body=(self.max_message_bytes, KEPT_BODY_BYTES),
        )
        try:
            receipts = []
            for topic in CONSUMED:
                receipt = f"subscribe-{uuid.uuid4().hex}"
                receipts.append((topic, receipt))
                conn.subscribe(
                    destination(topic, self.prefix),
                    id=subscription_id(self.subscription, topic),
                    ack="client-individual",
                    headers={
                        **subscription_headers(self.subscription),
                        "prefetch-count": str(self.prefetch),
                        "receipt": receipt,
                    },
                )
            for topic, receipt in receipts:
                if not events.wait_receipt(receipt, self.connect_timeout):
                    raise BrokerUnavailable(
                        f"the STOMP broker at {self.address} did not confirm the subscription to "
                        f"{destination(topic, self.prefix)}: {events.error or 'no receipt'}"
                    )
        except (stomp.exception.StompException, OSError) as exc:
            drop_connection(conn)
            raise BrokerUnavailable(
                f"lost the STOMP broker at {self.address} while subscribing: {exc}"
            ) from exc
        except BrokerUnavailable:
            drop_connection(conn)
            raise
        return conn, events

    # -- main loop ----------------------------------------------------------------------------------

    def run(self) -> ListenerStats:
        delay = self.backoff[0]
        failures = 0
        self.log.info(
            "listening to %s on the STOMP broker at %s (durable subscription %r)",
            ", ".join(CONSUMED),
            self.address,
            self.subscription,
        )
        BROKER_CONNECTED.labels("listener").set(0)  # the series exists before the first connection
        while not self.stop.is_set():
            try:
                conn, events = self.connect()
            except BrokerUnavailable as exc:
                failures += 1
                self.stats.connect_failures += 1
                self.log.warning("%s (attempt %d); retrying in %.3g s", exc, failures, delay)
                if self.stop.wait(delay):
                    break
                delay = min(delay * 2, self.backoff[1])
                continue
            failures = 0
            self.stats.connections += 1
            self.log.info(
                "subscribed to %s at %s: durable queue %r, ack client-individual",
                ", ".join(destination(t, self.prefix) for t in CONSUMED),
                self.address,
                self.subscription,
            )
            if self.ready is not None:
                self.ready.set()
            BROKER_CONNECTED.labels("listener").set(1)
            started = time.monotonic()
            try:
                progressed = self.consume(conn, events)
            finally:
                BROKER_CONNECTED.labels("listener").set(0)
                if self.ready is not None:
                    self.ready.clear()
                close_connection(conn, events)
            if self.stop.is_set():
                break
            if progressed or time.monotonic() - started > self.backoff[1]:
                delay = self.backoff[0]  # the connection was good for a while: start the backoff over
            self.log.warning(
                "lost the connection to the STOMP broker at %s (%s); unacknowledged messages stay queued "
                "on the broker; reconnecting in %.3g s",
                self.address,
                events.error or "connection closed",
                delay,
            )
            if self.stop.wait(delay):
                break
            delay = min(delay * 2, self.backoff[1])
        self.log.info("listener stopped (%s)", self.stats)
        return self.stats

    def consume(self, conn: stomp.Connection12, events: _Consumer) -> bool:
        progressed = False
        while not self.stop.is_set():
            try:
                generation, frame = self.inbox.get(timeout=0.2)
            except queue.Empty:
                if events.closed:
                    return progressed
                continue
            if generation != events.generation:
                continue  # from an earlier connection: its ack id is void and the broker redelivers it
            if frame is None or events.closed:
                return progressed  # frames still queued from this connection are redelivered to the next one
            if self.handle(conn, events, frame) is _LOST:
                return progressed
            progressed = True
        return progressed

    # -- one message --------------------------------------------------------------------------------

    def handle(self, conn: stomp.Connection12, events: _Consumer, frame) -> object:
        headers = frame.headers
        dest = headers.get("destination", "")
        ack_id = headers.get("ack") or headers.get("message-id")
        msg_id = headers.get("message-id", "?")
        topic = topic_of(dest, self.prefix)
        self.stats.received += 1
        streamed = oversized_body(conn, frame)
        if streamed is not None:  # refused unread: its body went past the bound as it streamed
            body = LetterBody.cut(streamed.head, streamed.length, streamed.sha256)
            reason = (
                f"message body of {streamed.length:,} bytes is larger than the listener's limit of "
                f"{self.max_message_bytes:,} bytes (EM_BROKER_MAX_MESSAGE_BYTES; the broker's max_message_size "
                "should refuse it at the sender: docker/rabbitmq/40-limits.conf)"
            )
            self.log.error(
                "rejected message %s on %r from %s: %s; %s",
                msg_id,
                dest,
                headers.get("source") or headers.get("service") or "unknown sender",
                reason,
                body.describe(),
            )
            where = topic if topic is not None and topic in CONSUMED else dest
            return self.reject(conn, events, frame, where, "(body)", reason, body=body, kind="oversized")
        if topic not in CONSUMED:
            reason = f"not one of the consumed topics {', '.join(CONSUMED)} under prefix {self.prefix!r}"
            self.log.error("rejected message %s on %r: %s", msg_id, dest, reason)
            return self.reject(conn, events, frame, dest, "destination", reason, kind="destination")
        assert topic is not None  # one of CONSUMED
        try:
            payload = decode(topic, frame.body)
        except ProtocolError as exc:
            self.log.error(
                "rejected %s message %s from %s: %s (message version %s, installed %s); body: %.500s",
                topic,
                msg_id,
                headers.get("source") or headers.get("service") or "unknown sender",
                exc,
                headers.get("version", "[undefined]"),
                message_version(topic),
                frame.body,
            )
            fields = ",".join(exc.fields) or "(body)"
            return self.reject(conn, events, frame, topic, fields, str(exc), kind="protocol")

        delay, bad_tries = self.backoff[0], 0
        while True:
            try:
                new = self.journal.record(topic, payload)
                break
            except Refused as exc:
                self.log.error(
                    "rejected %s message %s from %s: %s; body: %.500s",
                    topic,
                    msg_id,
                    headers.get("source") or headers.get("service") or "unknown sender",
                    exc,
                    frame.body,
                )
                return self.reject(conn, events, frame, topic, exc.field, str(exc), kind="refused")
            except Exception as exc:
                if _is_transient(exc):
                    self.stats.journal_errors += 1
                    self.log.warning(
                        "the journal could not record %s message %s (%s: %s); not acknowledged, retrying in %.3g s",
                        topic,
                        msg_id,
                        type(exc).__name__,
                        str(exc).splitlines()[0][:300] if str(exc) else "",
                        delay,
                    )
                    if self.stop.wait(delay) or events.closed:
                        return _LOST  # unacknowledged: the broker redelivers it to the next connection
                    delay = min(delay * 2, self.backoff[1])
                    continue
                bad_tries += 1
                if bad_tries < 2:
                    continue  # e.g. a unique-key race with another writer: the retry sees the row
                self.log.error(
                    "rejected %s message %s: the journal cannot record it (%s: %s); body: %.500s",
                    topic,
                    msg_id,
                    type(exc).__name__,
                    exc,
                    frame.body,
                )
                reason = f"the journal cannot record it ({type(exc).__name__}: {str(exc)[:500]})"
                return self.reject(conn, events, frame, topic, "(journal)", reason, kind="journal")
        if new:
            self.stats.journaled += 1
            if topic == "tile.raw":
                TILES_RECEIVED.labels(scope_of(payload.get("path", ""), self.tile_shares)).inc()
            self.log.debug("journaled %s message %s", topic, msg_id)
        else:
            self.stats.duplicates += 1
            self.log.info(
                "%s message %s was already journaled (redelivered=%s); acknowledging it, nothing changes",
                topic,
                msg_id,
                headers.get("redelivered", "false"),
            )
        try:
            conn.ack(ack_id)
        except (stomp.exception.StompException, OSError) as exc:
            self.log.warning(
                "could not acknowledge %s message %s (%s); the broker will redeliver it", topic, msg_id, exc
            )
            return _LOST
        return None

    def reject(
        self,
        conn: stomp.Connection12,
        events: _Consumer,
        frame,
        topic: str,
        field: str,
        reason: str,
        body: LetterBody | None = None,
        *,
        kind: str,
    ):
        """Dead-letter the message (committed), then acknowledge it: kept, and not delivered again.

        ``body``: what of the body to keep, when the frame does not hold it whole (an oversized message).
        ``kind``: the reason as a metric label, one of a few (oversized, destination, protocol, refused,
        journal).
        A database outage is waited out with the message unacknowledged (the broker keeps it); only if the
        dead letter itself cannot be written is the message NACKed without requeue, its body in the log.
        """
        headers = dict(frame.headers)
        msg_id = headers.get("message-id", "?")
        ack_id = headers.get("ack") or msg_id
        delay, tries = self.backoff[0], 0
        while True:
            try:
                letter = self.journal.dead_letter(
                    "broker", topic, field, reason, frame.body if body is None else body, headers
                )
                break
            except Exception as exc:
                if _is_transient(exc):
                    self.stats.journal_errors += 1
                    self.log.warning(
                        "could not dead-letter %s message %s (%s); not acknowledged, retrying in %.3g s",
                        topic,
                        msg_id,
                        str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                        delay,
                    )
                    if self.stop.wait(delay) or events.closed:
                        return _LOST
                    delay = min(delay * 2, self.backoff[1])
                    continue
                tries += 1
                if tries < 2:
                    continue  # a race with another writer of the same letter: the retry updates its row
                self.log.critical(
                    "could not dead-letter %s message %s (%s: %s); dropping it, body: %s",
                    topic,
                    msg_id,
                    type(exc).__name__,
                    exc,
                    frame.body if body is None else body.describe(),
                )
                self.stats.rejected += 1
                try:
                    conn.nack(ack_id, requeue="false")
                except (stomp.exception.StompException, OSError):
                    return _LOST
                return None
        self.stats.rejected += 1
        DEAD_LETTERS.labels(kind).inc()
        self.log.error(
            "%s message %s dead-lettered as #%d (field %s); see `em-platform dead-letters`",
            topic,
            msg_id,
            letter,
            field,
        )
        try:
            conn.ack(ack_id)
        except (stomp.exception.StompException, OSError) as exc:
            self.log.warning(
                "could not acknowledge dead-lettered message %s (%s); it will come back", msg_id, exc
            )
            return _LOST
        return None


def run_listener(
    host: str,
    port: int,
    journal: JournalSink,
    *,
    stop: threading.Event,
    subscription_name: str = DEFAULT_SUBSCRIPTION,
    backoff: tuple[float, float] = (1, 30),
    log: logging.Logger | None = None,
    topic_prefix: str = DEFAULT_TOPIC_PREFIX,
    username: str | None = None,
    password: str | None = None,
    vhost: str | None = "/",
    tls: str | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    connect_timeout: float = 10.0,
    ready: threading.Event | None = None,
    max_message_bytes: int | None = None,
) -> ListenerStats:
    """Journal every consumed TEM message from the broker at ``host:port`` until ``stop`` is set.

    ``backoff`` is (initial, maximum) seconds between reconnection attempts, doubling each time.
    ``ready`` (optional) is set while subscribed and cleared when the connection is lost.
    ``max_message_bytes``: the largest message body taken (None: ``EM_BROKER_MAX_MESSAGE_BYTES``, 16 MiB; a
    malformed value raises ConfigError naming it); larger ones are dead-lettered unread. Returns the run's
    :class:`ListenerStats`. See the module docstring for the delivery guarantees.
    """
    return _JournalListener(
        host,
        port,
        journal,
        stop=stop,
        subscription_name=subscription_name,
        backoff=backoff,
        log=log or _log,
        topic_prefix=topic_prefix,
        username=username,
        password=password,
        vhost=vhost,
        tls=tls,
        prefetch=prefetch,
        connect_timeout=connect_timeout,
        ready=ready,
        max_message_bytes=broker_max_message_bytes() if max_message_bytes is None else max_message_bytes,
    ).run()


def delete_subscription(
    host: str,
    port: int,
    subscription_name: str = DEFAULT_SUBSCRIPTION,
    *,
    topic_prefix: str = DEFAULT_TOPIC_PREFIX,
    username: str | None = None,
    password: str | None = None,
    vhost: str | None = "/",
    tls: str | None = None,
    timeout: float = 10.0,
) -> None:
    """Delete the durable subscription's queue and every message still in it (RabbitMQ STOMP).

    RabbitMQ deletes a durable subscription's queue on an UNSUBSCRIBE that carries the same ``durable``,
    ``auto-delete`` and ``x-queue-name`` headers as the SUBSCRIBE; only a subscription of this session can
    be unsubscribed, so this subscribes first (one message prefetched, never acknowledged).
    """
    events = StompEvents()
    conn = open_stomp(
        host, port, events, username=username, password=password, vhost=vhost, tls=tls, timeout=timeout
    )
    try:
        headers = subscription_headers(subscription_name)
        sub_id = subscription_id(subscription_name, CONSUMED[0])
        conn.subscribe(
            destination(CONSUMED[0], topic_prefix),
            id=sub_id,
            ack="client-individual",
            headers={**headers, "prefetch-count": "1"},
        )
        receipt = f"unsubscribe-{uuid.uuid4().hex}"
        conn.unsubscribe(id=sub_id, headers={**headers, "receipt": receipt})
        if not events.wait_receipt(receipt, timeout):
            raise BrokerUnavailable(
                f"the STOMP broker at {host}:{port} did not confirm deleting subscription {subscription_name!r}: "
                f"{events.error or 'no receipt'}"
            )
    finally:
        close_connection(conn, events)
