"""One way to open the platform's SQL database (SQLite file or PostgreSQL), shared by catalog and journal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or opened; the message names it and what to do."""


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the run that is writing
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def open_database(url: str, metadata: sa.MetaData, *, create: bool = True) -> Engine:
    """An engine for ``url`` with ``metadata``'s tables created; errors say to check EM_CATALOG_URL."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}
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
        except sa.exc.OperationalError as exc:
            shown = engine.url.render_as_string(hide_password=True)
            raise DatabaseUnavailable(
                f"cannot open the database at {shown}: {exc.orig}; check that it is running "
                "and reachable, or point EM_CATALOG_URL at another one"
            ) from exc
    return engine
