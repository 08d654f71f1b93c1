"""The Allen TEM (TilEM) acquisition protocol: TEM_comms messages over STOMP, spoken the way pigeon speaks it.

A message is a Pydantic model of ``pigeon-tem-comms`` (``TEM_comms.topics`` maps topic -> model) sent as
the JSON body of a STOMP frame by ``pigeon-client``; the destination is ``<prefix><topic>`` (``/topic/``
on RabbitMQ, nothing on the Allen system's ActiveMQ Artemis). This module validates payloads against those
models and publishes them through pigeon's own client, so a real pigeon service reads what we send
(same body, same headers: ``service``, ``source``, ``sent_at``, ``version`` ...).

The consuming side (the durable, acknowledge-after-commit subscription that feeds the acquisition journal)
is :mod:`em_platform.tem.listener`. No Dagster here.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import stomp
import stomp.exception
import TEM_comms
from pigeon import Pigeon
from pigeon.client import PigeonListener
from pydantic import BaseModel, ValidationError

__all__ = [
    "CONSUMED",
    "TOPICS",
    "PUBLISHED",
    "BrokerPublisher",
    "BrokerSpecError",
    "BrokerUnavailable",
    "ProtocolError",
    "StompEvents",
    "buffer_status",
    "decode",
    "destination",
    "message_version",
    "model_for",
    "normalize_prefix",
    "open_stomp",
    "parse_broker",
    "topic_of",
    "validate",
]

log = logging.getLogger(__name__)

TOPICS: Mapping[str, type[BaseModel]] = TEM_comms.topics
"""Every topic the installed ``pigeon-tem-comms`` defines, with its model."""

_CONSUMED_WANTED = ("tile.raw", "montage.start", "montage.status", "montage.complete")

CONSUMED: tuple[str, ...] = tuple(t for t in _CONSUMED_WANTED if t in TOPICS)
"""What the platform reads from the microscope. ``montage.start`` only when TEM_comms defines it (2.7 does not)."""

PUBLISHED: tuple[str, ...] = (
    "tile.statistics.min_max_mean",
    "tile.statistics.histogram",
    "tile.statistics.focus",
    "tile.matches",
    "tile.processed",
    "qc.tile",
    "qc.status",
    "buffer.status",
)
"""What the platform sends back: per-tile results, QC verdicts (GOOD / STOP_AT_END / STOP_NOW), buffer state."""

DEFAULT_TOPIC_PREFIX = "/topic/"
DEFAULT_SERVICE = "em_platform"
HEARTBEATS = (10000, 10000)  # ms, as pigeon


class ProtocolError(ValueError):
    """A payload that is not a valid TEM_comms message for its topic; names the topic and the fields."""

    def __init__(self, topic: str, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.topic = topic
        self.fields = fields


class BrokerSpecError(ValueError):
    """A ``--broker`` value that is not ``HOST:PORT``."""


class BrokerUnavailable(ConnectionError):
    """The STOMP broker cannot be reached (or stopped answering); the message names host:port."""


# -- messages ------------------------------------------------------------------------------------------


def model_for(topic: str) -> type[BaseModel]:
    """The TEM_comms model of ``topic``; ProtocolError for a topic this TEM_comms version does not define."""
    try:
        return TOPICS[topic]
    except KeyError:
        raise ProtocolError(
            topic,
            f"unknown TEM_comms topic {topic!r} (pigeon-tem-comms defines {len(TOPICS)} topics, "
            f"e.g. {', '.join(sorted(TOPICS)[:4])}, ...); check the topic name and the installed version",
        ) from None


def _protocol_error(topic: str, exc: ValidationError, what: str) -> ProtocolError:
    fields: list[str] = []
    problems: list[str] = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "(message)"
        fields.append(field)
        shown = err.get("input")
        got = "" if err.get("type") == "missing" else f" (got {shown!r:.60})"
        problems.append(f"field {field!r}: {err.get('msg')}{got}")
    return ProtocolError(
        topic,
        f"invalid {topic} {what} ({model_for(topic).__name__}): " + "; ".join(problems),
        tuple(fields),
    )


def validate(topic: str, payload: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    """Validate ``payload`` against the topic's TEM_comms model; the JSON-ready dict (``model_dump(mode="json")``).

    Raises :class:`ProtocolError` naming the topic and each bad field.
    """
    model = model_for(topic)
    if isinstance(payload, BaseModel):
        payload = payload.model_dump()
    if not isinstance(payload, Mapping):
        raise ProtocolError(
            topic, f"a {topic} message must be a mapping of fields, not {type(payload).__name__}"
        )
    try:
        return model.model_validate(dict(payload)).model_dump(mode="json")
    except ValidationError as exc:
        raise _protocol_error(topic, exc, "message") from exc


def decode(topic: str, body: str | bytes) -> dict[str, Any]:
    """A received frame body -> the JSON-ready dict, with pigeon's semantics (``Model.deserialize`` = JSON validation)."""
    model = model_for(topic)
    try:
        return model.model_validate_json(body).model_dump(mode="json")
    except ValidationError as exc:
        raise _protocol_error(topic, exc, "frame body") from exc
    except (TypeError, ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(topic, f"undecodable {topic} frame body: {exc}") from exc


def message_version(topic: str) -> str:
    """The installed message-package version pigeon puts in the ``version`` header of ``topic``."""
    from pigeon.utils import get_version

    return get_version(model_for(topic))


def buffer_status(queue_length: int, free_space: int, upload_rate: float) -> dict[str, Any]:
    """A validated ``buffer.status`` message, as the Allen tile upload buffer reports itself.

    ``queue_length``: tiles (objects) still waiting to upload; ``free_space``: bytes free on the buffer's
    disk; ``upload_rate``: bits per second. TEM_comms wants integers, so the rate is rounded.
    """
    return validate(
        "buffer.status",
        {"queue_length": int(queue_length), "free_space": int(free_space), "upload_rate": round(upload_rate)},
    )


# -- broker addresses ------------------------------------------------------------------------------------


def normalize_prefix(prefix: str) -> str:
    """Pigeon's rule: a non-empty prefix not ending in ``/`` or ``.`` gets a ``.`` (``"em"`` -> ``"em."``)."""
    if prefix and prefix[-1] not in "./":
        return prefix + "."
    return prefix


def destination(topic: str, prefix: str = DEFAULT_TOPIC_PREFIX) -> str:
    return normalize_prefix(prefix) + topic


def topic_of(dest: str, prefix: str = DEFAULT_TOPIC_PREFIX) -> str | None:
    """The topic of a frame's ``destination`` header, or None when it lacks the prefix."""
    prefix = normalize_prefix(prefix)
    return dest[len(prefix) :] if dest.startswith(prefix) else None


_BROKER_RE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d{1,5})$")


def parse_broker(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) -> ``(host, port)``; BrokerSpecError saying what is wrong otherwise."""
    m = _BROKER_RE.match((spec or "").strip())
    if not m:
        raise BrokerSpecError(
            f"broker {spec!r} is not HOST:PORT; give e.g. --broker 127.0.0.1:61613 "
            "(RabbitMQ's STOMP plugin) or --broker broker:61616 (ActiveMQ Artemis)"
        )
    port = int(m["port"])
    if not 0 < port < 65536:
        raise BrokerSpecError(f"broker {spec!r}: port {port} is not in 1..65535")
    return (m["v6"] or m["host"]), port


# -- publishing ------------------------------------------------------------------------------------------


class StompEvents(stomp.ConnectionListener):
    """Connected / error / disconnected / receipts of one stomp connection, as waitable state."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.connected = False
        self.closed = False
        self.error: str | None = None
        self._receipts: set[str] = set()

    def on_connected(self, frame) -> None:
        with self._cond:
            self.connected = True
            self._cond.notify_all()

    def on_error(self, frame) -> None:
        with self._cond:
            self.error = f"{frame.headers.get('message', 'ERROR')}: {str(frame.body).strip()}"[:500]
            self._cond.notify_all()

    def on_disconnected(self) -> None:
        with self._cond:
            self.connected = False
            self.closed = True
            self._cond.notify_all()

    def on_receipt(self, frame) -> None:
        with self._cond:
            self._receipts.add(frame.headers.get("receipt-id", ""))
            self._cond.notify_all()

    def wait_connected(self, timeout: float) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self.connected or self.closed or self.error, timeout)
            return self.connected and not self.closed

    def wait_receipt(self, receipt: str, timeout: float) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: receipt in self._receipts or self.closed, timeout)
            found = receipt in self._receipts
            self._receipts.discard(receipt)
            return found

    def wait_closed(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.closed, timeout)


def open_stomp(
    host: str,
    port: int,
    events: StompEvents,
    *,
    listeners: Mapping[str, stomp.ConnectionListener] | None = None,
    username: str | None = None,
    password: str | None = None,
    vhost: str | None = "/",
    timeout: float = 10.0,
) -> stomp.Connection12:
    """One STOMP 1.2 connection attempt that cannot hang: connected, or BrokerUnavailable with the reason.

    ``vhost`` goes into the CONNECT ``host`` header: RabbitMQ reads that header as the virtual host, and
    stomp.py would otherwise send the broker's host name there (``Virtual host '127.0.0.1' access denied``).
    """
    where = f"{host}:{port}"
    conn = stomp.Connection12(
        [(host, port)],
        heartbeats=HEARTBEATS,
        reconnect_attempts_max=1,  # one try; the callers own the retries and their backoff
        reconnect_sleep_initial=0.0,
        vhost=vhost,
        timeout=timeout,
    )
    for name, listener in (listeners or {}).items():
        conn.set_listener(name, listener)
    conn.set_listener("em_platform_events", events)
    try:
        conn.connect(username=username, passcode=password, wait=False)
    except (stomp.exception.StompException, OSError) as exc:
        raise BrokerUnavailable(
            f"cannot connect to the STOMP broker at {where}: {exc or 'connection refused or unreachable'}"
        ) from exc
    sock = conn.transport.socket
    if sock is not None:
        sock.settimeout(
            None
        )  # the timeout bounds the TCP connect only; an idle subscription must not time out
    if not events.wait_connected(timeout):
        reason = events.error or (
            "connection closed" if events.closed else f"no CONNECTED frame in {timeout:g} s"
        )
        drop_connection(conn)
        raise BrokerUnavailable(f"the STOMP broker at {where} refused the connection: {reason}")
    return conn


def drop_connection(conn: stomp.Connection12) -> None:
    """Close the socket now (no DISCONNECT handshake); unacknowledged messages go back to the queue."""
    transport = conn.transport
    if transport.socket is not None:
        try:
            transport.disconnect_socket()
        except Exception:  # already gone
            pass


def close_connection(conn: stomp.Connection12, events: StompEvents, timeout: float = 2.0) -> None:
    """DISCONNECT politely (bounded wait), then make sure the socket is closed."""
    if conn.is_connected():
        try:
            conn.disconnect()
            events.wait_closed(timeout)
        except Exception:
            pass
    drop_connection(conn)


class _PigeonSender(Pigeon):
    """pigeon's client with the connection handling replaced: no reconnect from the receiver thread, a
    connection attempt that cannot hang, and a virtual host in the CONNECT frame (see :func:`open_stomp`).
    Sending is pigeon's own ``_send``: same body and headers as every pigeon service."""

    def __init__(self, service: str, host: str, port: int, *, topic_prefix: str, vhost: str | None, logger):
        super().__init__(service, host=host, port=port, logger=logger, topic_prefix=topic_prefix)
        self._host_port = (host, port)
        self._vhost = vhost
        self._dropping = False
        self.events = StompEvents()

    def _handle_reconnect(self) -> None:  # called by stomp's receiver thread on a lost connection
        self._connected = False
        if not self._dropping:
            self._logger.warning(
                "lost the connection to the STOMP broker %s:%d; the next publish reconnects", *self._host_port
            )

    def connect_once(self, username: str | None, password: str | None, timeout: float) -> None:
        self.drop()
        self.events = StompEvents()
        self._connection = open_stomp(
            *self._host_port,
            self.events,
            listeners={"listener": PigeonListener(self._handle_message, self._handle_reconnect)},
            username=username,
            password=password,
            vhost=self._vhost,
            timeout=timeout,
        )
        self._connected = True

    def drop(self) -> None:
        self._connected = False
        self._dropping = True
        try:
            drop_connection(self._connection)
        finally:
            self._dropping = False

    def close(self, timeout: float = 2.0) -> None:
        self._connected = False
        self._dropping = True
        close_connection(self._connection, self.events, timeout)


class BrokerPublisher:
    """Publish validated TEM_comms messages to a STOMP broker through pigeon's client.

    Every message is validated first (:class:`ProtocolError` naming the field). With ``confirm`` (the
    default) a send waits for the broker's RECEIPT, so a message is known to have reached the broker;
    a send that fails or gets no receipt reconnects with exponential backoff and sends again (at least
    once). ``persistent`` asks the broker to store the message on disk (RabbitMQ / Artemis
    ``persistent:true``) so a durable subscriber gets it even across a broker restart. When the broker
    cannot be reached after ``connect_attempts`` tries, :class:`BrokerUnavailable` names host:port.
    Thread-safe; use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        topic_prefix: str = DEFAULT_TOPIC_PREFIX,
        username: str | None = None,
        password: str | None = None,
        service: str = DEFAULT_SERVICE,
        vhost: str | None = "/",
        connect_attempts: int = 5,
        backoff: tuple[float, float] = (0.5, 8.0),
        connect_timeout: float = 10.0,
        confirm: bool = True,
        receipt_timeout: float = 10.0,
        persistent: bool = True,
        lazy: bool = False,
        log: logging.Logger | None = None,
    ):
        self.host, self.port = host, int(port)
        self.topic_prefix = normalize_prefix(topic_prefix)
        self._username, self._password = username, password
        self._attempts = max(1, int(connect_attempts))
        self._backoff = (float(backoff[0]), float(backoff[1]))
        self._connect_timeout = connect_timeout
        self._confirm = confirm
        self._receipt_timeout = receipt_timeout
        self._persistent = persistent
        self._log = log or logging.getLogger(__name__)
        self._lock = threading.RLock()
        self._closed = False
        self._pigeon = _PigeonSender(
            service, host, self.port, topic_prefix=self.topic_prefix, vhost=vhost, logger=self._log
        )
        if not lazy:
            self.connect()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return bool(self._pigeon._connected) and self._pigeon._connection.is_connected()

    def connect(self) -> None:
        """Connect (if not connected), retrying with exponential backoff; BrokerUnavailable after the last try."""
        with self._lock:
            if self._closed:
                raise BrokerUnavailable(f"publisher to {self.address} is closed")
            if self.connected:
                return
            delay, last = self._backoff[0], None
            for attempt in range(1, self._attempts + 1):
                try:
                    self._pigeon.connect_once(self._username, self._password, self._connect_timeout)
                    self._log.info("connected to the STOMP broker at %s (publisher)", self.address)
                    return
                except BrokerUnavailable as exc:
                    last = exc
                    if attempt < self._attempts:
                        self._log.warning(
                            "%s (attempt %d of %d); retrying in %.2g s", exc, attempt, self._attempts, delay
                        )
                        time.sleep(delay)
                        delay = min(delay * 2, self._backoff[1])
            raise BrokerUnavailable(
                f"could not connect to the STOMP broker at {self.address} after {self._attempts} attempts "
                f"({last}); check that the broker runs and that --broker / EM_BROKER points at it"
            ) from last

    def subscribe(self, topic: str, callback: Callable[..., None]) -> None:
        """Call ``callback(message)`` (the TEM_comms model) for each message on ``topic``, on this connection.

        For a peer that listens as well as talks (the simulated scope hearing ``qc.status``). Not
        re-subscribed after a reconnect: a long-lived consumer is :func:`em_platform.tem.listener.run_listener`.
        """
        with self._lock:
            self.connect()
            self._pigeon.subscribe(topic, callback)

    def publish(self, topic: str, payload: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
        """Validate and send one message; returns the payload as sent (JSON-ready dict)."""
        data = validate(topic, payload)
        headers: dict[str, str] = {}
        if self._persistent:
            headers["persistent"] = "true"
        with self._lock:
            last: Exception | None = None
            for attempt in range(1, self._attempts + 1):
                self.connect()
                receipt = uuid.uuid4().hex
                send_headers = {**headers, "receipt": receipt} if self._confirm else headers
                try:
                    self._pigeon._send(topic, data, timeout=0, headers=send_headers)
                except (TimeoutError, OSError, stomp.exception.StompException) as exc:
                    last = exc
                    self._log.warning(
                        "sending %s to %s failed (%s); reconnecting (attempt %d of %d)",
                        topic,
                        self.address,
                        exc,
                        attempt,
                        self._attempts,
                    )
                    self._pigeon.drop()
                    continue
                if not self._confirm or self._pigeon.events.wait_receipt(receipt, self._receipt_timeout):
                    return data
                last = BrokerUnavailable(f"no receipt within {self._receipt_timeout:g} s")
                self._log.warning(
                    "the broker at %s did not confirm %s (%s); reconnecting and sending again (attempt %d of %d)",
                    self.address,
                    topic,
                    last,
                    attempt,
                    self._attempts,
                )
                self._pigeon.drop()
            raise BrokerUnavailable(
                f"could not send {topic} to the STOMP broker at {self.address} after {self._attempts} attempts ({last})"
            ) from last

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._pigeon.close()

    def __enter__(self) -> BrokerPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
