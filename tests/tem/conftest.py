"""Fixtures for the TEM protocol tests: the real STOMP broker (RabbitMQ's STOMP plugin on 127.0.0.1:61613),
pigeon clients that talk to it the way a TEM service does, a TCP proxy that can cut connections, listener
threads and a log watcher to wait on (no sleeps standing in for synchronisation).

Every test gets its own topic namespace (``/topic/<ns>.tile.raw`` ...) and subscription name, so tests do not
see each other's messages; the durable queue is deleted afterwards so nothing accumulates on the broker.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import stomp
from pigeon import Pigeon

from em_platform.tem.listener import ListenerStats, delete_subscription, run_listener

STOMP_HOST = os.environ.get("EM_TEST_STOMP_HOST", "127.0.0.1")
STOMP_PORT = int(os.environ.get("EM_TEST_STOMP_PORT", "61613"))


# -- log watching -------------------------------------------------------------------------------------


class LogWatcher(logging.Handler):
    """Collects a logger's messages and lets a test wait for them."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[tuple[int, str]] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.messages.append((record.levelno, record.getMessage()))
            self._cond.notify_all()

    def matching(self, pattern: str, level: int = logging.DEBUG) -> list[str]:
        rx = re.compile(pattern)
        with self._cond:
            return [m for lv, m in self.messages if lv >= level and rx.search(m)]

    def wait_for(
        self, pattern: str, count: int = 1, timeout: float = 10.0, level: int = logging.DEBUG
    ) -> list[str]:
        rx = re.compile(pattern)
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum(1 for lv, m in self.messages if lv >= level and rx.search(m)) >= count, timeout
            )
            if not ok:
                shown = "\n  ".join(m for _, m in self.messages[-30:])
                raise AssertionError(
                    f"no {count} log message(s) matching {pattern!r} in {timeout} s; got:\n  {shown}"
                )
            return [m for lv, m in self.messages if lv >= level and rx.search(m)]


@pytest.fixture
def listener_log() -> Iterator[tuple[logging.Logger, LogWatcher]]:
    logger = logging.getLogger(f"tests.tem.listener.{uuid.uuid4().hex[:8]}")
    logger.setLevel(logging.DEBUG)
    watcher = LogWatcher()
    logger.addHandler(watcher)
    try:
        yield logger, watcher
    finally:
        logger.removeHandler(watcher)


# -- a TCP proxy that can cut every connection through it ----------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the broker; :meth:`cut` kills every open connection (a network fault)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self.accepted = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="tcp-proxy-accept").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
                self.accepted += 1
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True, name="tcp-proxy-pump").start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self.cut()


@pytest.fixture
def tcp_proxy(stomp_broker) -> Iterator[TcpProxy]:
    proxy = TcpProxy((stomp_broker.host, stomp_broker.port))
    try:
        yield proxy
    finally:
        proxy.close()


# -- the broker ----------------------------------------------------------------------------------------


class _Receipts(stomp.ConnectionListener):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.seen: set[str] = set()

    def on_receipt(self, frame) -> None:
        with self._cond:
            self.seen.add(frame.headers.get("receipt-id", ""))
            self._cond.notify_all()

    def wait(self, receipt: str, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: receipt in self.seen, timeout):
                raise AssertionError(f"no receipt {receipt!r} from the broker in {timeout} s")


@dataclass
class StompBroker:
    host: str
    port: int
    namespace: str
    subscription: str
    _pigeons: list[Pigeon] = field(default_factory=list)
    _raw: list[stomp.Connection12] = field(default_factory=list)

    @property
    def topic_prefix(self) -> str:
        """This test's topics: ``/topic/<ns>.tile.raw`` ... (pigeon adds the dot the same way)."""
        return f"/topic/{self.namespace}."

    def pigeon(self, service: str = "pytem-sim") -> Pigeon:
        """A connected pigeon client in this test's namespace, as a TEM service would create it.

        The one change: the STOMP ``host`` header is set to RabbitMQ's virtual host ``/`` (stomp.py would
        send ``127.0.0.1``, which RabbitMQ reads as a virtual host and refuses); ActiveMQ ignores it.
        """
        client = Pigeon(
            service, host=self.host, port=self.port, topic_prefix=self.topic_prefix, connection_timeout=5
        )
        client._connection.transport.vhost = "/"
        client._connection.set_listener("test_receipts", _Receipts())
        client.connect()
        self._pigeons.append(client)
        return client

    def sync(self, client: Pigeon) -> None:
        """Return once the broker has processed every frame ``client`` sent so far (e.g. a SUBSCRIBE)."""
        receipt = f"sync-{uuid.uuid4().hex}"
        client._connection.send(destination=f"{self.topic_prefix}sync", body="", headers={"receipt": receipt})
        client._connection.get_listener("test_receipts").wait(receipt)

    def send_raw(self, topic: str, body: str, headers: dict[str, str] | None = None) -> None:
        """Send any body (e.g. a malformed one) to a topic, confirmed by the broker."""
        if not self._raw:
            conn = stomp.Connection12([(self.host, self.port)], vhost="/")
            conn.set_listener("receipts", _Receipts())
            conn.connect(wait=True)
            self._raw.append(conn)
        conn = self._raw[0]
        receipt = f"raw-{uuid.uuid4().hex}"
        conn.send(
            destination=self.topic_prefix + topic, body=body, headers={**(headers or {}), "receipt": receipt}
        )
        conn.get_listener("receipts").wait(receipt)

    def close(self) -> None:
        for client in self._pigeons:
            client._connection.remove_listener("listener")  # pigeon would reconnect on our disconnect
            client.disconnect()
        for conn in self._raw:
            conn.disconnect()
        delete_subscription(self.host, self.port, self.subscription, topic_prefix=self.topic_prefix)


@pytest.fixture
def stomp_broker() -> Iterator[StompBroker]:
    """The real STOMP broker, or a skip that says why (RabbitMQ with the STOMP plugin on 127.0.0.1:61613)."""
    try:
        socket.create_connection((STOMP_HOST, STOMP_PORT), timeout=2).close()
    except OSError as exc:
        reason = (
            f"STOMP broker not reachable at {STOMP_HOST}:{STOMP_PORT} ({exc}); start RabbitMQ and "
            "`rabbitmq-plugins enable rabbitmq_stomp` (make services) to run the broker tests"
        )
        print(reason)
        pytest.skip(reason)
    ns = f"t{uuid.uuid4().hex[:10]}"
    broker = StompBroker(STOMP_HOST, STOMP_PORT, namespace=ns, subscription=f"em_test_{ns}")
    try:
        yield broker
    finally:
        broker.close()


# -- listener threads ------------------------------------------------------------------------------------


class ListenerThread:
    """``run_listener`` in a thread, with its ``stop`` and ``ready`` events."""

    def __init__(self, host: str, port: int, journal, **kwargs):
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.stats: ListenerStats | None = None
        self.error: BaseException | None = None
        self._args = (host, port, journal)
        self._kwargs = kwargs
        self.thread = threading.Thread(target=self._run, daemon=True, name="test-listener")

    def _run(self) -> None:
        try:
            self.stats = run_listener(*self._args, stop=self.stop, ready=self.ready, **self._kwargs)
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    def start(self, wait_ready: bool = True, timeout: float = 10.0) -> ListenerThread:
        self.thread.start()
        if wait_ready and not self.ready.wait(timeout):
            self.stop.set()
            raise AssertionError(f"the listener did not subscribe within {timeout} s (error: {self.error!r})")
        return self

    def finish(self, timeout: float = 10.0) -> ListenerStats:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the listener did not stop within {timeout} s of stop.set()"
        if self.error is not None:
            raise self.error
        assert self.stats is not None
        return self.stats


@pytest.fixture
def start_listener(stomp_broker, listener_log):
    """Start a listener on the test's broker namespace: ``start_listener(journal, **overrides)``."""
    started: list[ListenerThread] = []
    logger, _ = listener_log

    def start(journal, *, port: int | None = None, wait_ready: bool = True, **kwargs) -> ListenerThread:
        kwargs.setdefault("subscription_name", stomp_broker.subscription)
        kwargs.setdefault("topic_prefix", stomp_broker.topic_prefix)
        kwargs.setdefault("backoff", (0.05, 0.5))
        kwargs.setdefault("log", logger)
        lt = ListenerThread(stomp_broker.host, port or stomp_broker.port, journal, **kwargs)
        started.append(lt)
        return lt.start(wait_ready=wait_ready)

    try:
        yield start
    finally:
        for lt in started:
            lt.stop.set()
        for lt in started:
            lt.thread.join(10)
