"""``retention_job`` on a platform that ran a montage weeks ago: the archived montage's journal rows and its
partition go, the montage still in flight and everything the catalog holds stay, old runs that show nothing
go while the run of the catalog's latest materialization stays, decided dead letters go, waiting ones stay;
a second run lets go of nothing more, and the montage let go can no longer be run again over its record."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
import sqlalchemy as sa

from em_platform.catalog.db import CatalogDB, datasets
from em_platform.catalog.dead_letters import DeadLetters, dead_letters
from em_platform.simulation.scope import simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.tem.journal import Journal
from em_platform.tem.tile_records import TileRecords
from tests.support.platform import make_platform

pytestmark = pytest.mark.slow


def _backdate_runs(instance: dg.DagsterInstance, days: int) -> None:
    """Every run ended ``days`` ago, as the run storage would hold it then."""
    from dagster._core.storage.runs.schema import RunsTable

    when = datetime.now(UTC) - timedelta(days=days)
    with instance.run_storage.connect() as conn:
        conn.execute(RunsTable.update().values(update_timestamp=when.replace(tzinfo=None)))


def _montage_run(platform, instance, montage_id: str) -> dg.ExecuteInProcessResult:
    return platform.defs.resolve_job_def("montage_job").execute_in_process(
        instance=instance,
        partition_key=montage_id,
        raise_on_error=False,
        run_config={"ops": {"montage_tiles": {"config": {"poll_seconds": 0.05}}}},
    )


def test_retention_lets_go_of_what_the_policy_does_not_keep_and_nothing_else(tmp_path, monkeypatch):
    platform = make_platform(tmp_path)
    url = platform.settings.catalog_url
    journal = Journal(url)
    cfg = ScopeConfig(rows=2, columns=2, overlap=0.15, jitter_px=8.0)
    old = simulate_montage(cfg, tmp_path / "tiles", journal.record, sleep=lambda s: None).montage_id
    flying = simulate_montage(cfg, tmp_path / "tiles2", journal.record, sleep=lambda s: None).montage_id
    letters = DeadLetters(url)
    waiting = letters.add(source="broker", topic="tile.raw", field="tile_id", reason="bad id", body="1")
    letters.clear(
        [letters.add(source="broker", topic="tile.raw", field="tile_id", reason="bad id", body="2")]
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", [old, flying])
        assert _montage_run(platform, instance, old).success
        assert platform.defs.resolve_job_def("catalog_job").execute_in_process(instance=instance).success
        record = CatalogDB(url).find("acquisition", old)
        tiles = TileRecords(url).montage_tiles(old)
        assert record["status"] == "complete" and len(tiles) == 4
        # weeks later: the montage archived 20 days ago, the runs ended 100 days ago, a letter decided 100 days ago
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(datasets.update().values(updated_at=datetime.now(UTC) - timedelta(days=20)))
            conn.execute(dead_letters.update().where(dead_letters.c.cleared_at.is_not(None)).values(
                cleared_at=datetime.now(UTC) - timedelta(days=100)))  # fmt: skip
        _backdate_runs(instance, 100)
        runs_before = {r.run_id: r.job_name for r in instance.get_runs()}
        catalog_run = instance.get_latest_materialization_event(
            dg.AssetKey(["catalog", "metadata_catalog"])
        ).run_id

        result = platform.defs.resolve_job_def("retention_job").execute_in_process(instance=instance)
        assert result.success
        done = result.output_for_node("apply_retention")
        assert done["montages_retired"] == 1 and done["journal_tiles"] >= 4 and done["dead_letters"] == 1

        assert journal.tiles(old) == [] and journal.messages(montage_id=old) == []
        assert journal.montage(old).retired
        assert len(journal.tiles(flying)) == len(journal.tiles(flying)) > 0  # in flight: untouched
        assert instance.get_dynamic_partitions("montages") == [flying]
        assert CatalogDB(url).find("acquisition", old) == record  # the record, whole
        assert TileRecords(url).montage_tiles(old) == tiles  # the tile records, whole
        assert [letter.id for letter in letters.letters(include_cleared=True)] == [waiting]
        left = {r.run_id for r in instance.get_runs()}
        montage_runs = {r for r, job in runs_before.items() if job == "montage_job"}
        assert not montage_runs & left  # its partition gone, ended long ago: nothing shows it
        assert catalog_run in left  # the catalog's latest materialization

        again = platform.defs.resolve_job_def("retention_job").execute_in_process(instance=instance)
        assert again.output_for_node("apply_retention") == {
            "montages_retired": 0,
            "journal_messages": 0,
            "journal_tiles": 0,
            "dead_letters": 0,
            "runs": 0,
        }

        instance.add_dynamic_partitions("montages", [old])  # an operator tries to run it again
        rerun = _montage_run(platform, instance, old)
        assert not rerun.success
        errors = [str(e.step_failure_data.error) for e in rerun.get_step_failure_events()]
        assert any("MontageRetired" in m and "journal rows let go" in m for m in errors), errors
        assert CatalogDB(url).find("acquisition", old) == record  # nothing re-archived over it
