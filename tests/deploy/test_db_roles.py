"""Each service's own PostgreSQL role (em_platform/deploy/db_roles.py) on the machine's server: none a
superuser, none able to run programs or read the server's files, each with only the tables and rights its
service uses, the catalog and Dagster's storage in databases of their own. The service code itself (the
journal, the catalog, the dead letters) runs as each role."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from em_platform.deploy.db_roles import SERVICE_ROLES, Databases, catalog_rights, catalog_tables, provision
from tests.conftest import PG_HOST, PG_PORT, PG_USER

ADMIN = f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"
PASSWORDS = {role: f"pw-{role}-{uuid.uuid4().hex[:6]}" for role in ("dagster", *SERVICE_ROLES)}


@pytest.fixture(scope="module")
def dbs():
    try:
        sa.create_engine(ADMIN).connect().close()
    except sa.exc.OperationalError as exc:
        pytest.skip(
            f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} as {PG_USER} ({exc}); database roles not tested"
        )
    prefix = f"emt{uuid.uuid4().hex[:6]}"
    made = Databases(f"{prefix}_dagster", f"{prefix}_catalog", prefix)
    admin = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:  # an earlier deployment: the catalog's tables made by the superuser
            conn.execute(sa.text(f'CREATE DATABASE "{made.catalog}"'))
        old = sa.create_engine(_url(PG_USER, made.catalog))
        catalog_tables()["datasets"].to_metadata(sa.MetaData()).create(old)
        letters = catalog_tables()["dead_letters"]  # as the release before its body digest made it
        sa.Table(
            letters.name,
            sa.MetaData(),
            *(c.copy() for c in letters.columns if not c.name.startswith("body_")),
        ).create(old)
        old.dispose()
        provision(ADMIN, made, PASSWORDS)
        provision(ADMIN, made, PASSWORDS)  # every start: idempotent
        yield made
    finally:
        admin.dispose()
        drop_provisioned(ADMIN, made)


def drop_provisioned(admin_url: str, dbs: Databases) -> None:
    """What provision made: the databases (their sessions ended first) and the roles."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for db in (dbs.dagster, dbs.catalog):
                conn.execute(
                    sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                    {"d": db},
                )
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}"'))
            for role in dbs.roles():
                conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
    finally:
        admin.dispose()


def _url(user: str, db: str) -> str:
    return f"postgresql+psycopg2://{user}@{PG_HOST}:{PG_PORT}/{db}"


def _run(url: str, statement: str) -> str | None:
    """None when ``statement`` runs; otherwise PostgreSQL's reason."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement))
        return None
    except sa.exc.DBAPIError as exc:
        return str(exc.orig).splitlines()[0]
    finally:
        engine.dispose()


def test_no_role_is_a_superuser_or_may_run_programs_or_read_files(dbs):
    engine = sa.create_engine(ADMIN)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin, "
                "pg_has_role(rolname, 'pg_execute_server_program', 'USAGE') OR "
                "pg_has_role(rolname, 'pg_read_server_files', 'USAGE') OR "
                "pg_has_role(rolname, 'pg_write_server_files', 'USAGE') "
                "FROM pg_roles WHERE rolname = ANY(:names)"
            ),
            {"names": dbs.roles()},
        ).all()
    engine.dispose()
    assert sorted(r[0] for r in rows) == sorted(dbs.roles())
    assert all(not any(r[1:6]) and not r[7] for r in rows), rows
    assert {r[0]: r[6] for r in rows}[dbs.role("catalog")] is False  # the tables' owner cannot log in
    for role in SERVICE_ROLES:
        url = _url(dbs.role(role), dbs.catalog)
        assert "pg_execute_server_program" in _run(url, "COPY (SELECT 1) TO PROGRAM 'id'")
        assert "pg_read_server_files" in _run(url, "COPY acq_messages FROM '/etc/passwd'")
        assert "permission denied" in _run(url, "SELECT pg_read_file('/etc/passwd')")
        assert "permission denied" in _run(url, "CREATE TABLE evil (x int)")
        assert "must be owner" in _run(url, "DROP TABLE acq_messages")
        assert "permission denied for database" in (_run(_url(dbs.role(role), dbs.dagster), "SELECT 1") or "")
    assert "permission denied for database" in (
        _run(_url(dbs.role("dagster"), dbs.catalog), "SELECT 1") or ""
    )
    assert (
        _run(_url(dbs.role("dagster"), dbs.dagster), "CREATE TABLE runs_like (x int)") is None
    )  # Dagster's own


def test_each_service_has_exactly_its_tables_rights(dbs):
    engine = sa.create_engine(_url(PG_USER, dbs.catalog))
    with engine.connect() as conn:
        granted = conn.execute(
            sa.text(
                "SELECT grantee, table_name, string_agg(privilege_type, ', ' ORDER BY privilege_type) "
                "FROM information_schema.role_table_grants WHERE grantee = ANY(:r) GROUP BY grantee, table_name"
            ),
            {"r": [dbs.role(s) for s in SERVICE_ROLES]},
        ).all()
        owners = dict(
            conn.execute(
                sa.text("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'")
            ).all()
        )
    engine.dispose()
    want = {
        (dbs.role(service), table): ", ".join(sorted(p.strip() for p in privileges.split(",")))
        for service, rights in catalog_rights().items()
        for table, privileges in rights.items()
    }
    assert {(g, t): p for g, t, p in granted} == want
    assert set(owners) == set(catalog_tables()) and set(owners.values()) == {
        dbs.role("catalog")
    }  # the old table too


def test_the_services_own_code_runs_as_its_role_and_is_refused_the_rest(dbs):
    from em_platform.catalog.db import CatalogDB
    from em_platform.catalog.dead_letters import DeadLetters
    from em_platform.tem.journal import Journal

    listener = Journal(_url(dbs.role("listener"), dbs.catalog))
    assert listener.record("qc.status", {"status": "GOOD", "reason": None})
    letters = DeadLetters(_url(dbs.role("listener"), dbs.catalog))  # its table upgraded by the superuser
    letters.add(source="broker", topic="tile.raw", field="tile_id", reason="not a safe id", body="{}")
    assert letters.letters()[0].body_sha256
    with pytest.raises(sa.exc.ProgrammingError, match="permission denied for table datasets"):
        CatalogDB(_url(dbs.role("listener"), dbs.catalog)).begin("local", "a.tif", description="", files=[])
    runs = CatalogDB(_url(dbs.role("runs"), dbs.catalog))
    assert runs.begin("local", "a.tif", description="a file", files=[])["status"] == "pending"
    code = Journal(_url(dbs.role("code"), dbs.catalog))
    assert code.high_water_mark() >= 1  # the sensors read the journal ...
    with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
        code.record("qc.status", {"status": "STOP_NOW", "reason": "x"})  # ... and do not write it
    for journal in (listener, code):
        journal.dispose()
