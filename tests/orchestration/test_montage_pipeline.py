"""A simulated montage through Dagster: sensor → run → per-tile results, QC checks, published zarr."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import zarr

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.schema import validate_record
from em_platform.partitions import montages
from em_platform.resources import SimulatedScope
from em_platform.sensors.montage import montage_sensor
from em_platform.simulation.scope import simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.storage.upload import verify_upload
from em_platform.tem.journal import Journal
from em_platform.tem.tile_records import TileRecords
from tests.support.platform import make_platform

CHECKS = {"acquisition_complete", "focus", "blank_tiles", "saturated_tiles", "overlap", "tiles_received"}
LAYOUT_CHECKS = {"disconnected_tiles", "seams", "scale_distortion"}
FUSION_CHECKS = {"fused_seams"}
ACQUISITION = {"raw_tiles", "flatfield", "processed_tiles", "tile_stats", "tile_matches"}
MONTAGE = {"montage_layout", "montage", "montage_upload"}


@pytest.fixture
def platform(tmp_path):
    return make_platform(tmp_path)


def _run(platform, instance, montage_id):
    return platform.defs.resolve_job_def("montage_job").execute_in_process(
        instance=instance,
        partition_key=montage_id,
        raise_on_error=False,
        run_config={"ops": {"montage_tiles": {"config": {"poll_seconds": 0.05}}}},
    )


def test_clean_montage_end_to_end(platform, tmp_path):
    journal = Journal(platform.settings.catalog_url)
    cfg = ScopeConfig(rows=3, columns=4, overlap=0.15, jitter_px=8.0)
    truth = simulate_montage(cfg, tmp_path / "tiles", journal.record, sleep=lambda s: None)
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(
            instance_ref=instance.get_ref(),
            definitions=platform.defs,
            resources={"hardware": SimulatedScope(journal_url=platform.settings.catalog_url)},
        ) as ctx:
            tick = montage_sensor.evaluate_tick(ctx)
        assert [r.partition_key for r in tick.run_requests] == [truth.montage_id]
        instance.add_dynamic_partitions("montages", [truth.montage_id])
        result = _run(platform, instance, truth.montage_id)
        assert result.success
        evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert evaluations == {c: True for c in CHECKS | LAYOUT_CHECKS | FUSION_CHECKS}
        keys = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert keys == ACQUISITION | MONTAGE
        stats = instance.get_latest_materialization_event(
            dg.AssetKey("tile_stats")
        ).asset_materialization.metadata
        assert stats["qc_status"].value == "GOOD" and stats["tiles_passed"].value == 12
        layout = instance.get_latest_materialization_event(
            dg.AssetKey("montage_layout")
        ).asset_materialization.metadata
        assert layout["prior"].value == "stage" and layout["edges"].value == 17
        fused_meta = instance.get_latest_materialization_event(
            dg.AssetKey("montage")
        ).asset_materialization.metadata
        assert fused_meta["minimap"].value.startswith("![minimap](data:image/png;base64,")
        upload_meta = instance.get_latest_materialization_event(
            dg.AssetKey("montage_upload")
        ).asset_materialization.metadata
        # the picture once a montage: each copy is some 250 kB of Dagster's event log, twice (the
        # materialization and its step output), kept as long as the run
        assert "minimap" not in upload_meta and "montage" in upload_meta
        # the tile QC on the montage's own page, with the way to its checks
        tile_qc = fused_meta["tile_qc"].value
        assert tile_qc.startswith("12 tiles judged live: 12 passed, 0 failed."), tile_qc
        assert "`focus`" in tile_qc and "`blank_tiles`" in tile_qc
        assert "(/assets/tile_stats?view=checks)" in tile_qc, tile_qc
        # the fused montage opens at full resolution from its own page too: the same stored image (made from
        # the buffer's copy before the upload) as montage_upload's link
        uploaded_meta = instance.get_latest_materialization_event(
            dg.AssetKey("montage_upload")
        ).asset_materialization.metadata
        assert fused_meta["neuroglancer"].value == uploaded_meta["neuroglancer"].value
        assert f"/data/acquisition/{truth.montage_id}/montage.ome.zarr/" in fused_meta["neuroglancer"].value
    assert journal.qc_statuses(truth.montage_id) == [("GOOD", None)]

    # uploaded to the storage root, verified, recorded; the buffer freed
    archived = platform.data_root / "acquisition" / truth.montage_id
    assert (archived / "upload-manifest.json").is_file()
    assert verify_upload(str(archived)).ok
    assert len(list(zarr.open_group(str(archived / "processed_tiles.zarr"), mode="r").array_keys())) == 12
    fused = zarr.open_group(str(archived / "montage.ome.zarr"), mode="r")
    ms = fused.attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [cfg.pixel_size_nm] * 2
    step = cfg.tile_size - cfg.overlap_px
    height, width = fused["0"].shape
    assert abs(height - (2 * step + cfg.tile_size)) <= 2 * cfg.jitter_px + 2
    assert abs(width - (3 * step + cfg.tile_size)) <= 2 * cfg.jitter_px + 2
    buffer = Path(platform.settings.buffer) / truth.montage_id
    assert not [p for p in buffer.rglob("*") if p.is_file()], "the buffer still holds uploaded files"

    records = TileRecords(platform.settings.catalog_url).montage_tiles(truth.montage_id)
    assert len(records) == 12 and all(r.image_uri.startswith(str(archived)) for r in records)
    assert all(r.focus_score is not None and r.matcher is not None for r in records)
    record = CatalogDB(platform.settings.catalog_url).find("acquisition", truth.montage_id)
    assert record["status"] == "complete"
    validate_record(record)
    assert record["metadata"]["core"]["volume_shape"] == [height, width]
    assert record["files"]["volume"] == str(archived / "montage.ome.zarr")


def test_failed_montage_is_blocked_by_its_checks(platform, tmp_path):
    journal = Journal(platform.settings.catalog_url)
    cfg = ScopeConfig(rows=3, columns=4, overlap=0.15, jitter_px=8.0, faults=("defocus:4-7",))
    truth = simulate_montage(cfg, tmp_path / "tiles", journal.record, sleep=lambda s: None)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", [truth.montage_id])
        result = _run(platform, instance, truth.montage_id)
        evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert evaluations["focus"] is False and evaluations["blank_tiles"] is True
        assert not result.success  # a failed blocking check fails the run: nothing downstream runs
        keys = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert keys == ACQUISITION - {"tile_stats"}  # the asset whose blocking check failed is not green
        status = instance.get_status_by_partition(dg.AssetKey("tile_stats"), [truth.montage_id], montages)
        assert status == {truth.montage_id: dg.AssetPartitionStatus.FAILED}
    assert CatalogDB(platform.settings.catalog_url).find("acquisition", truth.montage_id) is None
    assert journal.qc_statuses(truth.montage_id)[-1][0] == "STOP_AT_END"


def test_tiles_are_judged_while_the_montage_is_still_being_acquired(platform, tmp_path):
    journal = Journal(platform.settings.catalog_url)
    cfg = ScopeConfig(rows=3, columns=4, overlap=0.15, jitter_px=8.0, rate=6.0)
    started = threading.Event()

    def emit(topic, payload):
        if topic == "montage.complete":
            # the scope holds the montage open until a verdict arrives (or gives up after 60 s): a run that
            # judged tiles only after montage.complete would leave no verdict before it
            deadline = time.monotonic() + 60
            while not journal.messages("qc.tile", payload["montage_id"]) and time.monotonic() < deadline:
                time.sleep(0.05)
        journal.record(topic, payload)
        started.set()

    scope = threading.Thread(target=simulate_montage, args=(cfg, tmp_path / "tiles", emit), daemon=True)
    scope.start()
    assert started.wait(30)
    montage_id = journal.montages_after(0)[0].montage_id
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", [montage_id])
        result = _run(platform, instance, montage_id)
    scope.join(60)
    assert result.success
    topics = [m["topic"] for m in journal.messages(montage_id=montage_id)]
    assert "qc.tile" in topics[: topics.index("montage.complete")], (
        "no verdict was sent before the montage completed"
    )


def test_a_montage_the_scope_cancelled_is_cleaned_up_not_stitched(platform, tmp_path):
    journal = Journal(platform.settings.catalog_url)
    cfg = ScopeConfig(rows=3, columns=4, overlap=0.15, jitter_px=8.0)
    taken = []

    def emit(topic, payload):
        journal.record(topic, payload)
        taken.append(topic)

    # QC (played here) stops the scope after 5 tiles: the montage ends "cancelled"
    truth = simulate_montage(
        cfg,
        tmp_path / "tiles",
        emit,
        sleep=lambda s: None,
        qc_status=lambda: ("STOP_NOW", "test") if taken.count("tile.raw") >= 5 else None,
    )
    assert journal.montage(truth.montage_id).state == "cancelled"
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", [truth.montage_id])
        result = _run(platform, instance, truth.montage_id)
        evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert evaluations["acquisition_complete"] is False
        keys = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert keys == ACQUISITION - {
            "raw_tiles"
        }  # not the cancelled manifest; nothing stitched, fused, uploaded
    buffer = Path(platform.settings.buffer) / truth.montage_id
    assert not buffer.exists() or not [p for p in buffer.rglob("*") if p.is_file()]
    assert not (platform.data_root / "acquisition" / truth.montage_id).exists()


def test_montage_uploaded_to_s3(tmp_path, s3_endpoint, s3_bucket):
    """Production shape: storage root on S3 (moto server on loopback, via s3fs), buffer and catalog local."""
    import s3fs

    root, opts = s3_bucket
    platform = make_platform(
        tmp_path,
        data_root=f"{root}/em",
        catalog_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}",
        extra_env={"EM_S3_ENDPOINT_URL": s3_endpoint, "EM_BUFFER": str(tmp_path / "buffer")},
    )
    journal = Journal(platform.settings.catalog_url)
    cfg = ScopeConfig(rows=2, columns=3, overlap=0.15, jitter_px=8.0)
    truth = simulate_montage(cfg, tmp_path / "tiles", journal.record, sleep=lambda s: None)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", [truth.montage_id])
        result = _run(platform, instance, truth.montage_id)
        assert result.success
    dest = f"{root}/em/acquisition/{truth.montage_id}"
    audit = verify_upload(dest, storage_options=opts)
    assert audit.ok and audit.objects_checked > 6
    fs = s3fs.S3FileSystem(**opts)
    assert fs.exists(f"{dest}/montage.ome.zarr/zarr.json")
    record = CatalogDB(platform.settings.catalog_url).find("acquisition", truth.montage_id)
    assert record["status"] == "complete" and record["files"]["volume"] == f"{dest}/montage.ome.zarr"
    tiles = TileRecords(platform.settings.catalog_url).montage_tiles(truth.montage_id)
    assert len(tiles) == 6 and all(t.image_uri.startswith(f"{dest}/processed_tiles.zarr/") for t in tiles)
    assert not [p for p in (tmp_path / "buffer" / truth.montage_id).rglob("*") if p.is_file()]
