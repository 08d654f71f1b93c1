"""The broker's own bound on a message (issue 50, point 5), as the compose broker is configured: a RabbitMQ node
of this test's own started with docker/rabbitmq/40-limits.conf (the machine's broker is shared, and its
configuration not the tests' to change) refuses a STOMP SEND past ``max_message_size`` at the sender, so the
listener never receives it, and takes the next message.

docker/rabbitmq/41-stomp-frames.conf (``stomp.max_frame_size``) is not loaded here: RabbitMQ 3.10 and 3.11 have
no such setting and refuse to start with it (the compose suite, on RabbitMQ 3.13, covers it)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import stomp

from em_platform.settings import BROKER_MAX_MESSAGE_BYTES
from em_platform.tem.journal import Journal
from em_platform.tem.stomp_connection import StompEvents, close_connection, open_stomp
from tests.support.polling import wait_until
from tests.support.ports import free_port

from .conftest import ListenerThread

ROOT = Path(__file__).resolve().parents[2]
LIMITS = ROOT / "docker" / "rabbitmq" / "40-limits.conf"


def _rabbitmq_server() -> str | None:
    """The server script that runs a node as the calling user (Debian's /usr/sbin wrapper would switch to the
    ``rabbitmq`` user, who cannot write this test's folders)."""
    for candidate in (os.environ.get("EM_TEST_RABBITMQ_SERVER"), "/usr/lib/rabbitmq/bin/rabbitmq-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("rabbitmq-server")


@dataclass
class Node:
    port: int
    log: Path

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


@pytest.fixture
def limited_broker(tmp_path) -> Iterator[Node]:
    server = _rabbitmq_server()
    if server is None:
        pytest.skip(
            "RabbitMQ is not installed here (rabbitmq-server); the broker's message bound is not tested"
        )
    conf = tmp_path / "conf.d"
    conf.mkdir()
    port = free_port()
    (conf / "10-listeners.conf").write_text(
        f"listeners.tcp = none\nstomp.listeners.tcp.1 = 127.0.0.1:{port}\n"
    )
    shutil.copy(LIMITS, conf / LIMITS.name)
    (tmp_path / "home").mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path / "home"),  # the node's own Erlang cookie
        "RABBITMQ_CONF_ENV_FILE": os.devnull,  # not the machine broker's node name
        "RABBITMQ_CONFIG_FILE": str(tmp_path / "none"),  # not the machine broker's rabbitmq.conf
        "RABBITMQ_CONFIG_FILES": str(conf),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(ROOT / "docker" / "rabbitmq" / "enabled_plugins"),
        "RABBITMQ_NODENAME": f"em-test-{uuid.uuid4().hex[:8]}@localhost",
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_MNESIA_BASE": str(tmp_path / "mnesia"),
        "RABBITMQ_LOG_BASE": str(tmp_path / "log"),
        "RABBITMQ_LOGS": "-",
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    node = Node(port, tmp_path / "rabbitmq.log")
    with open(node.log, "wb") as out:
        proc = subprocess.Popen(
            [server], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"RabbitMQ with {LIMITS.name} did not start:\n{node.tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    try:
        wait_until(listening, timeout=120, what=f"RabbitMQ with {LIMITS.name} on port {port}")
        yield node
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the node's own session: its script and its Erlang VM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_the_broker_refuses_a_message_past_its_bound_at_the_sender(limited_broker, tmp_path):
    assert f"max_message_size = {BROKER_MAX_MESSAGE_BYTES}" in LIMITS.read_text()  # one bound, two places
    prefix = f"/topic/t{uuid.uuid4().hex[:8]}."
    journal = Journal(f"sqlite:///{tmp_path / 'j.sqlite'}")
    listener = ListenerThread(
        "127.0.0.1", limited_broker.port, journal, subscription_name="em_limits", topic_prefix=prefix,
        backoff=(0.05, 0.5), username="guest", password="guest",
    ).start(timeout=30)  # fmt: skip
    try:
        scope_events = StompEvents()
        scope = open_stomp("127.0.0.1", limited_broker.port, scope_events, username="guest", password="guest")
        try:
            scope.send(f"{prefix}tile.raw", body="x" * (BROKER_MAX_MESSAGE_BYTES + 1))
            assert scope_events.wait_closed(60), "the broker did not close the sender of an oversized message"
        finally:
            close_connection(scope, scope_events)
        assert f"message size {BROKER_MAX_MESSAGE_BYTES + 1} is larger than configured max size" in str(
            scope_events.error
        )

        good = stomp.Connection12([("127.0.0.1", limited_broker.port)], vhost="/")
        good.connect("guest", "guest", wait=True)
        tile = (
            '{"tile_id": "t-1", "montage_id": "m-1", "row": 0, "column": 0, "overlap": 0, '
            '"stage_position": [0, 0], "path": "/storage/raw/m-1/t-1.tiff"}'
        )
        good.send(f"{prefix}tile.raw", body=tile)
        wait_until(lambda: journal.tiles("m-1"), timeout=20, what="the message after the refused one")
        good.disconnect()
    finally:
        stats = listener.finish()
        journal.dispose()
    assert (stats.received, stats.journaled, stats.rejected) == (1, 1, 0)  # it never reached the listener
