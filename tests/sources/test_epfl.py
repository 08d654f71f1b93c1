"""EPFL through the whole public-ingest pipeline, against a loopback HTTP server holding a real multi-page TIFF:
a complete record and equal voxels, an unchanged re-check, a pinned checksum that does not match, a truncated
TIFF, a 404, and a re-run that resumes a download a failed run left behind."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from em_platform.catalog.db import CatalogDB
from em_platform.ingest.public import PublicIngestError, ingest_public_dataset
from em_platform.samples import em_texture
from em_platform.sources.epfl import EpflEndpoints, make_source
from em_platform.storage import DataStore

LOG = logging.getLogger("tests.sources.epfl")
KEY = "hippocampus-ca1"


@pytest.fixture
def stack(http_files):
    vol = em_texture((40, 160, 256), seed=3, dtype=np.uint8)  # 1.6 MB: two 1 MiB parts
    path = http_files.root / "volumedata.tif"
    tifffile.imwrite(path, vol)  # like CVLab's file: pages = z, no physical size
    return vol, path


@pytest.fixture
def env(tmp_path):
    db = CatalogDB(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    yield DataStore(str(tmp_path / "data")), db, tmp_path / "downloads"
    db.dispose()


def _endpoints(http_files, **kw) -> EpflEndpoints:
    settings = {"parallel": 2, "part_mib": 1, "retry_base_delay_s": 0.01, **kw}
    return EpflEndpoints(file_url=http_files.url_for("volumedata.tif"), **settings)


def _ingest(source, env, **kw):
    store, db, downloads = env
    return ingest_public_dataset(
        source,
        store=store,
        catalog=db,
        downloads=downloads,
        lineage={"run_id": "r1", "asset_key": "ingest/epfl", "partition_key": KEY},
        logger=LOG,
        **kw,
    )


def test_epfl_ingests_to_ome_zarr_with_a_complete_record(stack, env, http_files):
    vol, path = stack
    result = _ingest(make_source(KEY, _endpoints(http_files)), env)
    rec = result.record
    assert result.converted and rec["status"] == "complete"
    np.testing.assert_array_equal(zarr.open_group(result.volume_url, mode="r")["0"][...], vol)
    core = rec["metadata"]["core"]
    assert core["volume_shape"] == [40, 160, 256] and core["data_type"] == "uint8"
    assert core["voxel_size_nm"] == {"z": 5.0, "y": 5.0, "x": 5.0} and core["voxel_size_source"] == "source"
    import hashlib

    assert rec["files"]["source"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rec["metadata"]["provenance"]["download_url"] == http_files.url_for("volumedata.tif")
    assert not (env[2] / "epfl").exists() or not any((env[2] / "epfl").iterdir())

    n = len(http_files.requests_for("volumedata.tif"))
    again = _ingest(make_source(KEY, _endpoints(http_files)), env)
    assert not again.converted and len(http_files.requests_for("volumedata.tif")) == n  # HEAD only


def test_a_checksum_mismatch_fails_and_publishes_nothing(stack, env, http_files):
    with pytest.raises(PublicIngestError, match="sha256"):
        _ingest(make_source(KEY, _endpoints(http_files, sha256="ab" * 32)), env)
    store, db, _ = env
    rec = db.find("epfl", KEY)
    assert rec["status"] == "failed" and "ChecksumMismatch" in rec["error"]["message"]
    assert not store.exists(store.path("ingest", "epfl", f"{KEY}.ome.zarr"))


def test_a_truncated_tiff_fails_naming_the_file(stack, env, http_files):
    _, path = stack
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PublicIngestError, match="volumedata.tif"):
        _ingest(make_source(KEY, _endpoints(http_files)), env)
    store, db, _ = env
    assert db.find("epfl", KEY)["status"] == "failed"
    assert not store.exists(store.path("ingest", "epfl", f"{KEY}.ome.zarr"))


def test_a_404_fails_the_record_naming_the_url(env, http_files):
    with pytest.raises(PublicIngestError, match="404"):
        _ingest(make_source(KEY, _endpoints(http_files)), env)
    rec = env[1].find("epfl", KEY)
    assert rec["status"] == "failed" and http_files.url_for("volumedata.tif") in rec["error"]["message"]
    assert rec["error"]["retry_count"] == 1


def test_a_rerun_resumes_what_a_failed_run_downloaded(stack, env, http_files):
    vol, path = stack
    size = path.stat().st_size
    # the link breaks for good after the first part: the run fails, the finished part stays on disk
    http_files.drop_next("volumedata.tif", after_bytes=1000, n=1000, skip=1)
    endpoints = EpflEndpoints(
        file_url=http_files.url_for("volumedata.tif"),
        parallel=2,
        part_mib=1,
        retry_attempts=2,
        retry_base_delay_s=0.01,
    )
    assert size > 2**20  # more than one part
    with pytest.raises(PublicIngestError, match="re-run resumes"):
        _ingest(make_source(KEY, endpoints), env)
    http_files.clear_faults()
    before = len(http_files.log)
    result = _ingest(make_source(KEY, endpoints), env)
    assert result.record["status"] == "complete" and result.record["error"]["retry_count"] == 1
    ranges = [r.range for r in http_files.log[before:] if r.method == "GET"]
    assert len(ranges) == 1  # only the part that had not finished
    np.testing.assert_array_equal(zarr.open_group(result.volume_url, mode="r")["0"][...], vol)


def test_bad_endpoints_name_the_field():
    with pytest.raises(ValueError, match="file_url"):
        EpflEndpoints(file_url="documents.epfl.ch/volumedata.tif").validate()
    with pytest.raises(ValueError, match="sha256"):
        EpflEndpoints(sha256="xyz").validate()
    with pytest.raises(ValueError, match="known: hippocampus-ca1"):
        make_source("ca3")


@pytest.mark.parametrize("parallel", [1, 2])
def test_pages_are_converted_while_the_rest_of_the_file_is_still_downloading(http_files, env, parallel):
    """The server holds the file's second half back until the first slab of the image is on disk: that can
    only happen if the conversion reads pages as they arrive; then the whole ingest completes, bit-exact."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    vol = em_texture((160, 96, 128), seed=9, dtype=np.uint8)  # 64-page chunks along z: 3 of them
    path = http_files.root / "volumedata.tif"
    tifffile.imwrite(path, vol)
    with tifffile.TiffFile(path) as tf:
        first_page = tf.series[0].dataoffset
    release = http_files.hold_from("/volumedata.tif", first_page + 100 * 96 * 128)  # pages 100.. held back
    store, _, _ = env
    source = make_source(KEY, _endpoints(http_files, parallel=parallel))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_ingest, source, env)
        staging = store.path(".staging")
        deadline = time.monotonic() + 60
        first_chunk = None
        while first_chunk is None and time.monotonic() < deadline and not running.done():
            found = list(Path(staging).glob("*/*.ome.zarr/0/c/0/0/0")) if Path(staging).exists() else []
            first_chunk = found[0] if found else None
            if first_chunk is None:
                threading.Event().wait(0.05)  # polling the file system for the condition, with a deadline
        held = not release.is_set() and not running.done()
        release.set()
        result = running.result(timeout=120)
    assert first_chunk is not None and held, "no level-0 chunk was written while the download was held"
    np.testing.assert_array_equal(zarr.open_group(result.volume_url, mode="r")["0"][...], vol)
    rec = result.record
    assert rec["status"] == "complete" and rec["files"]["source"][0]["size_bytes"] == path.stat().st_size
    assert rec["metadata"]["technical"]["header"]["read_while_arriving"] is True


def test_a_download_that_fails_midway_fails_the_overlapped_conversion_and_resumes(stack, env, http_files):
    vol, path = stack
    http_files.drop_next("/volumedata.tif", after_bytes=300_000, n=20)  # more drops than retries
    source = make_source(KEY, _endpoints(http_files, parallel=1, retry_attempts=2))
    with pytest.raises(PublicIngestError, match="volumedata.tif"):
        _ingest(source, env)
    store, db, _ = env
    assert db.find("epfl", KEY)["status"] == "failed"
    assert not store.exists(store.path("ingest", "epfl", f"{KEY}.ome.zarr"))
    http_files.clear_faults()
    result = _ingest(source, env)
    np.testing.assert_array_equal(zarr.open_group(result.volume_url, mode="r")["0"][...], vol)
