"""The FlyEM source against DVID-like and neuPrint-like servers on 127.0.0.1 (tests/support/dvid_server.py)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import zarr

from em_platform.sources.dvid import DvidClient, DvidOptions, parse_bounds, parse_voxel_size
from em_platform.sources.flyem import (
    DATASETS,
    DVID_BLOCK,
    FlyemCrop,
    FlyemEndpoints,
    FlyemSource,
    crop_blocks,
    make_source,
)
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.retry import PermanentSourceError, RetryPolicy, SourceError, TransientSourceError
from tests.support.dvid_server import DvidServer, NeuprintServer

CROP = FlyemCrop((140, 70, 90), (100, 120, 130))  # 2 x 2 x 3 blocks of 64, edges clipped; 1.5 MB
LOG = logging.getLogger("test.flyem")


@pytest.fixture
def dvid():
    with DvidServer() as server:
        yield server


@pytest.fixture
def neuprint_server():
    with NeuprintServer(token="secret-token") as server:
        yield server


@pytest.fixture(autouse=True)
def _no_token(monkeypatch):
    monkeypatch.delenv("NEUPRINT_TOKEN", raising=False)


def endpoints(dvid: DvidServer, **kw) -> FlyemEndpoints:
    kw = {"block_size": 64, "parallel": 4, "retry_attempts": 3, "retry_base_delay_s": 0.01} | kw
    return FlyemEndpoints(dvid_server=dvid.url, **kw)


def run(source: FlyemSource, workdir: Path):
    version = source.check(LOG)
    manifest = DownloadManifest(workdir, version.fingerprint)
    return version, manifest, source.fetch(workdir, manifest, version, LOG)


def block_digests(dvid: DvidServer, crop: FlyemCrop, block: int) -> str:
    """sha256 over the per-block sha256s, computed from the server's own voxels."""
    lines = ""
    for b in crop_blocks(crop.size_zyx, block):
        absolute = tuple(o + s for o, s in zip(crop.offset_zyx, b.start, strict=True))
        lines += f"{hashlib.sha256(dvid.voxels(absolute, b.size).tobytes()).hexdigest()}  {b.key}\n"
    return hashlib.sha256(lines.encode()).hexdigest()


def test_crop_equals_the_servers_voxels(dvid, tmp_path):
    source = FlyemSource("test", CROP, endpoints(dvid))
    version, manifest, fetched = run(source, tmp_path)

    expected = dvid.voxels(CROP.offset_zyx, CROP.size_zyx)
    assert expected.std() > 10  # texture, not a constant that any bug would reproduce
    np.testing.assert_array_equal(fetched.volume.data.compute(), expected)
    assert fetched.volume.axes == ("z", "y", "x")
    assert fetched.volume.scale == (8.0, 8.0, 8.0) and fetched.volume.units == ("nanometer",) * 3
    assert fetched.voxel_size_source == "header" and fetched.modality == "FIB-SEM"

    # one fetch per block, no more; the cache has one chunk per block
    raws = dvid.raw_requests()
    assert len(raws) == len(set(raws)) == 12
    assert zarr.open_array(str(tmp_path / "grayscale.zarr"), mode="r").chunks == (64, 64, 64)
    assert len(manifest.entries()) == 12
    entry = manifest.get("z64_y64_x128")
    assert entry.size_bytes == 36 * 56 * 2 and entry.url.endswith("/raw/0_1_2/2_56_36/218_134_204")

    (f,) = fetched.files
    assert f.path == "grayscale/raw/0_1_2/130_120_100/90_70_140"
    assert f.url == source.crop_url == version.source_urls[0]
    assert f.size_bytes == expected.nbytes == version.total_bytes
    assert f.sha256 == block_digests(dvid, CROP, 64)

    meta = version.additional_metadata
    assert meta["dataset_bounds"] == {"min_zyx": [128, 0, 64], "max_zyx": [383, 255, 319]}
    assert meta["crop_origin_zyx"] == [140, 70, 90] and meta["crop_size_zyx"] == [100, 120, 130]
    assert meta["dvid_info_extended"]["BlockSize"] == [64, 64, 64]
    assert version.description == "Hemibrain grayscale crop z,y,x 140,70,90 of size 100,120,130 (FlyEM DVID)"
    assert source.source_id == "a89eb3af216a46cdba81204d8f954786:grayscale:test"


def test_anisotropic_voxels_come_out_in_zyx_order_and_missing_ones_fall_back_to_8nm(tmp_path):
    with DvidServer(voxel_size_xyz=(4.0, 5.0, 40.0)) as dvid:
        _, _, fetched = run(FlyemSource("t", CROP, endpoints(dvid)), tmp_path / "a")
        assert fetched.volume.scale == (40.0, 5.0, 4.0) and fetched.voxel_size_source == "header"

        info = dvid.info()
        del info["Extended"]["VoxelSize"]
        dvid.info_override = info
        _, _, fetched = run(FlyemSource("t", CROP, endpoints(dvid)), tmp_path / "b")
        assert fetched.volume.scale == (8.0, 8.0, 8.0) and fetched.voxel_size_source == "source"


def test_crop_outside_the_bounds_names_bounds_and_crop(dvid):
    crop = FlyemCrop((300, 200, 64), (100, 64, 64))  # z runs to 399, the volume to 383
    with pytest.raises(PermanentSourceError) as err:
        FlyemSource("far", crop, endpoints(dvid)).check(LOG)
    msg = str(err.value)
    assert "128,0,64 to 383,255,319" in msg and "300,200,64" in msg and "100,64,64" in msg
    assert "/info" in msg and dvid.raw_requests() == []


@pytest.mark.parametrize("fault", ["503", "drop", "short"])
def test_transient_faults_are_retried(dvid, tmp_path, caplog, fault):
    caplog.set_level(logging.WARNING)
    {"503": lambda: dvid.fail_next(2, 503), "drop": dvid.drop_next, "short": dvid.short_next}[fault]()
    _, manifest, fetched = run(FlyemSource("t", CROP, endpoints(dvid)), tmp_path)

    np.testing.assert_array_equal(fetched.volume.data.compute(), dvid.voxels(CROP.offset_zyx, CROP.size_zyx))
    retries = 2 if fault == "503" else 1
    assert len(dvid.raw_requests()) == 12 + retries
    assert sum("failed" in r.message and "try 2 of 3" in r.message for r in caplog.records) >= 1
    assert len(manifest.entries()) == 12


def test_short_body_every_time_is_a_clear_error(dvid, tmp_path):
    dvid.short_next(1000)
    source = FlyemSource("t", CROP, endpoints(dvid, parallel=1))
    with pytest.raises(TransientSourceError) as err:
        run(source, tmp_path)
    msg = str(err.value)
    assert "still failing after 3 tries" in msg and "/raw/0_1_2/64_64_64/90_70_140" in msg
    assert f"body of {64**3 - 1000} bytes, expected {64**3}" in msg


def test_a_run_killed_part_way_resumes_with_only_the_missing_blocks(dvid, tmp_path):
    source = FlyemSource("t", CROP, endpoints(dvid, parallel=3))
    version = source.check(LOG)
    dvid.fail_after(5, status=403)  # the run dies with a permanent error after 5 blocks
    with pytest.raises(PermanentSourceError, match=r"HTTP 403 .*raw/0_1_2"):
        source.fetch(tmp_path, DownloadManifest(tmp_path, version.fingerprint), version, LOG)
    first = set(dvid.raw_requests(ok_only=True))
    assert len(first) == 5

    dvid.clear_faults()
    mark = len(dvid.raw_requests())
    manifest = DownloadManifest(tmp_path, version.fingerprint)  # a new process reads the manifest from disk
    assert {tuple(e.extra["offset_zyx"]) for e in manifest.entries().values()} == {o for o, _ in first}
    fetched = FlyemSource("t", CROP, endpoints(dvid, parallel=3)).fetch(tmp_path, manifest, version, LOG)

    second = dvid.raw_requests()[mark:]
    assert len(second) == len(set(second)) == 12 - 5 and not first & set(second)
    np.testing.assert_array_equal(fetched.volume.data.compute(), dvid.voxels(CROP.offset_zyx, CROP.size_zyx))
    assert fetched.files[0].sha256 == block_digests(dvid, CROP, 64)


def test_a_changed_block_size_discards_the_cache(dvid, tmp_path, caplog):
    _, _, _ = run(FlyemSource("t", CROP, endpoints(dvid)), tmp_path)
    caplog.set_level(logging.WARNING)
    mark = len(dvid.raw_requests())
    _, manifest, fetched = run(FlyemSource("t", CROP, endpoints(dvid, block_size=128)), tmp_path)
    assert len(dvid.raw_requests()) - mark == 1 * 1 * 2  # 100x120x130 in 128 blocks
    assert any("discarding the download cache" in r.message for r in caplog.records)
    assert fetched.files[0].sha256 == block_digests(dvid, CROP, 128)
    np.testing.assert_array_equal(fetched.volume.data.compute(), dvid.voxels(CROP.offset_zyx, CROP.size_zyx))


def test_unknown_instance_is_permanent_and_names_the_url(dvid):
    source = FlyemSource("t", CROP, endpoints(dvid, instance="nosuch"))
    with pytest.raises(PermanentSourceError, match=r"HTTP 400 .*/api/node/a89eb3af.*/nosuch/info"):
        source.check(LOG)


def test_fingerprint_follows_the_instance_metadata_and_the_crop(dvid):
    fp = FlyemSource("t", CROP, endpoints(dvid)).check(LOG).fingerprint
    assert FlyemSource("t", CROP, endpoints(dvid)).check(LOG).fingerprint == fp
    other_crop = FlyemCrop((140, 70, 91), CROP.size_zyx)
    assert FlyemSource("t", other_crop, endpoints(dvid)).check(LOG).fingerprint != fp
    info = dvid.info()
    info["Extended"]["MaxPoint"][2] += 64  # the instance grew
    dvid.info_override = info
    assert FlyemSource("t", CROP, endpoints(dvid)).check(LOG).fingerprint != fp


# --- neuPrint -------------------------------------------------------------------------------------


def test_neuprint_metadata_is_recorded_with_a_token(dvid, neuprint_server, monkeypatch):
    monkeypatch.setenv("NEUPRINT_TOKEN", "secret-token")
    ep = endpoints(
        dvid, neuprint_server=neuprint_server.url, neuprint_ca_bundle=str(neuprint_server.ca_bundle)
    )
    np_meta = FlyemSource("t", CROP, ep).check(LOG).additional_metadata["neuprint"]
    assert np_meta["available"] is True and np_meta["dataset"] == "hemibrain:v1.2.1"
    assert np_meta["dataset_info"]["last-mod"] == "2020-12-28T10:11:12.000Z"
    assert np_meta["meta"]["totalPreCount"] == 9651269 and np_meta["meta"]["tag"] == "v1.2.1"
    assert "roiInfo" not in np_meta["meta"]  # megabytes on the real server
    paths = {(r.method, r.path) for r in neuprint_server.log}
    assert ("GET", "/api/dbmeta/datasets") in paths and ("POST", "/api/custom/custom") in paths


def test_without_a_token_neuprint_is_skipped_with_a_logged_reason(dvid, neuprint_server, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ep = endpoints(
        dvid, neuprint_server=neuprint_server.url, neuprint_ca_bundle=str(neuprint_server.ca_bundle)
    )
    version, _, fetched = run(FlyemSource("t", CROP, ep), tmp_path)
    np_meta = version.additional_metadata["neuprint"]
    assert np_meta["available"] is False and "NEUPRINT_TOKEN is not set" in np_meta["reason"]
    assert "meta" not in np_meta and neuprint_server.log == []
    assert any("NEUPRINT_TOKEN is not set" in r.message for r in caplog.records)
    assert fetched.files[0].size_bytes == CROP.size_zyx[0] * CROP.size_zyx[1] * CROP.size_zyx[2]


def test_a_failing_neuprint_does_not_fail_the_ingest(dvid, neuprint_server, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("NEUPRINT_TOKEN", "wrong-token")
    ep = endpoints(
        dvid, neuprint_server=neuprint_server.url, neuprint_ca_bundle=str(neuprint_server.ca_bundle)
    )
    version, _, fetched = run(FlyemSource("t", CROP, ep), tmp_path)
    np_meta = version.additional_metadata["neuprint"]
    assert np_meta["available"] is False and "401" in np_meta["reason"]
    assert "wrong-token" not in np_meta["reason"]
    assert any("neuPrint metadata" in r.message and "unavailable" in r.message for r in caplog.records)
    assert fetched.volume.data.shape == CROP.size_zyx


# --- bounds parsing, settings, datasets -------------------------------------------------------------


@pytest.mark.parametrize(
    "info",
    [
        {"Extended": {"MinPoint": [64, 0, 128], "MaxPoint": [319, 255, 383]}},  # DVID uint8blk (x,y,z)
        {"Extents": {"MinPoint": [64, 0, 128], "MaxPoint": [319, 255, 383]}, "Extended": {"MinPoint": None}},
        {"Extended": {"MinZyx": [128, 0, 64], "MaxZyx": [383, 255, 319]}},
        {"bounds": [[64, 0, 128], [320, 256, 384]]},  # start, exclusive stop (x,y,z)
    ],
    ids=["Extended.MinPoint", "Extents", "Extended.MinZyx", "bounds"],
)
def test_bounds_of_each_info_form(info):
    assert parse_bounds(info) == ((128, 0, 64), (383, 255, 319))


def test_extents_win_over_the_stale_extended_copy_and_no_bounds_is_an_error():
    info = {
        "Extents": {"MinPoint": [0, 0, 0], "MaxPoint": [9, 9, 9]},
        "Extended": {"MinPoint": [0, 0, 0], "MaxPoint": [5, 5, 5]},
    }
    assert parse_bounds(info) == ((0, 0, 0), (9, 9, 9))
    with pytest.raises(PermanentSourceError, match=r"http://x/info: the info JSON has no bounds"):
        parse_bounds({"Base": {}, "Extended": {"BlockSize": [64, 64, 64]}}, "http://x/info")


def test_voxel_size_parsing():
    ext = {"VoxelSize": [4, 5, 40], "VoxelUnits": ["nanometers"] * 3}
    assert parse_voxel_size({"Extended": ext}) == ((40.0, 5.0, 4.0), "nanometers")
    assert parse_voxel_size({"Extended": {"VoxelSize": [8, 8, 8]}}) is None  # no units: do not guess
    assert parse_voxel_size({"Extended": ext | {"VoxelUnits": ["nm", "nm", "um"]}}) is None


def test_dvid_client_info_and_raw(dvid):
    client = DvidClient(
        dvid.url, dvid.uuid, dvid.instance, DvidOptions(policy=RetryPolicy(base_delay_s=0.01))
    )
    assert client.bounds() == ((128, 0, 64), (383, 255, 319))
    box = client.raw((120, 250, 60), (10, 12, 14))  # straddles the volume's edge: zeros outside, as DVID
    np.testing.assert_array_equal(box, dvid.voxels((120, 250, 60), (10, 12, 14)))
    assert box[:8].max() == 0 and box[8:, 6:].max() == 0 and box[8:, :6, 4:].std() > 10


@pytest.mark.parametrize(
    "field,value",
    [
        ("dvid_server", "ftp://x"),
        ("uuid", "not-a-uuid"),
        ("block_size", 100),
        ("parallel", 0),
        ("retry_attempts", 0),
        ("neuprint_dataset", " "),
        ("read_timeout_s", 0),
    ],
)
def test_endpoint_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FlyemEndpoints(**{field: value}).validate()


def test_datasets_and_make_source():
    FlyemEndpoints().validate()
    for key, crop in DATASETS.items():
        assert all(v % DVID_BLOCK == 0 for v in crop.offset_zyx), key
        src = make_source(key)
        assert src.source_id == f"a89eb3af216a46cdba81204d8f954786:grayscale:{key}" and src.name == "flyem"
    assert DATASETS["hemibrain-center-1024"].size_zyx == (1024, 1024, 1024)
    with pytest.raises(ValueError, match="hemibrain-center-256"):
        make_source("nope")


def test_errors_are_source_errors(dvid, tmp_path):
    dvid.fail_next(100, 503)
    with pytest.raises(SourceError, match="still failing after 3 tries"):
        run(FlyemSource("t", CROP, endpoints(dvid, parallel=1)), tmp_path)


def test_a_pruned_chunk_is_fetched_again(dvid, tmp_path):
    version, _, _ = run(FlyemSource("t", CROP, endpoints(dvid)), tmp_path)
    (tmp_path / "grayscale.zarr" / "c" / "1" / "0" / "2").unlink()  # block z64_y0_x128
    mark = len(dvid.raw_requests())
    manifest = DownloadManifest(tmp_path, version.fingerprint)
    fetched = FlyemSource("t", CROP, endpoints(dvid)).fetch(tmp_path, manifest, version, LOG)
    assert dvid.raw_requests()[mark:] == [((140 + 64, 70, 90 + 128), (36, 64, 2))]
    np.testing.assert_array_equal(fetched.volume.data.compute(), dvid.voxels(CROP.offset_zyx, CROP.size_zyx))
