"""db-init's patience with PostgreSQL (em_platform.deploy.db_roles.patiently): a server that is not reachable
yet (a name the container network has not published, a port not yet open), or that goes away between two of
the provisioning's connections, is retried until the whole provisioning completes; an answer that will not
change (no such database) fails at once; patience spent, the last error is raised."""

from __future__ import annotations

import socket
import threading
import uuid

import pytest
import sqlalchemy as sa

from em_platform.deploy.db_roles import SERVICE_ROLES, Databases, patiently, provision
from em_platform.deploy.processes import free_port
from tests.conftest import PG_HOST, PG_PORT, PG_USER
from tests.deploy.test_db_roles import drop_provisioned


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

    def __init__(self, port: int, connections: int | None = None):
        self.port, self.listener, self.connections = port, None, connections

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
            if self.connections is not None:
                self.connections -= 1
                if self.connections == 0:  # the server goes out of reach; connections made go on
                    self.close()
                    return

    def close(self) -> None:
        if self.listener:
            self.listener.close()
            self.listener = None


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


def _connect(url: str):
    def connect() -> None:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 1})
        try:
            engine.connect().close()
        finally:
            engine.dispose()

    return connect


def test_a_server_that_comes_up_later_is_waited_for(server):
    port = free_port()
    forwarder = Forwarder(port)
    retries: list[str] = []

    def on_retry(reason: str) -> None:
        retries.append(reason)
        if len(retries) == 2:  # refused twice, then the server is there
            forwarder.open()

    try:
        patiently(_connect(f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{port}/postgres"), 30, 0.05, on_retry)
    finally:
        forwarder.close()
    assert len(retries) == 2 and all("refused" in r for r in retries), retries


def test_a_name_not_resolved_is_retried_then_named(server):
    retries: list[str] = []
    with pytest.raises(sa.exc.OperationalError, match="could not translate host name"):
        patiently(
            _connect(f"postgresql+psycopg2://{PG_USER}@em-postgresql.invalid:5432/postgres"),
            0.3,
            0.05,
            retries.append,
        )
    assert retries and all("could not translate host name" in r for r in retries)


def test_an_answer_that_will_not_change_fails_at_once(server):
    retries: list[str] = []
    missing = server.rsplit("/", 1)[0] + "/em_no_such_database"
    with pytest.raises(sa.exc.OperationalError, match="em_no_such_database"):
        patiently(_connect(missing), 60, 0.05, retries.append)
    assert retries == []


def test_a_reachable_server_returns_at_once(server):
    retries: list[str] = []
    patiently(_connect(server), 60, 0.05, retries.append)
    assert retries == []


def test_a_server_lost_between_the_provisionings_connections_is_waited_for_and_provisioning_completes(server):
    """The CI failure behind this: db-init's first connection succeeded, a later one could not resolve the name."""
    port = free_port()
    forwarder = Forwarder(port, connections=1)  # the first connection goes through, the next is refused
    forwarder.open()
    prefix = f"emw{uuid.uuid4().hex[:6]}"
    dbs = Databases(f"{prefix}_dagster", f"{prefix}_catalog", prefix)
    retries: list[str] = []

    def on_retry(reason: str) -> None:
        retries.append(reason)
        forwarder.open()  # back, for good

    admin = f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{port}/postgres"
    passwords = {role: f"pw-{uuid.uuid4().hex[:8]}" for role in ("dagster", *SERVICE_ROLES)}
    try:
        patiently(lambda: provision(admin, dbs, passwords), 30, 0.05, on_retry)
        assert len(retries) == 1 and "refused" in retries[0], retries
        catalog = sa.create_engine(f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbs.catalog}")
        try:
            assert "storage_audits" in sa.inspect(catalog).get_table_names()
        finally:
            catalog.dispose()
    finally:
        forwarder.close()
        drop_provisioned(server, dbs)
