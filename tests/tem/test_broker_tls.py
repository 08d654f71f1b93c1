"""STOMP over TLS (issue 36: the broker's published port asks for TLS): the platform's clients verify the
broker's certificate and its name against the CA ``EM_BROKER_TLS`` names, and say which when they cannot.

The broker is the machine's real RabbitMQ; TLS is terminated in front of it by a small forwarder holding a
certificate from :func:`em_platform.deploy.certificates.make_certificates` (what the compose broker holds),
so the client side is the real stomp.py + ssl path without RabbitMQ's own TLS listener configured here.
"""

from __future__ import annotations

import asyncio
import queue
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from em_platform.deploy.certificates import CA, CERT, KEY, make_certificates
from em_platform.settings import ConfigError, broker_tls, load_settings
from em_platform.tem import stomp_connection
from em_platform.tem.broker import BrokerPublisher, BrokerSettings, BrokerUnavailable
from em_platform.tem.journal import Journal
from em_platform.tem.stomp_connection import StompEvents, close_connection, open_stomp
from tests.support.polling import wait_until


class TlsTerminator:
    """TLS on 127.0.0.1:<port> in front of the plain broker; counts the handshakes that succeeded.

    asyncio, not a thread per direction: an OpenSSL connection read in one thread and written in another
    breaks (``UNEXPECTED_EOF_WHILE_READING``)."""

    def __init__(self, upstream: tuple[str, int], folder: Path):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(folder / CERT, folder / KEY)
        self.upstream = upstream
        self.handshakes = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tls-terminator")
        self._thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context, ssl_handshake_timeout=5)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1  # asyncio calls this only once the TLS handshake succeeded
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def drop_connections(self) -> None:
        """End every connection it carries at once, as a broker that goes away does (TCP closed, no TLS
        ``close_notify``); new ones are still taken. Not asyncio's graceful close: under load it now and
        then sent nothing at all (seen 1 run in ~20 with both cores busy: the connection stayed open, no
        byte sent after the drop, so no client could notice)."""

        async def drop() -> None:
            for writer in self._writers:
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(drop(), self._loop).result(10)

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def journal(tmp_path) -> Iterator[Journal]:
    j = Journal(f"sqlite:///{tmp_path}/j.sqlite")
    yield j
    j.dispose()


def _certificates(folder: Path, *names: str) -> Path:
    assert make_certificates(folder, names, common_name="test broker")
    return folder


@pytest.fixture
def tls_broker(stomp_broker, tmp_path) -> Iterator[tuple[TlsTerminator, Path]]:
    """The broker behind TLS with a certificate for 127.0.0.1 and localhost; yields it and its CA file."""
    folder = _certificates(tmp_path / "broker-tls", "localhost", "127.0.0.1")
    terminator = TlsTerminator((stomp_broker.host, stomp_broker.port), folder)
    try:
        yield terminator, folder / CA
    finally:
        terminator.close()


def _publisher(stomp_broker, port: int, tls: str | None) -> BrokerPublisher:
    return BrokerPublisher(
        "127.0.0.1",
        port,
        topic_prefix=stomp_broker.topic_prefix,
        tls=tls,
        connect_attempts=1,
        connect_timeout=5,
    )


def test_a_scope_publishes_and_hears_over_tls_checked_against_the_brokers_ca(stomp_broker, tls_broker):
    terminator, ca = tls_broker
    heard: queue.Queue = queue.Queue()
    with _publisher(stomp_broker, terminator.port, str(ca)) as scope:
        scope.subscribe("qc.status", heard.put)
        scope.publish("qc.status", {"status": "STOP_AT_END", "reason": "over TLS"})
        message = heard.get(timeout=10)
    assert (message.status, message.reason) == ("STOP_AT_END", "over TLS")
    assert terminator.handshakes == 1  # the one connection was TLS end to end, not a plain fallback


def test_a_listener_over_tls_journals_what_a_plain_scope_sends(
    stomp_broker, tls_broker, start_listener, journal
):
    """The listener (the compose network's platform side) over TLS; the message comes in over plain STOMP."""
    terminator, ca = tls_broker
    listener = start_listener(journal, port=terminator.port, tls=str(ca))
    scope = stomp_broker.pigeon("pytem")
    scope.send("montage.status", montage_id="m-tls", state="started", total_tiles=4)
    wait_until(
        lambda: journal.messages("montage.status", "m-tls"),
        timeout=10,
        what="the montage.status in the journal",
    )
    stats = listener.finish()
    assert stats.received == 1 and terminator.handshakes >= 1


def test_a_tls_connection_the_broker_drops_is_seen_closed_even_with_heartbeats_off(
    stomp_broker, tls_broker, monkeypatch
):
    """stomp.py 9.0 reads a TLS socket non-blocking and took the broker's close for "no data yet": its reader
    thread spun on a socket that is always readable (a whole core) and never said ``disconnected``; only a
    missed heartbeat ended it. With heartbeats off that was forever: here the close is seen and the reader ends."""
    monkeypatch.setattr(stomp_connection, "HEARTBEATS", (0, 0))
    terminator, ca = tls_broker
    events = StompEvents()
    conn = open_stomp("127.0.0.1", terminator.port, events, tls=str(ca), username="guest", password="guest")
    try:
        assert conn.heartbeats == (0, 0) and events.connected
        reader = conn.transport.io_thread
        assert reader.is_alive()
        terminator.drop_connections()
        assert events.wait_closed(30), "the broker closed the TLS connection; the client never noticed"
        reader.join(10)
        assert not reader.is_alive(), "stomp.py's reader still runs on the closed socket"
    finally:
        close_connection(conn, events)


def test_a_certificate_from_another_ca_is_refused_naming_em_broker_tls(stomp_broker, tls_broker, tmp_path):
    terminator, _ = tls_broker
    other = _certificates(tmp_path / "other", "127.0.0.1") / CA
    with pytest.raises(BrokerUnavailable) as err:
        _publisher(stomp_broker, terminator.port, str(other))
    text = str(err.value)
    assert "certificate verify failed" in text and "EM_BROKER_TLS" in text and str(other) in text, text
    assert terminator.handshakes == 0


def test_a_certificate_for_another_name_is_refused(stomp_broker, tmp_path):
    """A certificate the CA signed for ``rabbitmq`` only: a client reaching 127.0.0.1 checks the name too."""
    folder = _certificates(tmp_path / "named", "rabbitmq")
    terminator = TlsTerminator((stomp_broker.host, stomp_broker.port), folder)
    try:
        with pytest.raises(BrokerUnavailable, match="IP address mismatch|doesn't match|hostname"):
            _publisher(stomp_broker, terminator.port, str(folder / CA))
        assert terminator.handshakes == 0
    finally:
        terminator.close()


def test_plain_stomp_to_a_tls_port_says_to_set_em_broker_tls(stomp_broker, tls_broker):
    terminator, _ = tls_broker
    with pytest.raises(BrokerUnavailable, match="EM_BROKER_TLS"):
        _publisher(stomp_broker, terminator.port, None)


def test_em_broker_tls_is_plain_system_or_an_existing_ca_file(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert broker_tls("") is None and broker_tls(None) is None
    assert broker_tls(" system ") == "system"
    assert broker_tls(str(ca)) == str(ca)
    with pytest.raises(
        ConfigError, match=r"EM_BROKER_TLS='/nowhere/ca.pem' names no file.*compose-ca --broker"
    ):
        broker_tls("/nowhere/ca.pem")
    with pytest.raises(ConfigError, match="EM_BROKER_TLS"):
        load_settings({"EM_BROKER_TLS": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="EM_BROKER_TLS"):
        BrokerSettings.from_env({"EM_BROKER": "127.0.0.1:61614", "EM_BROKER_TLS": "sytem"})
    settings = BrokerSettings.from_env({"EM_BROKER": "127.0.0.1:61614", "EM_BROKER_TLS": str(ca)})
    assert settings is not None and settings.tls == str(ca) and settings.connection()["tls"] == str(ca)
