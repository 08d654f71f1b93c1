"""``retention_job`` on a platform that ran a montage weeks ago: the archived montage's journal rows and its
partition go, the montage still in flight and everything the catalog holds stay, old runs that show nothing
go while the run of the catalog's latest materialization stays, decided dead letters go, waiting ones stay;
the archived montage's buffer folder (kept by ``free_buffer: false``) goes, the flying one's stays; a tilt
series' intermediates go, its products stay; a second run lets go of nothing more, and the montage let go can
no longer be run again over its record. With ``EM_RETAIN_TILE_RECORDS_DAYS`` set, its tile records go too."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from em_platform.catalog.db import CatalogDB, datasets
from em_platform.catalog.dead_letters import DeadLetters, dead_letters
from em_platform.cryo.results_db import CryoResults, tilt_series
from em_platform.retention.cryo import INTERMEDIATES
from em_platform.retention_job import PARTITION_TAG, montage_runs, partitions_with_runs
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
        run_config={
            "ops": {
                "montage_tiles": {"config": {"poll_seconds": 0.05}},
                "montage_upload": {"config": {"free_buffer": False}},  # its buffer folder left to retention
            }
        },
    )


def _backdate_files(folder: Path, days: int) -> None:
    when = (datetime.now(UTC) - timedelta(days=days)).timestamp()
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (when, when), follow_symlinks=False)


def _tilt_series(url: str, work: Path, key: str, days: int) -> dict[str, bytes]:
    """A tilt series processed ``days`` ago: its results row complete, its folder's files (name -> bytes)."""
    files = {name: b"x" * 1000 for name in INTERMEDIATES} | {
        "motioncorr/corrected.mrc": b"c" * 1000,
        "tomogram/ts_wbp.mrc": b"t" * 500,
        "tomogram/half_even.mrc": b"h" * 500,
        "denoised/ts_denoised.mrc": b"d" * 500,
    }
    for name, data in files.items():
        (work / key / name).parent.mkdir(parents=True, exist_ok=True)
        (work / key / name).write_bytes(data)
    results = CryoResults(url)
    series = {"name": "ts", "kind": "tilt_series"}
    results.replace(key, series=series, movie_rows=[], ctf_rows=[], alignment=None, tomogram_rows=[])
    with results.engine.begin() as conn:
        when = datetime.now(UTC) - timedelta(days=days)
        conn.execute(tilt_series.update().where(tilt_series.c.partition_key == key).values(updated_at=when))
    results.dispose()
    _backdate_files(work / key, days)
    return files


def _check_runs(instance: dg.DagsterInstance) -> set[str]:
    """The runs of every asset check execution stored."""
    from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable

    with instance.event_log_storage.index_connection() as conn:
        return {r[0] for r in conn.execute(sa.select(AssetCheckExecutionsTable.c.run_id)).all()}


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
        buffer = Path(platform.settings.buffer)
        kept = sum(p.stat().st_size for p in (buffer / old).rglob("*") if p.is_file())
        assert kept > 0  # free_buffer: false
        (buffer / flying).mkdir()
        (buffer / flying / "layout.json").write_text("{}")  # a montage still being processed: written today
        _backdate_files(buffer / old, 20)
        work = platform.data_root / "cryo"  # the cryo work root of a local data root
        series = _tilt_series(url, work, "sessions/grid1/TS_01", 20)
        # weeks later: the montage archived 20 days ago, the runs ended 100 days ago, a letter decided 100 days ago
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(datasets.update().values(updated_at=datetime.now(UTC) - timedelta(days=20)))
            conn.execute(dead_letters.update().where(dead_letters.c.cleared_at.is_not(None)).values(
                cleared_at=datetime.now(UTC) - timedelta(days=100)))  # fmt: skip
        _backdate_runs(instance, 100)
        runs_before = {r.run_id: r.job_name for r in instance.get_runs()}
        checks_before = _check_runs(instance)
        assert set(runs_before) & checks_before  # the montage run evaluated its checks
        catalog_run = instance.get_latest_materialization_event(
            dg.AssetKey(["catalog", "metadata_catalog"])
        ).run_id

        result = platform.defs.resolve_job_def("retention_job").execute_in_process(instance=instance)
        assert result.success
        done = result.output_for_node("apply_retention")
        assert done["montages_retired"] == 1 and done["journal_tiles"] >= 4 and done["dead_letters"] == 1
        montage_runs = {r for r, job in runs_before.items() if job == "montage_job"}
        assert (
            done["montage_runs"] == len(montage_runs) == 1
        )  # with its partition, not after the runs' window
        assert (done["buffer_montages"], done["buffer_bytes"]) == (1, kept)
        assert (done["cryo_series"], done["cryo_bytes"]) == (1, 1000 * len(INTERMEDIATES))
        assert not (buffer / old).exists() and (buffer / flying / "layout.json").exists()
        archive = platform.data_root / "acquisition" / old
        assert (archive / "upload-manifest.json").is_file()  # the archive it was verified against, whole
        products = {n: b for n, b in series.items() if n not in INTERMEDIATES}
        assert {n: (work / "sessions/grid1/TS_01" / n).read_bytes() for n in products} == products  # whole
        assert not any((work / "sessions/grid1/TS_01" / n).exists() for n in INTERMEDIATES)

        assert journal.tiles(old) == [] and journal.messages(montage_id=old) == []
        assert journal.montage(old).retired
        assert len(journal.tiles(flying)) == len(journal.tiles(flying)) > 0  # in flight: untouched
        assert instance.get_dynamic_partitions("montages") == [flying]
        assert CatalogDB(url).find("acquisition", old) == record  # the record, whole
        assert TileRecords(url).montage_tiles(old) == tiles  # the tile records, whole
        assert [letter.id for letter in letters.letters(include_cleared=True)] == [waiting]
        left = {r.run_id for r in instance.get_runs()}
        assert not montage_runs & left  # its partition gone, ended long ago: nothing shows it
        assert catalog_run in left  # the catalog's latest materialization
        assert _check_runs(instance) == checks_before & left  # a deleted run's check executions went with it

        again = platform.defs.resolve_job_def("retention_job").execute_in_process(instance=instance)
        assert again.output_for_node("apply_retention") == {
            "montages_retired": 0,
            "montage_runs": 0,
            "journal_messages": 0,
            "journal_tiles": 0,
            "dead_letters": 0,
            "runs": 0,
            "buffer_montages": 0,
            "buffer_bytes": 0,
            "cryo_series": 0,
            "cryo_bytes": 0,
        }

        monkeypatch.setenv("EM_RETAIN_TILE_RECORDS_DAYS", "10")  # archived 20 days ago
        tiles_run = platform.defs.resolve_job_def("retention_job").execute_in_process(instance=instance)
        assert tiles_run.output_for_node("apply_retention")["tile_records"] == 4
        assert TileRecords(url).montage_tiles(old) == [] and CatalogDB(url).find("acquisition", old) == record
        assert (archive / "upload-manifest.json").is_file()

        instance.add_dynamic_partitions("montages", [old])  # an operator tries to run it again
        rerun = _montage_run(platform, instance, old)
        assert not rerun.success
        errors = [str(e.step_failure_data.error) for e in rerun.get_step_failure_events()]
        assert any("MontageRetired" in m and "journal rows let go" in m for m in errors), errors
        assert CatalogDB(url).find("acquisition", old) == record  # nothing re-archived over it


def test_a_partition_with_a_run_not_finished_or_ended_within_the_window_is_busy():
    from dagster._core.storage.runs.schema import RunsTable

    statuses = {
        "created": dg.DagsterRunStatus.NOT_STARTED,
        "running": dg.DagsterRunStatus.STARTED,
        "recent": dg.DagsterRunStatus.FAILURE,
        "old": dg.DagsterRunStatus.SUCCESS,
    }
    with dg.instance_for_test() as instance:
        for key, status in statuses.items():
            tags = {PARTITION_TAG: key}
            instance.add_run(dg.DagsterRun(job_name="montage_job", run_id=key, status=status, tags=tags))
        instance.add_run(dg.DagsterRun(job_name="catalog_job", run_id="unpartitioned"))
        long_ago = (datetime.now(UTC) - timedelta(days=30)).replace(tzinfo=None)
        with instance.run_storage.connect() as conn:  # all but "recent" last changed a month ago
            conn.execute(
                RunsTable.update().where(RunsTable.c.run_id != "recent").values(update_timestamp=long_ago)
            )
        window = datetime.now(UTC) - timedelta(days=14)
        assert partitions_with_runs(instance, window) == {"created", "running", "recent"}


def test_a_retired_montage_s_runs_are_its_finished_montage_runs_only(tmp_path):
    platform = make_platform(tmp_path)
    assets = [a for a in platform.defs.assets if isinstance(a, dg.AssetsDefinition)]
    montage_key = dg.AssetKey("montage")
    runs = {  # run id: (job, asset selection, partition, status)
        "montage": ("montage_job", None, "m1", dg.DagsterRunStatus.SUCCESS),
        "failed": ("montage_job", None, "m1", dg.DagsterRunStatus.FAILURE),
        "running": ("montage_job", None, "m1", dg.DagsterRunStatus.STARTED),
        "asset": ("__ASSET_JOB", {montage_key}, "m1", dg.DagsterRunStatus.SUCCESS),
        "ingest": ("ingest_local_job", None, "m1", dg.DagsterRunStatus.SUCCESS),  # the same key elsewhere
        "mixed": ("__ASSET_JOB", {montage_key, dg.AssetKey("other")}, "m1", dg.DagsterRunStatus.SUCCESS),
        "other": ("montage_job", None, "m2", dg.DagsterRunStatus.SUCCESS),
    }
    with dg.instance_for_test() as instance:
        for run_id, (job, selection, key, status) in runs.items():
            instance.add_run(
                dg.DagsterRun(
                    job_name=job,
                    run_id=run_id,
                    status=status,
                    tags={PARTITION_TAG: key},
                    asset_selection=frozenset(selection) if selection else None,
                )
            )
        assert set(montage_runs(instance, ["m1"], assets)) == {"montage", "failed", "asset"}
