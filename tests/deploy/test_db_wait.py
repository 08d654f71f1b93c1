"""db-init's wait for PostgreSQL (em_platform.deploy.db_roles.wait_for_server): a server that is not reachable
yet (a name the container network has not published, a port not yet open) is retried until it answers; an
answer that will not change (no such database) fails at once; patience spent, the last error is raised."""

from __future__ import annotations

import socket
import threading

import pytest
import sqlalchemy as sa

from em_platform.deploy.db_roles import wait_for_server
from em_platform.deploy.processes import free_port
from tests.conftest import PG_HOST, PG_PORT, PG_USER


@pytest.fixture(scope="module")
def server():
    url = f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"
    try:
        sa.create_engine(url).connect().close()
    except sa.exc.OperationalError as exc:
        pytest.skip(
            f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} as {PG_USER} ({exc}); db-init's wait not tested"
        )
    return url


class Forwarder:
    """A TCP port that forwards to PostgreSQL once opened: the server 'coming up' after db-init started."""

    def __init__(self, port: int):
        self.port, self.listener, self.threads = port, None, []

    def open(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((PG_HOST, int(PG_PORT)))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        if self.listener:
            self.listener.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_a_server_that_comes_up_later_is_waited_for(server):
    port = free_port()
    forwarder = Forwarder(port)
    retries: list[str] = []

    def on_retry(reason: str) -> None:
        retries.append(reason)
        if len(retries) == 2:  # refused twice, then the server is there
            forwarder.open()

    try:
        wait_for_server(f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{port}/postgres", 30, 0.05, on_retry)
    finally:
        forwarder.close()
    assert len(retries) == 2 and all("refused" in r for r in retries), retries


def test_a_name_not_resolved_is_retried_then_named(server):
    retries: list[str] = []
    with pytest.raises(sa.exc.OperationalError, match="could not translate host name"):
        wait_for_server(
            f"postgresql+psycopg2://{PG_USER}@em-postgresql.invalid:5432/postgres", 0.3, 0.05, retries.append
        )
    assert retries and all("could not translate host name" in r for r in retries)


def test_an_answer_that_will_not_change_fails_at_once(server):
    retries: list[str] = []
    missing = server.rsplit("/", 1)[0] + "/em_no_such_database"
    with pytest.raises(sa.exc.OperationalError, match="em_no_such_database"):
        wait_for_server(missing, 60, 0.05, retries.append)
    assert retries == []


def test_a_reachable_server_returns_at_once(server):
    retries: list[str] = []
    wait_for_server(server, 60, 0.05, retries.append)
    assert retries == []
