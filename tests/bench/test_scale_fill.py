"""The scale harness's fill (bench/scale): a real montage run as the template, then montages copied from it into
Dagster's storage and the catalog, with runs and runless events as planned, each montage's rows renamed to it
and the newest ones' journal rows kept; what retention
would delete with the runs the runless events stand for is deleted with them. What it measures is make bench-scale's, not asserted here."""

from __future__ import annotations

import logging
import os
import uuid

import dagster as dg
import pytest
import sqlalchemy as sa

from bench.scale import measure
from bench.scale.fill import CatalogFill, DagsterFill, FillPlan, fill, montage_key
from bench.scale.stores import ScaleStores
from bench.scale.template import run_template
from em_platform.tem.journal import Journal

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def stores(pg_url):  # pg_url: skips with a reason when PostgreSQL is absent
    tag = uuid.uuid4().hex[:8]
    stores = ScaleStores(dagster_db=f"em_test_scale_d_{tag}", catalog_db=f"em_test_scale_c_{tag}")
    stores.create()
    yield stores
    stores.drop()


def _indexes(url: str) -> set[tuple[str, str]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")
        )
        indexes = {tuple(r) for r in found}
    engine.dispose()
    return indexes


def test_fill_copies_the_template_montage_as_planned(stores, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "unused"))  # run_template sets its own
    logging.disable(logging.INFO)
    try:
        template = run_template(stores, tmp_path, rows=2, columns=3)
    finally:
        logging.disable(logging.NOTSET)
    assert template.tiles == 6 and template.object_bytes > 0
    plan = FillPlan(real_runs=3, tiles_per_montage=60, tile_rows=4 * 60, journal_montages=2)
    instance = dg.DagsterInstance.from_config(os.environ["DAGSTER_HOME"])
    catalog = CatalogFill(stores.catalog_url, template, plan)
    dagster = DagsterFill(instance, stores.dagster_url, template, plan)
    try:
        indexes_before = _indexes(stores.catalog_url)
        done = fill(catalog, dagster, 0, 5, batch=2)
        assert _indexes(stores.catalog_url) == indexes_before  # the journal's, made again after its copy
        keys = [montage_key(i) for i in range(5)]
        assert set(keys) <= set(instance.get_dynamic_partitions("montages"))
        runs = instance.get_runs(filters=dg.RunsFilter(job_name="montage_job"))
        assert sorted(r.tags["dagster/partition"] for r in runs) == sorted([*keys[:3], template.montage_id])
        for key in keys:  # every montage materialized, with a run or (beyond real_runs) without
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("montage"), asset_partitions=[key]), limit=1
            ).records
            assert records, f"no materialization of montage {key}"
            assert (records[0].run_id == "") == (key in keys[3:])
        copy = next(r for r in runs if r.tags["dagster/partition"] == keys[1])
        logs, original = instance.all_logs(copy.run_id), instance.all_logs(template.run.run_id)
        assert [e.dagster_event_type for e in logs] == [e.dagster_event_type for e in original]
        assert {
            e.dagster_event.partition for e in logs if e.is_dagster_event and e.dagster_event.partition
        } == {keys[1]}
        ended = instance.get_run_record_by_id(template.run.run_id).end_time
        assert instance.get_run_record_by_id(copy.run_id).end_time == pytest.approx(
            ended - 86400 / plan.per_day
        )
        checks = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("montage_layout"), "seams"), limit=100
        )
        assert sum(c.run_id == copy.run_id for c in checks) == 1  # its check, once, under its run
        assert done["rows"]["catalog.datasets"] == 5
        assert done["rows"]["catalog.tem_tiles"] == 4 * 60  # the montages within the tile rows given
        engine = sa.create_engine(stores.catalog_url)
        with engine.connect() as conn:
            per_montage = dict(
                conn.execute(sa.text("SELECT montage_id, count(*) FROM tem_tiles GROUP BY 1")).all()
            )
            journal = dict(
                conn.execute(sa.text("SELECT montage_id, count(*) FROM acq_tiles GROUP BY 1")).all()
            )
            references = conn.execute(  # the scope's reference frames: once a montage, not per tile
                sa.text(
                    "SELECT count(*) FROM acq_tiles WHERE montage_id = :m AND (brightfield OR darkfield)"
                ),
                {"m": template.montage_id},
            ).scalar_one()
            named = conn.execute(
                sa.text(
                    "SELECT count(*) FROM tem_tiles WHERE montage_id = :k AND image_uri LIKE '%' || :k || '%'"
                ),
                {"k": keys[1]},
            ).scalar_one()
        engine.dispose()
        assert per_montage[keys[0]] == 60 and keys[4] not in per_montage
        assert named == 60  # each copy renamed to its montage
        assert set(journal) == {template.montage_id, keys[0], keys[1]}  # the newest two keep journal rows
        assert journal[keys[0]] == 60 + references
        scope = Journal(stores.catalog_url, create=False)
        order = [m.montage_id for m in scope.montages_after(0) if m.montage_id in keys]
        scope.engine.dispose()
        assert order == keys[::-1]  # numbered as a scope's journal would: the newest montage last
        seconds, due = measure.storage_check(stores.catalog_url, tmp_path / "data", template.montage_id, 1)
        assert due == 1 and set(seconds) == {"run.storage_audit_due", "run.storage_audit_template_montage"}

        # retention deletes montage 4's run: the events standing in for it go as the run's would, montage 3's
        # (ended later) and every run's stay
        def events(key: str) -> list:
            filt = dg.AssetRecordsFilter(asset_key=dg.AssetKey("montage"), asset_partitions=[key])
            return instance.fetch_materializations(filt, limit=10).records

        day = 86400 / plan.per_day
        assert dagster.rows.forget_standins(before=ended - 5 * day) == 0  # none ended before
        assert dagster.rows.forget_standins(before=ended - 3.5 * day) > 0
        assert not events(keys[4]) and events(keys[3]) and events(keys[0])
        checks = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("montage_layout"), "seams"), limit=100
        )
        assert sum(c.run_id == "" for c in checks) == 1  # montage 3's; montage 4's went with its events
    finally:
        dagster.dispose()
        catalog.dispose()
        instance.dispose()
