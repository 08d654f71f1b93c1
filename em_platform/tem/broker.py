"""The STOMP broker between the platform and the microscope: addresses, connections and a publisher that
speaks the way pigeon speaks.

A message is a TEM_comms payload (:mod:`em_platform.tem.protocol`) sent as the JSON body of a STOMP frame by
``pigeon-client``; the destination is ``<prefix><topic>`` (``/topic/`` on RabbitMQ, nothing on the Allen
system's ActiveMQ Artemis). :class:`BrokerSettings` is the one description of a broker (address, topic
prefix, credentials, virtual host) that the listener, the verdict publisher and the simulated scope all
take, from the same ``EM_BROKER*`` environment variables. The consuming side (the durable,
acknowledge-after-commit subscription that feeds the acquisition journal) is
:mod:`em_platform.tem.listener`. No Dagster here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import stomp
import stomp.exception
from pydantic import BaseModel

from em_platform.settings import broker_tls as parse_tls
from em_platform.tem.protocol import validate

__all__ = [
    "DEFAULT_TOPIC_PREFIX",
    "BrokerPublisher",
    "BrokerSettings",
    "BrokerSpecError",
    "BrokerUnavailable",
    "StompEvents",
    "close_connection",
    "destination",
    "drop_connection",
    "normalize_prefix",
    "open_stomp",
    "parse_broker",
    "topic_of",
]

log = logging.getLogger(__name__)

DEFAULT_TOPIC_PREFIX = "/topic/"
DEFAULT_SUBSCRIPTION = "em_platform_journal"  # the listener's durable subscription (a broker queue)
DEFAULT_SERVICE = "em_platform"
HEARTBEATS = (10000, 10000)  # ms, as pigeon


class BrokerSpecError(ValueError):
    """A ``--broker`` value that is not ``HOST:PORT``."""


class BrokerUnavailable(ConnectionError):
    """The STOMP broker cannot be reached (or stopped answering); the message names host:port."""


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


@dataclass(frozen=True)
class BrokerSettings:
    """Where the microscope's broker is and how to talk to it: one description for the listener, the
    verdict publisher and the simulated scope.

    ``topic_prefix``: ``/topic/`` on RabbitMQ's STOMP plugin, empty on ActiveMQ Artemis (as the Allen
    system runs it; pigeon's rule adds a ``.`` to any other prefix not ending in ``/`` or ``.``).
    ``vhost``: the CONNECT ``host`` header (RabbitMQ's virtual host; Artemis ignores it).
    ``tls``: None for plain STOMP, else TLS with the broker's certificate checked (name included) against
    ``"system"``'s CAs or the CA certificate file it names (:func:`parse_tls`; ``EM_BROKER_TLS``).
    """

    host: str
    port: int
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    vhost: str | None = "/"
    tls: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, broker: str | None = None
    ) -> BrokerSettings | None:
        """``EM_BROKER`` (HOST:PORT; or ``broker``), ``EM_BROKER_TOPIC_PREFIX``, ``EM_BROKER_USERNAME``,
        ``EM_BROKER_PASSWORD``, ``EM_BROKER_VHOST`` and ``EM_BROKER_TLS``; None when no broker is set (the
        embedded scope)."""
        env = os.environ if env is None else env
        spec = broker or env.get("EM_BROKER", "").strip()
        if not spec:
            return None
        host, port = parse_broker(spec)
        prefix = env.get("EM_BROKER_TOPIC_PREFIX")
        return cls(
            host,
            port,
            topic_prefix=DEFAULT_TOPIC_PREFIX if prefix is None else prefix.strip(),
            username=env.get("EM_BROKER_USERNAME", "").strip() or None,
            password=env.get("EM_BROKER_PASSWORD") or None,
            vhost=env.get("EM_BROKER_VHOST", "").strip() or "/",
            tls=parse_tls(env.get("EM_BROKER_TLS", "")),
        )

    def publisher(self, **kwargs: Any) -> BrokerPublisher:
        """A :class:`BrokerPublisher` to this broker (keywords: its other options)."""
        return BrokerPublisher(
            self.host,
            self.port,
            topic_prefix=self.topic_prefix,
            username=self.username,
            password=self.password,
            vhost=self.vhost,
            tls=self.tls,
            **kwargs,
        )

    def connection(self) -> dict[str, Any]:
        """The keywords :func:`~em_platform.tem.listener.run_listener` takes for this broker."""
        return {
            "topic_prefix": self.topic_prefix,
            "username": self.username,
            "password": self.password,
            "vhost": self.vhost,
            "tls": self.tls,
        }


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
    tls: str | None = None,
    timeout: float = 10.0,
) -> stomp.Connection12:
    """One STOMP 1.2 connection attempt that cannot hang: connected, or BrokerUnavailable with the reason.

    ``vhost`` goes into the CONNECT ``host`` header: RabbitMQ reads that header as the virtual host, and
    stomp.py would otherwise send the broker's host name there (``Virtual host '127.0.0.1' access denied``).
    ``tls`` (:func:`parse_tls`): STOMP over TLS, the broker's certificate and name verified.
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
    if tls:
        conn.set_ssl(for_hosts=[(host, port)], ca_certs=None if tls == "system" else tls)
    for name, listener in (listeners or {}).items():
        conn.set_listener(name, listener)
    conn.set_listener("em_platform_events", events)
    try:
        conn.connect(username=username, passcode=password, wait=False)
    except (stomp.exception.StompException, OSError) as exc:
        raise BrokerUnavailable(
            f"cannot connect to the STOMP broker at {where}: {_connect_error(host, port, exc, tls)}"
        ) from exc
    sock = conn.transport.socket
    if sock is not None and not tls:
        # the timeout bounds the TCP connect only; an idle subscription must not time out. (Over TLS stomp.py
        # polls a non-blocking socket itself: made blocking, its reader would never hand a frame on.)
        with contextlib.suppress(OSError):  # already closed by the broker: wait_connected says so below
            sock.settimeout(None)
    if not events.wait_connected(timeout):
        reason = events.error or (
            "connection closed" if events.closed else f"no CONNECTED frame in {timeout:g} s"
        )
        if not tls and events.closed:
            reason += " (a STOMP-over-TLS port closes on a plain client: set EM_BROKER_TLS)"
        drop_connection(conn)
        raise BrokerUnavailable(f"the STOMP broker at {where} refused the connection: {reason}")
    return conn


def _connect_error(host: str, port: int, exc: BaseException, tls: str | None = None) -> str:
    """Why a connection failed, in words: stomp.py's ConnectFailedException carries no message, so the
    socket is asked once more for its own error (e.g. ``[Errno 111] Connection refused``), and with ``tls``
    the TLS handshake (e.g. ``certificate verify failed``)."""
    if str(exc):
        return str(exc)
    try:
        sock = socket.create_connection((host, port), timeout=2)
    except OSError as err:
        return str(err) or type(err).__name__
    with sock:
        if not tls:
            return "the TCP port answers but the STOMP handshake failed (is it a STOMP port? over TLS: EM_BROKER_TLS)"
        context = ssl.create_default_context(cafile=None if tls == "system" else tls)
        try:
            context.wrap_socket(sock, server_hostname=host).close()
        except (ssl.SSLError, OSError) as err:
            trust = "the system's CAs" if tls == "system" else tls
            return f"TLS handshake failed: {err} (EM_BROKER_TLS: the broker's certificate checked against {trust})"
    return "the TLS handshake succeeds but the STOMP handshake failed (is it a STOMP port?)"


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
        tls: str | None = None,
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
        from em_platform.tem.pigeon_sender import PigeonSender  # pigeon reads every package's metadata: 0.8 s

        self._pigeon = PigeonSender(
            service, host, self.port, topic_prefix=self.topic_prefix, vhost=vhost, tls=tls, logger=self._log
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
        return self.publish_many([(topic, payload)])[0]

    def publish_many(
        self, messages: Sequence[tuple[str, Mapping[str, Any] | BaseModel]]
    ) -> list[dict[str, Any]]:
        """Validate and send messages in order, then wait for their receipts together: one round trip to
        the broker, not one per message. What the broker did not confirm is sent again after a reconnect
        (at least once). Returns the payloads as sent."""
        data = [(topic, validate(topic, payload)) for topic, payload in messages]
        headers = {"persistent": "true"} if self._persistent else {}
        with self._lock:
            pending, last = list(range(len(data))), None
            for attempt in range(1, self._attempts + 1):
                self.connect()
                sent: list[tuple[int, str]] = []
                try:
                    for i in pending:
                        receipt = uuid.uuid4().hex
                        extra = {"receipt": receipt} if self._confirm else {}
                        self._pigeon._send(data[i][0], data[i][1], timeout=0, headers={**headers, **extra})
                        sent.append((i, receipt))
                except (TimeoutError, OSError, stomp.exception.StompException) as exc:
                    last = exc
                    self._log.warning(
                        "sending %s to %s failed (%s); reconnecting (attempt %d of %d)",
                        data[pending[len(sent)]][0],
                        self.address,
                        exc,
                        attempt,
                        self._attempts,
                    )
                    self._pigeon.drop()
                    continue
                if not self._confirm:
                    return [d for _, d in data]
                events = self._pigeon.events
                pending = [i for i, r in sent if not events.wait_receipt(r, self._receipt_timeout)]
                if not pending:
                    return [d for _, d in data]
                last = BrokerUnavailable(f"no receipt within {self._receipt_timeout:g} s")
                self._log.warning(
                    "the broker at %s did not confirm %d message(s) (%s); reconnecting and sending them again "
                    "(attempt %d of %d)",
                    self.address,
                    len(pending),
                    last,
                    attempt,
                    self._attempts,
                )
                self._pigeon.drop()
            topics = ", ".join(sorted({data[i][0] for i in pending}))
            raise BrokerUnavailable(
                f"could not send {topics} to the STOMP broker at {self.address} after {self._attempts} attempts ({last})"
            ) from last

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._pigeon.close()

    def __enter__(self) -> BrokerPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
