"""ingest/<source> through Dagster: the assets, jobs and schedules, a run against a loopback DVID, a re-run
that finds the source unchanged, a bad endpoint, a failing source, and `dagster job backfill` from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import zarr

from em_platform.catalog.db import CatalogDB
from em_platform.sources.flyem import DATASETS as FLYEM_DATASETS
from em_platform.sources.registry import SOURCES
from tests.support.dvid_server import DvidServer
from tests.support.platform import make_platform

CROP = "hemibrain-center-256"


@pytest.fixture(autouse=True)
def _instance():
    """Resolving a Definitions object looks up the current Dagster instance; give every test one."""
    with dg.instance_for_test() as instance:
        yield instance


def _flyem_config(dvid: DvidServer, **extra) -> dict:
    return {
        "ops": {
            "ingest__flyem": {
                "config": {
                    "dvid_server": dvid.url,
                    "block_size": 128,
                    "parallel": 4,
                    "retry_base_delay_s": 0.01,
                    **extra,
                }
            }
        }
    }


def _dvid_around(crop_key: str) -> DvidServer:
    """A DVID whose volume holds the named crop with a margin (the crops sit at hemibrain coordinates)."""
    crop = FLYEM_DATASETS[crop_key]
    lo = tuple(o - 64 for o in crop.offset_zyx)
    return DvidServer(min_zyx=lo, shape_zyx=tuple(s + 128 for s in crop.size_zyx))


def test_every_source_has_an_asset_a_job_and_a_stopped_weekly_schedule(tmp_path):
    defs = make_platform(tmp_path).defs
    for name, kind in SOURCES.items():
        asset = defs.resolve_assets_def(dg.AssetKey(["ingest", name]))
        assert asset.group_names_by_key[dg.AssetKey(["ingest", name])] == "ingest"
        assert set(asset.partitions_def.get_partition_keys()) == set(kind.datasets)
        job = defs.resolve_job_def(f"ingest_{name}_job")
        assert job.tags["em/workload"] == "ingest"
        assert job.tags["em/ingest-weight"] == ("heavy" if kind.heavy else "light")
        schedule = defs.resolve_schedule_def(f"ingest_{name}_weekly")
        assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
        kind.endpoints().validate()  # the shipped defaults are the real public endpoints and valid


def test_weekly_tick_requests_one_run_per_dataset(tmp_path):
    defs = make_platform(tmp_path).defs
    schedule = defs.resolve_schedule_def("ingest_flyem_weekly")
    with dg.instance_for_test() as instance:
        ctx = dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=datetime(2026, 11, 22, 3, tzinfo=UTC),
            repository_def=defs.get_repository_def(),
        )
        requests = schedule.evaluate_tick(ctx).run_requests
    assert sorted(r.partition_key for r in requests) == sorted(FLYEM_DATASETS)
    assert len({r.run_key for r in requests}) == len(requests)


def test_flyem_ingest_then_an_unchanged_recheck_fetches_nothing(tmp_path):
    platform = make_platform(tmp_path)
    job = platform.defs.resolve_job_def("ingest_flyem_job")
    crop = FLYEM_DATASETS[CROP]
    with _dvid_around(CROP) as dvid, dg.instance_for_test() as instance:
        dvid_url = dvid.url
        expected = dvid.voxels(crop.offset_zyx, crop.size_zyx)
        result = job.execute_in_process(instance=instance, partition_key=CROP, run_config=_flyem_config(dvid))
        assert result.success
        blocks = len(dvid.raw_requests())
        assert blocks == 8  # 256³ in 128³ blocks

        again = job.execute_in_process(instance=instance, partition_key=CROP, run_config=_flyem_config(dvid))
        assert again.success
        assert len(dvid.raw_requests()) == blocks  # the re-check asked for info only
        mat = again.asset_materializations_for_node("ingest__flyem")[0]
        assert mat.metadata["converted"].value is False

        catalog_run = platform.defs.resolve_job_def("catalog_job").execute_in_process(instance=instance)
        assert catalog_run.get_asset_check_evaluations()[0].passed

    db = CatalogDB(platform.settings.catalog_url)
    rec = db.records("flyem")[0]
    history = [h.to_status for h in db.history(rec["id"])]
    db.dispose()
    assert rec["status"] == "complete"
    assert history == ["pending", "processing", "saving-data", "complete"]
    core = rec["metadata"]["core"]
    assert core["volume_shape"] == list(crop.size_zyx) and core["data_type"] == "uint8"
    assert core["voxel_size_nm"] == {"z": 8.0, "y": 8.0, "x": 8.0}
    assert rec["lineage"]["partition_key"] == CROP
    assert rec["files"]["source"][0]["url"].startswith(dvid_url)
    volume = zarr.open_group(rec["files"]["volume"], mode="r")
    np.testing.assert_array_equal(volume["0"][...], expected)
    assert not (platform.data_root / "downloads" / "flyem").exists() or not any(
        (platform.data_root / "downloads" / "flyem").iterdir()
    )  # downloads deleted after a complete ingest


def test_a_bad_endpoint_fails_the_run_at_its_start_naming_the_field(tmp_path):
    platform = make_platform(tmp_path)
    job = platform.defs.resolve_job_def("ingest_flyem_job")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance,
            partition_key=CROP,
            run_config={"ops": {"ingest__flyem": {"config": {"dvid_server": "hemibrain-dvid.janelia.org"}}}},
            raise_on_error=False,
        )
    assert not result.success
    failure = result.failure_data_for_node("ingest__flyem").error
    assert "dvid_server" in failure.message and "bad endpoint configuration" in failure.message
    db = CatalogDB(platform.settings.catalog_url)
    assert db.records("flyem") == []  # nothing was started, so nothing is recorded
    db.dispose()


def test_a_failing_source_leaves_a_failed_record_and_a_rerun_resumes(tmp_path):
    platform = make_platform(tmp_path)
    job = platform.defs.resolve_job_def("ingest_flyem_job")
    with _dvid_around(CROP) as dvid, dg.instance_for_test() as instance:
        dvid.fail_after(3, status=404)
        first = job.execute_in_process(
            instance=instance,
            partition_key=CROP,
            run_config=_flyem_config(dvid, parallel=1),
            raise_on_error=False,
        )
        assert not first.success
        db = CatalogDB(platform.settings.catalog_url)
        failed = db.records("flyem")[0]
        assert failed["status"] == "failed"
        assert "404" in failed["error"]["message"] and dvid.url in failed["error"]["message"]
        assert failed["error"]["retry_count"] == 1
        assert "volume" not in failed["files"]
        assert not list((platform.data_root / "ingest").glob("flyem/*.ome.zarr"))  # nothing published

        dvid.clear_faults()
        fetched_before = len(dvid.raw_requests(ok_only=True))
        second = job.execute_in_process(instance=instance, partition_key=CROP, run_config=_flyem_config(dvid))
        assert second.success
        assert len(dvid.raw_requests(ok_only=True)) - fetched_before == 8 - 3  # only the missing blocks
        rec = db.records("flyem")[0]
        db.dispose()
    assert rec["status"] == "complete" and rec["error"]["retry_count"] == 1


def test_job_backfill_from_the_cli_queues_one_run_per_dataset(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "EM_DATA_ROOT": str(tmp_path / "data"),
    }
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "job",
            "backfill",
            "-w",
            str(repo / "workspace.yaml"),
            "-j",
            "ingest_flyem_job",
            "--partitions",
            ",".join(sorted(FLYEM_DATASETS)),
            "--noprompt",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Launched backfill" in out.stdout + out.stderr
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name="ingest_flyem_job"))
    assert sorted(r.tags["dagster/partition"] for r in runs) == sorted(FLYEM_DATASETS)
    assert all(r.tags["em/ingest-weight"] == "heavy" for r in runs)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_run_config_fields_mirror_the_endpoints(tmp_path, name):
    """Every endpoint setting can be set per run, under the same name, with the public default."""
    import dataclasses

    defs = make_platform(tmp_path).defs
    job = defs.resolve_job_def(f"ingest_{name}_job")
    fields = job.run_config_schema.config_type.fields["ops"].config_type.fields
    config_fields = fields[f"ingest__{name}"].config_type.fields["config"].config_type.fields
    endpoint_fields = {f.name for f in dataclasses.fields(SOURCES[name].endpoints) if f.init}
    assert endpoint_fields | {"keep_downloads", "force"} == set(config_fields)


def test_endpoint_defaults_come_from_the_environment_and_a_bad_one_is_named(monkeypatch):
    """EM_<SOURCE>_<FIELD> points every run at a mirror (the README's commands run unchanged offline)."""
    from em_platform.assets.ingest_public import build_public_ingest
    from em_platform.settings import ConfigError

    monkeypatch.setenv("EM_EMPIAR_API_URL", "http://127.0.0.1:9/empiar/api/entry/{entry_id}/")
    monkeypatch.setenv("EM_EMPIAR_TRANSPORT", "https")
    monkeypatch.setenv("EM_EMPIAR_PARALLEL", "2")
    asset, _, _ = build_public_ingest(SOURCES["empiar"])
    fields = asset.op.config_schema.config_type.fields
    assert fields["api_url"].default_value == "http://127.0.0.1:9/empiar/api/entry/{entry_id}/"
    assert fields["transport"].default_value == "https" and fields["parallel"].default_value == 2
    assert (
        fields["archive_ftp"].default_value
        == "ftp://ftp.ebi.ac.uk/empiar/world_availability/{entry_id}/data/"
    )

    monkeypatch.setenv("EM_EMPIAR_PARALLEL", "many")
    with pytest.raises(ConfigError, match="EM_EMPIAR_PARALLEL='many'"):
        build_public_ingest(SOURCES["empiar"])
    monkeypatch.setenv("EM_EMPIAR_PARALLEL", "2")
    monkeypatch.setenv("EM_EMPIAR_API_URL", "www.ebi.ac.uk/empiar")
    with pytest.raises(ConfigError, match="EM_EMPIAR_API_URL.*api_url must be a http/https:// URL"):
        build_public_ingest(SOURCES["empiar"])
