"""One PostgreSQL role per service, each with only the tables and rights it uses; none a superuser.

A superuser can run programs on the database host (``COPY … TO PROGRAM``), read its files, and write any
row of any database: handing its password to every service made each of them the whole deployment. Here
the superuser (``POSTGRES_USER``) is used once, by ``db-init`` (``python -m em_platform.deploy.db_roles``)
or the process topology's runner, to make

- ``<prefix>_dagster``: owns Dagster's database (the webserver, daemon, code server and runs: Dagster's
  storage has no finer rights); it cannot connect to the catalog;
- ``<prefix>_catalog``: owns the catalog's database and its tables; it cannot log in (only ``db-init`` acts
  as it, to create and upgrade the tables);
- one login role per service that uses the catalog, with the rights of :data:`CATALOG_RIGHTS` and nothing
  else: no CREATE, no other database, no ``pg_execute_server_program`` / ``pg_read_server_files``.

It is idempotent: every start makes what is missing, takes rights that are no longer listed, sets each
password again and gives tables an earlier deployment's superuser created to their owner role.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy as sa

from em_platform.deploy.services import DB_LOGIN_ROLES

T = TypeVar("T")

OWNER_ROLES = ("dagster", "catalog")
SERVICE_ROLES = tuple(r for r in DB_LOGIN_ROLES if r != "dagster")
_ALL = "SELECT, INSERT, UPDATE, DELETE"


def catalog_tables() -> dict[str, sa.Table]:
    """Every table of the catalog's database, by name (the catalog, the journal, tile records, cryo results,
    dead letters), from the modules that define them."""
    from em_platform.catalog import db, dead_letters
    from em_platform.catalog import storage_audits as audits
    from em_platform.cryo import exposures_db, results_db  # noqa: F401 - its tables are results_db's
    from em_platform.tem import journal, tile_records

    metadatas = (
        db.metadata_obj,
        dead_letters.metadata_obj,
        journal.metadata_obj,
        tile_records.metadata_obj,
        audits.metadata_obj,
    )
    return {t.name: t for m in (*metadatas, results_db.metadata_obj) for t in m.sorted_tables}


def catalog_rights() -> dict[str, dict[str, str]]:
    """Per service role: table name -> the privileges it is granted (every other table: none)."""
    from em_platform.catalog import db, dead_letters
    from em_platform.cryo import exposures_db, results_db
    from em_platform.tem import journal, tile_records

    journal_tables = [journal.messages, journal.montages, journal.tiles, journal.qc_status, journal.judges]
    cryo = [t for t in results_db.metadata_obj.sorted_tables]
    letters = dead_letters.dead_letters.name
    everything = {name: _ALL for name in catalog_tables()}
    return {
        # the microscope's messages into the journal; what it refuses into the dead letters
        "listener": {
            **{t.name: "SELECT, INSERT, UPDATE" for t in journal_tables if t is not journal.judges},
            letters: "SELECT, INSERT",
        },
        # live montages' tiles judged: the journal (its judging claims taken and given back)
        "live_qc": {**{t.name: _ALL for t in journal_tables}, letters: "SELECT, INSERT"},
        # live cryo sessions: their exposures (claimed, processed, judged again), what it refuses
        "cryo_live": {
            exposures_db.exposures.name: _ALL,
            exposures_db.live_sessions.name: _ALL,
            letters: "SELECT, INSERT",
        },
        # the sensors: they read the journal and the records, dead-letter what they refuse and mark the records
        # of a failed run failed
        "code": {
            **{t.name: "SELECT" for t in journal_tables},
            db.datasets.name: "SELECT, INSERT, UPDATE",
            db.status_history.name: "SELECT, INSERT",
            tile_records.tem_tiles.name: "SELECT",
            **{t.name: "SELECT, UPDATE" for t in cryo},
            letters: "SELECT, INSERT, UPDATE, DELETE",
        },
        # every asset's run: all of the catalog's rows, none of its schema
        "runs": everything,
    }


@dataclass(frozen=True)
class Databases:
    """The two databases and the prefix of the roles (``em`` in compose; the topology's name as processes)."""

    dagster: str
    catalog: str
    prefix: str = "em"

    def role(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def roles(self) -> list[str]:
        return [self.role(name) for name in (*OWNER_ROLES, *SERVICE_ROLES)]


def provision(admin_url: str, dbs: Databases, passwords: Mapping[str, str]) -> None:
    """Make or mend the roles, databases, tables and grants, as the superuser of ``admin_url`` (a URL to its
    ``postgres`` database). ``passwords``: the login roles' (``dagster`` and the service roles)."""
    missing = [r for r in ("dagster", *SERVICE_ROLES) if not passwords.get(r)]
    if missing:
        raise ValueError(f"no password for database role(s) {', '.join(missing)}")
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for name in (*OWNER_ROLES, *SERVICE_ROLES):
                _role(conn, dbs.role(name), login=name != "catalog", password=passwords.get(name))
            for db, owner in ((dbs.dagster, "dagster"), (dbs.catalog, "catalog")):
                _database(conn, db, dbs.role(owner))
    finally:
        admin.dispose()
    _dagster_database(sa.engine.make_url(admin_url).set(database=dbs.dagster), dbs)
    _catalog_database(sa.engine.make_url(admin_url).set(database=dbs.catalog), dbs)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _role(conn, role: str, *, login: bool, password: str | None) -> None:
    exists = conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
    attributes = (
        f"{'LOGIN' if login else 'NOLOGIN'} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
    )
    conn.execute(sa.text(f"{'ALTER' if exists else 'CREATE'} ROLE {_q(role)} WITH {attributes}"))
    if login and password:  # psycopg2 quotes the value into the statement (a utility statement takes no bind)
        conn.exec_driver_sql(f"ALTER ROLE {_q(role)} WITH PASSWORD %s", (password,))
    for power in ("pg_execute_server_program", "pg_read_server_files", "pg_write_server_files"):
        conn.execute(sa.text(f"REVOKE {power} FROM {_q(role)}"))


def _database(conn, db: str, owner: str) -> None:
    exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": db}).first()
    if not exists:
        conn.execute(sa.text(f"CREATE DATABASE {_q(db)} OWNER {_q(owner)}"))
    else:
        conn.execute(sa.text(f"ALTER DATABASE {_q(db)} OWNER TO {_q(owner)}"))
    conn.execute(sa.text(f"REVOKE ALL ON DATABASE {_q(db)} FROM PUBLIC"))


def _give_tables_to(conn, owner: str) -> None:
    """Tables, sequences and views of ``public`` that another role (an earlier superuser) created, to ``owner``."""
    rows = conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'S', 'v', 'm') "
            "AND pg_get_userbyid(c.relowner) <> :owner "
            # a serial column's sequence goes with its table
            "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i'))"
        ),
        {"owner": owner},
    ).all()
    for (name,) in rows:
        conn.execute(sa.text(f"ALTER TABLE public.{_q(name)} OWNER TO {_q(owner)}"))


def _dagster_database(url: sa.URL, dbs: Databases) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    owner = dbs.role("dagster")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f"ALTER SCHEMA public OWNER TO {_q(owner)}"))
            conn.execute(sa.text("REVOKE ALL ON SCHEMA public FROM PUBLIC"))
            _give_tables_to(conn, owner)
            conn.execute(sa.text(f"GRANT CONNECT ON DATABASE {_q(dbs.dagster)} TO {_q(owner)}"))
    finally:
        engine.dispose()


def _catalog_database(url: sa.URL, dbs: Databases) -> None:
    from em_platform.catalog import dead_letters
    from em_platform.sql import add_indexes

    owner = dbs.role("catalog")
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    tables = catalog_tables()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f"ALTER SCHEMA public OWNER TO {_q(owner)}"))
            conn.execute(sa.text("REVOKE ALL ON SCHEMA public FROM PUBLIC"))
            _give_tables_to(conn, owner)
            conn.execute(sa.text(f"SET ROLE {_q(owner)}"))  # the tables it creates are the owner's
            metadata = sa.MetaData()
            for model in tables.values():
                model.to_metadata(metadata)
            metadata.create_all(conn)
            add_indexes(conn, metadata)  # an index added since a table was made
            for service, rights in catalog_rights().items():
                role = _q(dbs.role(service))
                conn.execute(sa.text(f"GRANT CONNECT ON DATABASE {_q(dbs.catalog)} TO {role}"))
                conn.execute(sa.text(f"GRANT USAGE ON SCHEMA public TO {role}"))
                conn.execute(sa.text(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}"))
                conn.execute(sa.text(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}"))
                for table, privileges in rights.items():
                    conn.execute(sa.text(f"GRANT {privileges} ON public.{_q(table)} TO {role}"))
                    if "INSERT" in privileges:
                        for seq in _sequences_of(conn, table):
                            conn.execute(
                                sa.text(f"GRANT USAGE, SELECT ON SEQUENCE public.{_q(seq)} TO {role}")
                            )
            conn.execute(sa.text("RESET ROLE"))
        # columns added since a table was made (create_all adds none): as the superuser, whom the tables' owner
        # is not, so that no service role needs to alter a table
        dead_letters.create_tables(engine)
    finally:
        engine.dispose()


def _sequences_of(conn, table: str) -> list[str]:
    """The sequences behind ``table``'s serial or identity columns."""
    rows = conn.execute(
        sa.text(
            "SELECT s.relname FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
            "JOIN pg_class t ON t.oid = d.refobjid WHERE t.relname = :t AND d.deptype IN ('a', 'i')"
        ),
        {"t": table},
    ).all()
    return [r[0] for r in rows]


# what a server that is still coming up, or a name the container network has not published yet, answers; a
# refused password or a missing database is not among them and fails at once
TRANSIENT = (
    "could not translate host name",
    "Connection refused",
    "the database system is starting up",
    "the database system is not yet accepting connections",
    "timeout expired",
    "server closed the connection unexpectedly",
)


def patiently(
    action: Callable[[], T],
    patience_s: float,
    poll_s: float = 1.0,
    on_retry: Callable[[str], None] | None = None,
) -> T:
    """Run ``action`` (which connects to PostgreSQL), again while the server is out of reach, for ``patience_s``.
    A healthy PostgreSQL can still be out of reach for a moment: podman's DNS (aardvark-dns) publishes a
    container's name as each container joins the network, and CI runs saw ``db-init`` fail to resolve
    ``postgresql`` seconds after its healthcheck passed, once even after a first connection had succeeded. So
    the whole action is retried, not a first connection. Other failures (a refused password) raise at once."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return action()
        except sa.exc.OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            if not any(t in str(exc) for t in TRANSIENT) or time.monotonic() > deadline:
                raise
            if on_retry:
                on_retry(reason)
            time.sleep(poll_s)


PASSWORD_SETTINGS = {name: f"EM_DB_{name.upper()}_PASSWORD" for name in ("dagster", *SERVICE_ROLES)}


def main(env: Mapping[str, str] = os.environ) -> int:
    """``db-init``: provision from the compose settings (POSTGRES_USER/PASSWORD, PGHOST, the databases, the
    roles' passwords)."""
    from urllib.parse import quote

    try:
        user, password = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]
        host, port = env.get("PGHOST", "postgresql"), env.get("PGPORT", "5432")
        dbs = Databases(env["DAGSTER_DB"], env["EM_CATALOG_DB"], env.get("EM_DB_ROLE_PREFIX") or "em")
        passwords = {name: env[setting] for name, setting in PASSWORD_SETTINGS.items()}
    except KeyError as exc:
        print(f"db-init: {exc.args[0]} is not set (docker/.env)", file=sys.stderr)
        return 2
    if user in dbs.roles():
        print(
            f"db-init: POSTGRES_USER={user} is a service role's name; give the superuser another",
            file=sys.stderr,
        )
        return 2
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
    url = f"postgresql+psycopg2://{credentials}@{host}:{port}/postgres?connect_timeout=10"
    patience = float(env.get("EM_DB_INIT_PATIENCE_S") or 60)
    said: set[str] = set()

    def retrying(reason: str) -> None:
        if reason not in said:
            said.add(reason)
            print(
                f"db-init: {host}:{port} not reachable yet ({reason}); retrying for {patience:.0f} s",
                flush=True,
            )

    try:  # provision is idempotent: a connection lost halfway is retried from the start
        patiently(lambda: provision(url, dbs, passwords), patience, on_retry=retrying)
    except sa.exc.OperationalError as exc:
        print(f"db-init: cannot connect to PostgreSQL at {host}:{port}: {exc.orig or exc}", file=sys.stderr)
        return 1
    print(
        f"db-init: roles {', '.join(dbs.role(r) for r in (*OWNER_ROLES, *SERVICE_ROLES))}; databases {dbs.dagster}, {dbs.catalog}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
