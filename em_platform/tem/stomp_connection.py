"""One STOMP 1.2 connection to the broker that cannot hang, and its events as waitable state: what the
listener, the publisher's pigeon client (:mod:`em_platform.tem.pigeon_sender`) and the tests open and close.
A consumer's connection can bound the messages it takes (:class:`FrameBound`). No Dagster here."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import stomp
import stomp.exception
import stomp.transport
import stomp.utils

HEARTBEATS = (10000, 10000)  # ms, as pigeon

_log = logging.getLogger(__name__)


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


# -- a bound on the frames a consumer takes ------------------------------------------------------------------

_HEAD_END = re.compile(rb"\r?\n\r?\n")  # where a frame's headers end (stomp.py's PREAMBLE_END_RE)
_EOLS = re.compile(rb"[\r\n]+")  # heart-beats, and the optional EOLs after a frame


class FrameTooLarge(ConnectionError):
    """A frame from the broker past the bound that cannot be read past (its headers run past it, or it is not a
    MESSAGE): the connection is closed."""


@dataclass(frozen=True)
class Oversized:
    """A MESSAGE body larger than the bound, as it streamed past: its first bytes, whole length and SHA-256."""

    head: bytes
    length: int
    sha256: str


@dataclass
class _Streaming:
    """The oversized body being read past: hashed and counted, only its first bytes kept."""

    head: bytes  # the frame's command and headers, as they came
    key: str
    length: int | None  # content-length; None: the body ends at the frame's NUL
    keep: int
    seen: int = 0
    kept: bytearray = field(default_factory=bytearray)
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)

    def take(self, chunk: bytes | bytearray) -> None:
        self.digest.update(chunk)
        self.seen += len(chunk)
        room = self.keep - len(self.kept)
        if room > 0:
            self.kept += chunk[:room]


def _ack_key(headers: Mapping[str, str]) -> str:
    """What the listener acknowledges a MESSAGE by (its ``ack`` header, else its ``message-id``)."""
    return headers.get("ack") or headers.get("message-id") or ""


class FrameBound:
    """The largest MESSAGE body a consumer takes (``max_body`` bytes), enforced before stomp.py holds it.

    stomp.py reads every frame whole into memory, and decodes its body to text, before it hands it on: a broker
    that lets a huge message through would have the listener hold it, more than once. The bytes from the socket
    pass through :meth:`feed` first; each frame is held here until it is complete, at most its headers and
    ``max_body`` bytes of body. A MESSAGE whose body is larger (by its ``content-length``, or by what came
    before its end without one) is read on and hashed as it streams, never held: stomp.py gets its headers with
    an empty body, and :attr:`oversized` records its first ``keep`` bytes, whole length and SHA-256 under its
    ack id (:func:`oversized_body`), so the listener can dead-letter it and acknowledge it. Every other frame,
    and the heart-beats between frames, pass unchanged. Any other frame past the bound, or headers that run past
    it, raise :class:`FrameTooLarge`: the connection closes (a message comes back to the next connection).
    """

    def __init__(self, max_body: int, keep: int):
        if max_body < 1 or keep < 0:
            raise ValueError(f"max_body must be ≥ 1 and keep ≥ 0 bytes, not {max_body} and {keep}")
        self.max_body, self.keep = int(max_body), int(keep)
        self.oversized: dict[str, Oversized] = {}
        self._buf = bytearray()  # the current frame, not yet passed on
        self._head = b""  # its command and headers, once complete
        self._headers: Mapping[str, str] = {}
        self._body_at: int | None = None  # where its body starts in the buffer, once its headers are complete
        self._length: int | None = None  # its content-length
        self._scanned = 0  # how much of its body was searched for the NUL (without a content-length)
        self._big: _Streaming | None = None

    def feed(self, data: bytes) -> bytes:
        """The bytes to hand to stomp.py after ``data`` came from the socket (often none yet)."""
        self._buf += data
        out = bytearray()
        while self._buf:
            if self._big is not None:
                if not self._read_past():
                    break
                out += self._stand_in()
                continue
            if self._body_at is None:
                eols = _EOLS.match(self._buf)
                if eols:  # between frames: straight on
                    out += self._buf[: eols.end()]
                    del self._buf[: eols.end()]
                    continue
                if not self._read_head():
                    break
                if self._big is not None:
                    continue
            end = self._frame_end()
            if end is None:
                if self._big is not None:
                    continue
                break
            out += self._buf[:end]
            del self._buf[:end]
            self._body_at, self._length, self._scanned = None, None, 0
        return bytes(out)

    def _too_large(self, what: str) -> FrameTooLarge:
        return FrameTooLarge(
            f"{what} from the broker is larger than {self.max_body} bytes; closing the connection"
        )

    def _read_head(self) -> bool:
        """Take the current frame's command and headers once they are complete; False while they are not."""
        end = _HEAD_END.search(self._buf)
        if end is None:
            if len(self._buf) > self.max_body:
                raise self._too_large("a frame's headers")
            return False
        self._head = bytes(self._buf[: end.start()])
        frame = stomp.utils.parse_frame(self._head)
        self._headers = frame.headers if frame is not None else {}
        length = self._headers.get("content-length", "").strip()
        self._length = int(length) if length.isdigit() else None
        self._body_at = end.end()
        if self._length is not None and self._length > self.max_body:
            self._past_the_bound()
        return True

    def _frame_end(self) -> int | None:
        """Where the current frame (its NUL included) ends in the buffer; None while it has not all arrived."""
        assert self._body_at is not None
        if self._length is not None:
            end = self._body_at + self._length + 1
            return end if len(self._buf) >= end else None
        nul = self._buf.find(b"\0", self._body_at + self._scanned)
        self._scanned = (nul if nul >= 0 else len(self._buf)) - self._body_at
        if self._scanned > self.max_body:
            self._past_the_bound()
            return None
        return nul + 1 if nul >= 0 else None

    def _past_the_bound(self) -> None:
        """The current frame's body is larger than the bound: a MESSAGE's is read past, any other frame's is
        refused."""
        command = self._head.splitlines()[0].decode("ascii", "replace") if self._head else ""
        if command != "MESSAGE":
            raise self._too_large(f"a {command!r} frame")
        assert self._body_at is not None
        self._big = _Streaming(self._head, _ack_key(self._headers), self._length, self.keep)
        del self._buf[: self._body_at]
        self._body_at, self._length, self._scanned = None, None, 0

    def _read_past(self) -> bool:
        """Hash and drop the oversized body as it comes (its NUL included); True once all of it has passed."""
        big = self._big
        assert big is not None
        if big.length is not None:
            if big.seen < big.length:
                chunk = self._buf[: big.length - big.seen]
                big.take(chunk)
                del self._buf[: len(chunk)]
            if big.seen < big.length or not self._buf:
                return False
            del self._buf[:1]  # the frame's NUL
            return True
        nul = self._buf.find(b"\0")
        upto = nul if nul >= 0 else len(self._buf)
        big.take(self._buf[:upto])
        del self._buf[: upto + (nul >= 0)]
        return nul >= 0

    def _stand_in(self) -> bytes:
        """The oversized MESSAGE as stomp.py gets it: its headers and an empty body; the rest recorded."""
        big = self._big
        assert big is not None
        self._big = None
        self.oversized[big.key] = Oversized(bytes(big.kept), big.seen, big.digest.hexdigest())
        lines = [line for line in big.head.splitlines() if not line.lower().startswith(b"content-length:")]
        return b"\n".join([*lines, b"content-length:0"]) + b"\n\n\0"


class _BoundedReceive:
    """A transport's ``receive`` through its :class:`FrameBound` (``frame_bound``)."""

    frame_bound: FrameBound

    def receive(self):
        while True:
            data = super().receive()  # type: ignore[misc]
            if not data:  # None (TLS: nothing yet) or b"" (the end of the stream): as they are
                return data
            try:
                passed = self.frame_bound.feed(data)
            except FrameTooLarge as exc:
                _log.error("%s", exc)
                raise
            if passed:  # never b"" for bytes held here: stomp.py would take it for the end of the stream
                return passed


def bound_messages(conn: stomp.Connection12, max_body: int, keep: int) -> None:
    """Bound the MESSAGE bodies ``conn`` (not yet connected) takes to ``max_body`` bytes (:class:`FrameBound`)."""
    transport = conn.transport
    base = type(transport)
    transport.__class__ = _BoundedTlsTransport if issubclass(base, _TlsTransport) else _BoundedTransport
    transport.frame_bound = FrameBound(max_body, keep)


def oversized_body(conn: stomp.Connection12, frame) -> Oversized | None:
    """What the bound read past of this MESSAGE (its body larger than the bound), or None."""
    bound = getattr(conn.transport, "frame_bound", None)
    return bound.oversized.pop(_ack_key(frame.headers), None) if bound is not None else None


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
    max_body: tuple[int, int] | None = None,
) -> stomp.Connection12:
    """One STOMP 1.2 connection attempt that cannot hang: connected, or BrokerUnavailable with the reason.

    ``vhost`` goes into the CONNECT ``host`` header: RabbitMQ reads that header as the virtual host, and
    stomp.py would otherwise send the broker's host name there (``Virtual host '127.0.0.1' access denied``).
    ``tls`` (:func:`em_platform.settings.broker_tls`): STOMP over TLS, the broker's certificate and name verified.
    ``max_body``: (bound, bytes kept) of the MESSAGE bodies this connection takes (:func:`bound_messages`).
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
    if max_body is not None:
        bound_messages(conn, *max_body)
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


class _BoundedTransport(_BoundedReceive, stomp.transport.Transport):
    pass


class _BoundedTlsTransport(_BoundedReceive, _TlsTransport):
    pass
