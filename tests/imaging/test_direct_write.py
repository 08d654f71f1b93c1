"""Files written around the page cache hold exactly the bytes given, whatever their length, and fall back
to an ordinary write where the file system refuses O_DIRECT."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import zarr

from em_platform.imaging import direct_write
from em_platform.imaging.chunk_io import write_region, write_shard_file
from em_platform.imaging.direct_write import ALIGN, give_back, take_buffer, write_file


@pytest.mark.parametrize("nbytes", [1, ALIGN - 1, ALIGN, ALIGN + 1, 1_000_000, 3 * ALIGN])
def test_a_file_holds_the_bytes_written_whatever_its_length(tmp_path, nbytes):
    buffer = take_buffer(nbytes)
    try:
        data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
        buffer.bytes[:nbytes] = data
        path = tmp_path / "chunk"
        path.write_bytes(
            b"x" * (2 * nbytes + 10)
        )  # an older, longer file is replaced, not overwritten in part
        went_direct = write_file(str(path), buffer, nbytes)
        assert path.read_bytes() == data.tobytes()
        assert not went_direct or nbytes >= ALIGN  # less than a block always goes through the page cache
    finally:
        give_back(buffer)


def test_buffers_are_page_aligned_and_kept_for_the_next_file():
    first = take_buffer(10_000)
    assert first.bytes.ctypes.data % ALIGN == 0 and first.capacity % ALIGN == 0 and first.capacity >= 10_000
    give_back(first)
    again = take_buffer(5_000)
    assert again is first  # large enough: reused, no new memory to fault in
    give_back(again)


def test_a_file_system_that_refuses_o_direct_gets_an_ordinary_write(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_write.os, "open", refusing)
    buffer = take_buffer(3 * ALIGN + 5)
    try:
        buffer.bytes[: 3 * ALIGN + 5] = 7
        assert write_file(str(tmp_path / "f"), buffer, 3 * ALIGN + 5) is False
        assert (tmp_path / "f").read_bytes() == b"\x07" * (3 * ALIGN + 5)
    finally:
        give_back(buffer)


def test_other_errors_are_raised(tmp_path):
    buffer = take_buffer(ALIGN)
    try:
        with pytest.raises(FileNotFoundError):
            write_file(str(tmp_path / "missing" / "f"), buffer, ALIGN)
    finally:
        give_back(buffer)


@pytest.mark.parametrize(("shape", "chunks"), [((5000, 3000), (1000, 1000)), ((33, 70), (16, 32))])
def test_unaligned_chunks_written_around_the_page_cache_read_back(tmp_path, shape, chunks):
    """1000 x 1000 uint8 chunks (a stored tile's) are not a whole number of blocks: head direct, tail buffered."""
    data = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    ours = zarr.create_array(
        str(tmp_path / "a.zarr"), shape=shape, chunks=chunks, dtype="uint8", compressors=None
    )
    write_region(ours, (0, 0), data, around_page_cache=True)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[...], data)


@pytest.mark.parametrize("around_page_cache", [True, False])
@pytest.mark.parametrize(
    ("shape", "chunks"), [((5000, 3000), (1000, 1000)), ((33, 70), (16, 32)), ((3, 3), (3, 3))]
)
def test_a_whole_array_written_as_one_shard_reads_back(tmp_path, shape, chunks, around_page_cache):
    """Inner chunks that do not reach the edge evenly (33 x 70 in 16 x 32) are padded in the shard."""
    data = np.random.default_rng(4).integers(0, 65536, shape, dtype=np.uint16)
    data[: shape[0] // 2] = 0  # all-fill inner chunks are stored too
    shard = tuple(-(-n // c) * c for n, c in zip(shape, chunks, strict=True))
    ours = zarr.create_array(
        str(tmp_path / "a.zarr"), shape=shape, chunks=chunks, shards=shard, dtype="uint16", compressors=None
    )
    write_shard_file(str(tmp_path / "a.zarr"), ours.metadata, data, around_page_cache=around_page_cache)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[...], data)
    inner = np.prod(chunks) * 2
    n_inner = np.prod([s // c for s, c in zip(shard, chunks, strict=True)])
    assert (tmp_path / "a.zarr" / "c" / "0" / "0").stat().st_size == n_inner * (inner + 16) + 4


def test_layouts_one_shard_file_cannot_hold_go_to_zarr(tmp_path):
    data = np.zeros((64, 64), np.uint8)
    for name, layout in {
        "compressed inner chunks": dict(chunks=(32, 32), shards=(64, 64)),  # zarr's default compressor
        "several shards": dict(chunks=(16, 16), shards=(32, 32), compressors=None),
        "no shards": dict(chunks=(32, 32), compressors=None),
    }.items():
        arr = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=data.shape, dtype="uint8", **layout)
        with pytest.raises(ValueError, match="use zarr"):
            write_shard_file(str(tmp_path / f"{name}.zarr"), arr.metadata, data)
