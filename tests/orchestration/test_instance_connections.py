"""Dagster's PostgreSQL storages open a connection for every query outside the webserver (an idle daemon: 18
a second); the facility's instance keeps a small pool in each process, and a PostgreSQL that drops its
connections (a restart) costs a reconnect, not an error. On the local PostgreSQL server (skipped without it)."""

from __future__ import annotations

import dagster as dg
import sqlalchemy as sa

from em_platform.deploy.dagster_instance import POOLED_CONNECTIONS, FacilityInstance


def _instance(pg_url: str):
    return dg.instance_for_test(
        overrides={
            "instance_class": {"module": "em_platform.deploy.dagster_instance", "class": "FacilityInstance"},
            "storage": {"postgres": {"postgres_url": pg_url}},
        }
    )


def _storages(instance) -> list:
    return [instance._run_storage, instance._event_storage, instance._schedule_storage]


def _queries(instance) -> None:
    """What a daemon's tick asks each storage: runs, an asset's latest event, the sensors' states."""
    instance.get_runs(limit=1)
    instance.get_latest_materialization_event(dg.AssetKey("tile_qc"))
    instance.all_instigator_state()


def test_a_facility_process_reuses_its_postgresql_connections(pg_url):
    with _instance(pg_url) as instance:
        assert isinstance(instance, FacilityInstance)
        opened: list[str] = []
        for storage in _storages(instance):
            name = type(storage).__name__
            sa.event.listen(storage._engine, "connect", lambda *_, n=name: opened.append(n))
        for _ in range(50):
            _queries(instance)
    assert len(opened) <= 3 * POOLED_CONNECTIONS, opened  # one per query (Dagster's NullPool): 150


def test_connections_postgresql_dropped_are_replaced_not_raised(pg_url):
    database = sa.engine.make_url(pg_url).database
    admin = sa.create_engine(pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        with _instance(pg_url) as instance:
            _queries(instance)  # the pools hold open connections now
            with admin.connect() as conn:  # what a PostgreSQL restart does to them
                ended = conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :d"
                    ),
                    {"d": database},
                ).scalar()
            assert ended >= 3, ended
            _queries(instance)  # checked before use: reconnected, no OperationalError
            assert instance.get_runs() == []
    finally:
        admin.dispose()
