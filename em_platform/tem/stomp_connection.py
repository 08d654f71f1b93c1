"""One STOMP 1.2 connection to the broker that cannot hang, and its events as waitable state: what the
listener, the publisher's pigeon client (:mod:`em_platform.tem.pigeon_sender`) and the tests open and close.
No Dagster here."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Mapping

import stomp
import stomp.exception
import stomp.transport

HEARTBEATS = (10000, 10000)  # ms, as pigeon


class BrokerUnavailable(ConnectionError):
    """The STOMP broker cannot be reached (or stopped answering); the message names host:port."""


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


class _TlsTransport(stomp.transport.Transport):
    """stomp.py 9.0's transport with the end of a TLS stream seen. Over TLS stomp.py reads a non-blocking
    socket and takes an empty read (the broker closed it: a restart, an ERROR frame, a refused login) or a
    read error for "no data yet": its reader thread then spins on a socket that is always readable, a whole
    core, until a missed heartbeat stops it, or forever where the broker sends none, and no ``disconnected``
    ever comes (seen in the compose tests: three such threads took a core for the whole suite). Here either
    ends the reader, as the end of a plain socket does; stomp.py then reports ``disconnected``."""

    def receive(self):
        if self.blocking:  # plain TCP, and TLS until its handshake is done: stomp.py sees the end itself
            return super().receive()
        try:
            data = super().receive()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, stomp.exception.InterruptedException):
            raise  # no whole TLS record yet: the connection is open
        except Exception:
            self.running = False
            raise
        if data == b"":  # the end of the stream (None: nothing yet, before the CONNECTED frame)
            self.running = False
        return data


def use_tls(conn: stomp.Connection12, ca_certs: str | None, host_and_port: tuple[str, int]) -> None:
    """STOMP over TLS on ``conn`` (not yet connected), the broker's certificate checked against ``ca_certs``
    (None: the system's CAs), with a reader that sees the broker close the connection (:class:`_TlsTransport`)."""
    conn.transport.__class__ = _TlsTransport
    conn.set_ssl(for_hosts=[host_and_port], ca_certs=ca_certs)


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
    ``tls`` (:func:`em_platform.settings.broker_tls`): STOMP over TLS, the broker's certificate and name verified.
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
        use_tls(conn, None if tls == "system" else tls, (host, port))
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
