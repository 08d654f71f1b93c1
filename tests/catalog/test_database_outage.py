"""A database that is restarting or unreachable is an outage to wait out; a wrong database name is not.
Real errors from the machine's PostgreSQL and a closed port, not made-up messages."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from em_platform.catalog.db import CatalogDB
from em_platform.sql import DatabaseUnavailable, database_outage
from tests.conftest import PG_HOST, PG_PORT, PG_USER
from tests.support.ports import free_port


def _error(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("no error")


def test_a_server_that_does_not_answer_is_an_outage():
    port = free_port()  # nothing listens here
    exc = _error(lambda: CatalogDB(f"postgresql+psycopg2://u@127.0.0.1:{port}/db"))
    assert isinstance(exc, DatabaseUnavailable)
    assert "does not answer" in database_outage(exc) and "refused" in database_outage(exc)


def test_a_connection_the_server_terminated_is_an_outage_and_a_missing_database_is_not(pg_url):
    engine = sa.create_engine(pg_url)
    admin = sa.create_engine(f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres")
    try:
        with engine.connect() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            with admin.connect() as a:  # what a restart does to every open connection
                a.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            exc = _error(lambda: conn.execute(sa.text("SELECT 1")))
        assert database_outage(exc), exc
    finally:
        engine.dispose()
        admin.dispose()
    missing = pg_url.rsplit("/", 1)[0] + f"/em_missing_{uuid.uuid4().hex[:6]}"
    exc = _error(lambda: CatalogDB(missing))
    assert isinstance(exc, DatabaseUnavailable) and database_outage(exc) is None, exc


@pytest.mark.parametrize("error", [ValueError("bad voxel size"), KeyError("volume")])
def test_other_failures_are_not_outages(error):
    assert database_outage(error) is None
