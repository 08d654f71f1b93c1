"""One way to open the platform's SQL database (SQLite file or PostgreSQL), shared by catalog and journal."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or opened; the message names it and what to do."""


# What PostgreSQL and libpq say while a server restarts, fails over or is briefly unreachable: worth waiting
# for. A wrong password, database or role is not, and fails at once.
_PASSING = (
    "server closed the connection unexpectedly",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "terminating connection due to administrator command",
    "connection refused",
    "could not connect to server",
    "could not translate host name",  # a restarting container's name is gone from the network's DNS
    "ssl connection has been closed unexpectedly",
    "timeout expired",
    "no connection to the server",
)


@overload
def aware(ts: datetime) -> datetime: ...
@overload
def aware(ts: None) -> None: ...
@overload
def aware(ts: datetime | None) -> datetime | None: ...
def aware(ts: datetime | None) -> datetime | None:
    """A timestamp read from the database as UTC-aware: SQLite hands ``DateTime(timezone=True)`` back naive."""
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


def database_outage(exc: BaseException) -> str | None:
    """Why ``exc`` is a passing database outage (a restart, an unreachable server), or None when it is not."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = " ".join(str(e).split())
        invalidated = isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated
        if invalidated or any(p in text.lower() for p in _PASSING):
            first = text.split(" [SQL:", 1)[0]
            return f"the database does not answer ({first[:200]})"
        e = e.__cause__ or e.__context__
    return None


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the run that is writing
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def open_database(url: str, metadata: sa.MetaData, *, create: bool = True) -> Engine:
    """An engine for ``url`` with ``metadata``'s tables created; errors say to check EM_CATALOG_URL."""
    # A server's connection can go stale: test it before use. A file's cannot, and for SQLite the test was
    # about a sixth of the CPU of a live montage run's poll of the journal (0.2 of 1.27 ms).
    kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    )
    try:
        engine = sa.create_engine(url, **kwargs)
    except Exception as exc:
        raise DatabaseUnavailable(
            f"database URL {url!r} is not a valid SQLAlchemy URL ({exc}); set EM_CATALOG_URL"
        ) from exc
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        if engine.url.database and engine.url.database != ":memory:":
            Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    if create:
        try:
            metadata.create_all(engine)
            add_indexes(engine, metadata)
        except sa.exc.OperationalError as exc:
            shown = engine.url.render_as_string(hide_password=True)
            raise DatabaseUnavailable(
                f"cannot open the database at {shown}: {exc.orig}; check that it is running "
                "and reachable, or point EM_CATALOG_URL at another one"
            ) from exc
    return engine


def add_indexes(bind: Engine | sa.Connection, metadata: sa.MetaData) -> None:
    """Create the indexes ``metadata`` declares that an existing table lacks: ``create_all`` creates a missing
    table with its indexes, never an index added to a table an earlier release made. Two processes starting
    at once may both try: the one that loses finds the index there."""

    def present(table: sa.Table) -> set[str | None]:
        return {i["name"] for i in sa.inspect(bind).get_indexes(table.name)}

    for table in metadata.sorted_tables:
        if not table.indexes:
            continue
        have = present(table)
        for index in table.indexes:
            if index.name in have:
                continue
            try:
                index.create(bind)
            except sa.exc.DBAPIError:
                if index.name not in present(table):
                    raise
