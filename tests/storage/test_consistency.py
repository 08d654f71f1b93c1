"""Complete catalog records against the storage root (local folder and a real S3 endpoint): a consistent
store passes; a deleted object and a corrupted one each fail, named by record and object."""

from __future__ import annotations

import posixpath
from pathlib import Path

import numpy as np
import pytest
import zarr

from em_platform.storage import DataStore
from em_platform.storage.consistency import check_consistency
from em_platform.storage.upload import upload_buffer


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> DataStore:
    if request.param == "local":
        return DataStore(str(tmp_path / "root"))
    bucket_url, opts = request.getfixturevalue("s3_bucket")
    return DataStore(f"{bucket_url}/em", opts)


def _montage(store: DataStore, tmp_path: Path) -> dict:
    """An archived montage as montage_upload leaves it: its buffer uploaded with the manifest, its record."""
    buffer = tmp_path / "buffer" / "m1"
    group = zarr.open_group(str(buffer / "montage.ome.zarr"), mode="w")
    group.create_array("0", data=np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), chunks=(32, 32))
    (buffer / "layout.json").write_text('{"tiles": 4}')
    base = store.url("acquisition", "m1")
    upload_buffer(buffer, base, storage_options=store.storage_options or None)
    return {
        "id": "00000000-0000-4000-8000-000000000001",
        "source": "acquisition",
        "source_id": "m1",
        "status": "complete",
        "files": {
            "source": [],
            "volume": f"{base}/montage.ome.zarr",
            "additional": {"layout": f"{base}/layout.json"},
        },
        "metadata": {"ome_zarr": {"levels": [{"path": "0"}]}},
    }


def _ingest(store: DataStore) -> dict:
    """An ingest's outputs: an OME-Zarr image and its thumbnail; checksums only of its source files."""
    volume = store.url("ingest", "local", "cells.ome.zarr")
    group = zarr.open_group(volume, mode="w", storage_options=store.storage_options or None)
    for level, n in (("0", 32), ("1", 16)):
        group.create_array(level, data=np.ones((n, n), np.uint8))
    store.write_bytes(store.path("ingest", "local", "cells.thumbnail.png"), b"\x89PNG fake thumbnail")
    return {
        "id": "00000000-0000-4000-8000-000000000002",
        "source": "local",
        "source_id": "cells.tif",
        "status": "complete",
        "files": {
            "source": [{"path": "cells.tif", "size_bytes": 3, "sha256": "0" * 64}],
            "volume": volume,
            "thumbnail": store.url("ingest", "local", "cells.thumbnail.png"),
        },
        "metadata": {"ome_zarr": {"levels": [{"path": "0"}, {"path": "1"}]}},
    }


def test_a_consistent_store_passes_and_says_what_only_presence_covers(store, tmp_path):
    records = [_montage(store, tmp_path), _ingest(store), {"status": "failed", "files": {"volume": "/gone"}}]
    report = check_consistency(records, store)
    assert report.ok, report.summary()
    assert [a.name for a in report.audits] == ["acquisition/m1", "local/cells.tif"]  # complete ones only
    montage, ingest = report.audits
    assert montage.checksummed == montage.objects - 2 > 0  # every manifest entry; the two named ones present
    assert report.presence_only == ["local/cells.tif"] and ingest.objects == 2


def test_a_deleted_object_fails_the_check_by_name(store, tmp_path):
    records = [_montage(store, tmp_path), _ingest(store)]
    store.fs.rm(store.path("ingest", "local", "cells.thumbnail.png"))
    store.fs.rm(store.path("ingest", "local", "cells.ome.zarr", "1"), recursive=True)  # a pyramid level
    store.fs.rm(store.path("acquisition", "m1", "layout.json"))
    store.fs.invalidate_cache()
    report = check_consistency(records, store)
    assert not report.ok
    lost = {a.name: set(a.missing) for a in report.problems}
    assert lost == {
        "local/cells.tif": {
            store.url("ingest", "local", "cells.thumbnail.png"),
            store.url("ingest", "local", "cells.ome.zarr"),
        },
        "acquisition/m1": {store.url("acquisition", "m1", "layout.json")},
    }
    assert "acquisition/m1: missing" in report.summary() and "local/cells.tif: missing" in report.summary()


def test_a_corrupted_object_fails_the_check_by_name(store, tmp_path):
    record = _montage(store, tmp_path)
    chunk = next(p for p in store.fs.find(store.path("acquisition", "m1", "montage.ome.zarr")) if "/c/" in p)
    with store.fs.open(chunk, "rb") as f:
        data = bytearray(f.read())
    data[-1] ^= 0xFF  # same size, one byte flipped: only the checksum sees it
    store.fs.pipe_file(chunk, bytes(data))
    store.fs.invalidate_cache()
    report = check_consistency([record], store)
    assert [(a.name, a.corrupted, a.missing) for a in report.problems] == [
        ("acquisition/m1", (store.to_url(chunk),), ())
    ]
    assert posixpath.basename(chunk) in report.summary()
