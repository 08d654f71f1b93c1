"""Atomic publish on a local folder and on a real S3 endpoint (moto server on loopback, via s3fs)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from em_platform.storage import DataStore


def _write_zarr(store: DataStore, path: str, value: int) -> None:
    arr = zarr.create_array(
        store.to_url(path),
        shape=(8, 8),
        chunks=(4, 4),
        dtype="u2",
        overwrite=True,
        storage_options=None if store.is_local else store.storage_options,
    )
    arr[...] = value


def _read(store: DataStore, path: str) -> np.ndarray:
    return zarr.open_array(
        store.to_url(path), mode="r", storage_options=None if store.is_local else store.storage_options
    )[...]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return DataStore(str(tmp_path / "root"))
    url, opts = request.getfixturevalue("s3_bucket")
    return DataStore(f"{url}/root", opts)


def test_publish_makes_complete_tree_appear_and_cleans_staging(store):
    final = store.path("ingest", "x.zarr")
    staging = store.staging_path(final)
    _write_zarr(store, staging, 7)
    assert not store.exists(final)
    store.publish(staging, final)
    assert (_read(store, final) == 7).all()
    assert not store.exists(staging)


def test_publish_replaces_an_older_version(store):
    final = store.path("ingest", "y.zarr")
    for value in (1, 2):
        staging = store.staging_path(final)
        _write_zarr(store, staging, value)
        store.publish(staging, final)
    assert (_read(store, final) == 2).all()


def test_small_files_are_written_atomically(store):
    store.write_json(store.path("catalog", "a.json"), {"n": 1})
    assert store.read_json(store.path("catalog", "a.json")) == {"n": 1}
    assert not store.exists(store.path(".staging")) or not store.fs.ls(store.path(".staging"))


def test_staged_image_is_not_openable_at_its_final_name_until_published(store):
    final = store.path("z.zarr")
    staging = store.staging_path(final)
    _write_zarr(store, staging, 3)
    with pytest.raises(FileNotFoundError):
        zarr.open_array(
            store.to_url(final), mode="r", storage_options=None if store.is_local else store.storage_options
        )


def test_empty_root_is_a_config_error():
    with pytest.raises(ValueError, match="EM_DATA_ROOT"):
        DataStore("")
