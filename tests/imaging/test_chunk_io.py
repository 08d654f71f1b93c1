"""Direct chunk writes store exactly what zarr's own writer stores, and fall back to zarr where they may not."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from em_platform.imaging.chunk_io import _direct_target, write_region
from em_platform.imaging.ome_zarr import blosc_codec


def _pair(tmp_path, shape, chunks, dtype, compressors):
    make = lambda name: zarr.create_array(  # noqa: E731
        str(tmp_path / name), shape=shape, chunks=chunks, dtype=dtype, compressors=compressors, fill_value=0
    )
    return make("direct.zarr"), make("zarr.zarr")


def _chunk_files(root) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f != "zarr.json":
                path = os.path.join(folder, f)
                out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


@pytest.mark.parametrize("around_page_cache", [False, True])
@pytest.mark.parametrize(
    ("dtype", "compressors"),
    [
        ("uint8", "blosc"),
        ("uint16", "blosc"),
        ("int16", "blosc"),
        ("uint8", None),
        ("float32", BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")),
    ],
)
def test_chunk_files_are_the_bytes_zarr_writes(tmp_path, dtype, compressors, around_page_cache):
    shape, chunks = (70, 100, 90), (32, 64, 64)  # edge chunks on every axis
    if compressors == "blosc":
        compressors = blosc_codec(np.dtype(dtype))
    direct, plain = _pair(tmp_path, shape, chunks, dtype, compressors)
    assert _direct_target(direct) is not None
    rng = np.random.default_rng(1)
    data = (rng.normal(100, 20, shape)).clip(0, 250).astype(dtype)
    data[:32, :64, :64] = 0  # one chunk all fill value: not stored, as zarr does not store it
    for z in range(0, shape[0], 32):  # slabs of whole chunks, the last one ending at the array's edge
        write_region(direct, (z, 0, 0), data[z : z + 32], around_page_cache=around_page_cache)
        plain[z : z + 32] = data[z : z + 32]
    files = _chunk_files(tmp_path / "direct.zarr")
    assert files == _chunk_files(tmp_path / "zarr.zarr")
    assert len(files) == 3 * 2 * 2 - 1
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "direct.zarr"))[...], data)


def test_a_region_that_is_not_whole_chunks_goes_through_zarr(tmp_path):
    direct, _ = _pair(tmp_path, (100, 100), (32, 32), "uint8", blosc_codec(np.dtype("uint8")))
    direct[...] = 7
    write_region(direct, (10, 0), np.full((20, 100), 9, np.uint8))  # starts off the grid
    write_region(direct, (32, 0), np.full((16, 100), 5, np.uint8))  # ends off the grid, inside the array
    got = direct[...]
    assert (got[:10] == 7).all() and (got[10:30] == 9).all() and (got[30:32] == 7).all()
    assert (got[32:48] == 5).all() and (got[48:] == 7).all()


def test_an_all_fill_chunk_written_over_data_removes_its_file(tmp_path):
    direct, _ = _pair(tmp_path, (64, 64), (32, 32), "uint16", blosc_codec(np.dtype("uint16")))
    write_region(direct, (0, 0), np.ones((64, 64), np.uint16))
    write_region(direct, (0, 0), np.zeros((32, 64), np.uint16))
    assert len(_chunk_files(tmp_path / "direct.zarr")) == 2
    np.testing.assert_array_equal(direct[...], np.r_[np.zeros((32, 64)), np.ones((32, 64))])


def test_object_stores_and_sharded_arrays_take_zarrs_path(tmp_path):
    sharded = zarr.create_array(
        str(tmp_path / "s.zarr"), shape=(64, 64), chunks=(16, 16), shards=(32, 32), dtype="uint8"
    )
    memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(64, 64), chunks=(32, 32), dtype="uint8")
    for arr in (sharded, memory):
        assert _direct_target(arr) is None
        write_region(arr, (0, 0), np.full((64, 64), 3, np.uint8))
        assert (arr[...] == 3).all()
