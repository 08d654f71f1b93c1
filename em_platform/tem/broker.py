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

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import stomp.exception
from pydantic import BaseModel

from em_platform.settings import broker_tls as parse_tls
from em_platform.tem.protocol import validate
from em_platform.tem.stomp_connection import BrokerUnavailable

__all__ = [
    "DEFAULT_TOPIC_PREFIX",
    "BrokerPublisher",
    "BrokerSettings",
    "BrokerSpecError",
    "BrokerUnavailable",
    "destination",
    "normalize_prefix",
    "parse_broker",
    "topic_of",
]

log = logging.getLogger(__name__)

DEFAULT_TOPIC_PREFIX = "/topic/"
DEFAULT_SUBSCRIPTION = "em_platform_journal"  # the listener's durable subscription (a broker queue)
DEFAULT_SERVICE = "em_platform"


class BrokerSpecError(ValueError):
    """A ``--broker`` value that is not ``HOST:PORT``."""


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
