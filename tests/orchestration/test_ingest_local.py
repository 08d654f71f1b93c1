"""ingest/local end to end through Dagster: sample files of every format, a corrupt one, re-runs, the catalog."""

from __future__ import annotations

import json

import dagster as dg
import mrcfile
import numpy as np
import pytest
import sqlalchemy as sa
import zarr

from em_platform.catalog.db import CatalogDB, datasets
from em_platform.catalog.schema import validation_errors
from em_platform.formats import open_volume
from em_platform.samples import write_samples
from tests.support.platform import make_platform


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """One platform, the sample set plus a truncated MRC, every entry run through the ingest job once."""
    tmp = tmp_path_factory.mktemp("ingest")
    platform = make_platform(tmp)
    samples = write_samples(platform.inbox)
    broken = platform.inbox / "broken.mrc"
    with mrcfile.new(broken) as m:
        m.set_data(np.zeros((8, 64, 64), np.uint16))
    broken.write_bytes(broken.read_bytes()[:5000])
    keys = sorted([p.name for p in samples] + ["broken.mrc"])
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("inbox_entries", keys)
        job = platform.defs.resolve_job_def("ingest_local_job")
        results = {
            k: job.execute_in_process(instance=instance, partition_key=k, raise_on_error=False) for k in keys
        }
        yield platform, instance, results


def _db(platform) -> CatalogDB:
    return CatalogDB(platform.settings.catalog_url)


def test_every_good_entry_completes_while_the_corrupt_one_fails_alone(ingested):
    platform, _, results = ingested
    assert not results["broken.mrc"].success
    good = {k: r for k, r in results.items() if k != "broken.mrc"}
    assert len(good) >= 5 and all(r.success for r in good.values()), {k: r.success for k, r in good.items()}
    db = _db(platform)
    for key in good:
        rec = db.find("local", key)
        assert rec["status"] == "complete", key
        assert validation_errors(rec) == []
        assert [h.to_status for h in db.history(rec["id"])] == [
            "pending",
            "processing",
            "saving-data",
            "complete",
        ]


def test_output_equals_source_voxels_with_voxel_size(ingested):
    platform, _, results = ingested
    db = _db(platform)
    for key in results:
        if key == "broken.mrc":
            continue
        rec = db.find("local", key)
        vol = open_volume(platform.inbox / key)
        level0 = zarr.open_group(rec["files"]["volume"], mode="r")["0"]
        np.testing.assert_array_equal(level0[...], vol.data.compute(), err_msg=key)
        core = rec["metadata"]["core"]
        assert core["data_type"] == vol.data.dtype.name
        assert core["volume_shape"] == list(vol.data.shape)
        header = {a: s for a, s in vol.voxel_size_nm().items() if s}
        assert {a: core["voxel_size_nm"][a] for a in header} == pytest.approx(header)


def test_failed_record_names_the_file_and_publishes_nothing(ingested):
    platform, _, results = ingested
    rec = _db(platform).find("local", "broken.mrc")
    assert rec["status"] == "failed"
    assert "broken.mrc" in rec["error"]["message"] and "truncated" in rec["error"]["message"]
    assert rec["error"]["retry_count"] == 1
    assert not (platform.data_root / "ingest" / "local" / "broken.ome.zarr").exists()
    staging = platform.data_root / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), "a half-written image was left behind"
    failure = results["broken.mrc"].get_run_failure_event()
    assert failure is not None


def test_materialization_metadata_for_the_ui(ingested):
    platform, instance, results = ingested
    mats = results["fibsem_crop.ome.tif"].asset_materializations_for_node("ingest__local")
    meta = mats[0].metadata
    assert meta["shape"].value == "(24, 192, 192)"
    assert meta["dtype"].value == "uint8"
    assert meta["voxel_size_nm"].value == {"x": 5.0, "y": 5.0, "z": 8.0}
    assert len(meta["sha256"].value) == 64
    assert meta["path"].value.endswith("fibsem_crop.ome.zarr")
    assert meta["thumbnail"].value.startswith("![fibsem_crop.ome.tif](data:image/png;base64,")
    assert meta["converted"].value is True
    event = instance.get_latest_materialization_event(dg.AssetKey(["ingest", "local"]))
    assert event is not None


def test_uncalibrated_file_is_flagged_assumed(ingested):
    platform, _, _ = ingested
    core = _db(platform).find("local", "overview.tif")["metadata"]["core"]
    assert core["voxel_size_source"] == "assumed" and core["voxel_size_nm"] == {"x": 1.0, "y": 1.0}


def test_rerun_of_an_unchanged_entry_changes_nothing(ingested):
    platform, instance, _ = ingested
    before = _db(platform).find("local", "tomogram.mrc")
    zarr_json = platform.data_root / "ingest" / "local" / "tomogram.ome.zarr" / "zarr.json"
    mtime = zarr_json.stat().st_mtime_ns
    result = platform.defs.resolve_job_def("ingest_local_job").execute_in_process(
        instance=instance, partition_key="tomogram.mrc"
    )
    assert result.success
    assert result.asset_materializations_for_node("ingest__local")[0].metadata["converted"].value is False
    assert _db(platform).find("local", "tomogram.mrc") == before
    assert zarr_json.stat().st_mtime_ns == mtime


def test_fixed_file_is_retried_and_completes(ingested, tmp_path):
    platform, instance, _ = ingested
    good = np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16)
    fixed = tmp_path / "fixed.mrc"
    with mrcfile.new(fixed) as m:
        m.set_data(good)
        m.voxel_size = 5.0
    (platform.inbox / "broken.mrc").write_bytes(fixed.read_bytes())
    result = platform.defs.resolve_job_def("ingest_local_job").execute_in_process(
        instance=instance, partition_key="broken.mrc"
    )
    assert result.success
    rec = _db(platform).find("local", "broken.mrc")
    assert rec["status"] == "complete" and rec["error"]["retry_count"] == 1
    np.testing.assert_array_equal(zarr.open_group(rec["files"]["volume"], mode="r")["0"][...], good)


def test_catalog_asset_exports_and_its_check_fails_on_an_invalid_record(ingested):
    platform, instance, _ = ingested
    catalog_job = platform.defs.resolve_job_def("catalog_job")
    ok = catalog_job.execute_in_process(instance=instance)
    assert ok.success
    [check] = ok.get_asset_check_evaluations()
    assert check.passed
    exports = sorted((platform.data_root / "catalog").glob("metadata_catalog_*.json"))
    reports = sorted((platform.data_root / "catalog").glob("validation_report_*.json"))
    assert exports and reports
    doc = json.loads(exports[-1].read_text())
    assert doc["summary"]["records_by_source"]["local"] >= 6
    assert doc["validation"]["validation_rate"] == 100.0

    db = _db(platform)
    rec = db.find("local", "overview.tif")
    rec["metadata"]["core"]["data_type"] = "uint12"  # as an old writer or a hand edit might leave it
    with db.engine.begin() as conn:
        conn.execute(sa.update(datasets).where(datasets.c.id == rec["id"]).values(record=rec))
    bad = catalog_job.execute_in_process(instance=instance, raise_on_error=False)
    [check] = bad.get_asset_check_evaluations()
    assert not check.passed
    assert check.metadata["invalid_records"].value == 1
    assert "metadata.core.data_type" in json.dumps(check.metadata["errors"].value)
    report = json.loads(
        sorted((platform.data_root / "catalog").glob("validation_report_*.json"))[-1].read_text()
    )
    assert report["summary"]["invalid_records"] == 1


def test_partition_whose_file_was_removed_fails_with_a_clear_error(ingested):
    platform, instance, _ = ingested
    instance.add_dynamic_partitions("inbox_entries", ["gone.mrc"])
    result = platform.defs.resolve_job_def("ingest_local_job").execute_in_process(
        instance=instance, partition_key="gone.mrc", raise_on_error=False
    )
    assert not result.success
    message = result.get_run_failure_event().message + str(
        result.get_step_failure_events()[0].event_specific_data.error
    )
    assert "gone.mrc" in message and "moved or deleted" in message
