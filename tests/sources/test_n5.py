"""The N5 reader against N5 written by tensorstore (a well-kept N5 writer), plus blocks laid out by hand the way
the N5 Java library writes edge blocks (smaller than blockSize) and varlength (mode 1) headers, per the spec."""

from __future__ import annotations

import json
import struct

import fsspec
import numcodecs
import numpy as np
import pytest

from em_platform.formats import FormatError
from em_platform.sources import n5

ts = pytest.importorskip("tensorstore", reason="tensorstore writes the N5 test data")

SHAPE = (11, 19, 23)  # z, y, x: no axis a multiple of the block size, so every axis has an edge block
BLOCK = (4, 8, 6)


def _data(dtype) -> np.ndarray:
    rng = np.random.default_rng(5)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=SHAPE, dtype=dtype, endpoint=True)


def _write(path, data: np.ndarray, compression: dict, block=BLOCK) -> None:
    store = ts.open(
        {
            "driver": "n5",
            "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {
                "dimensions": list(reversed(data.shape)),
                "blockSize": list(reversed(block)),
                "dataType": data.dtype.name,
                "compression": compression,
            },
            "create": True,
            "delete_existing": True,
        }
    ).result()
    store[...] = data.transpose()  # tensorstore indexes in N5's own (x, y, z) order


@pytest.fixture
def fs():
    return fsspec.filesystem("file")


COMPRESSIONS = [
    {"type": "raw"},
    {"type": "gzip"},
    {"type": "gzip", "useZlib": True},
    {"type": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 2},
    {"type": "zstd", "level": 3},
    {"type": "bzip2"},
    {"type": "xz"},
]


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
@pytest.mark.parametrize("compression", COMPRESSIONS, ids=lambda c: "-".join(map(str, c.values())))
def test_tensorstore_n5_reads_back_voxel_for_voxel(tmp_path, fs, dtype, compression):
    data = _data(dtype)
    _write(tmp_path / "s0", data, compression)
    arr = n5.N5Array(fs, str(tmp_path / "s0"))
    assert arr.shape == SHAPE and arr.chunks == BLOCK and arr.dtype == np.dtype(dtype)
    assert arr.grid == (3, 3, 4)
    assert arr.compression["type"] == compression["type"]
    np.testing.assert_array_equal(arr.to_dask().compute(), data)
    # the far corner block: clipped to 3 × 3 × 5 voxels, its object named x first
    corner = arr.read_block((2, 2, 3))
    assert corner.shape == (3, 3, 5) and corner.dtype.isnative
    np.testing.assert_array_equal(corner, data[8:, 16:, 18:])
    assert arr.block_key((2, 2, 3)) == f"{tmp_path}/s0/3/2/2"


def test_the_dask_view_is_lazy_and_chunked_like_the_blocks(tmp_path, fs):
    data = _data(np.int16)
    _write(tmp_path / "a", data, {"type": "gzip"})
    arr = n5.N5Array(fs, str(tmp_path / "a"))
    view = arr.to_dask()
    assert view.chunks == ((4, 4, 3), (8, 8, 3), (6, 6, 6, 5))
    np.testing.assert_array_equal(view[5:9, 2:17, 20:].compute(), data[5:9, 2:17, 20:])


def test_a_block_never_written_reads_as_zero(tmp_path, fs):
    data = _data(np.int16)
    data[:4, :8, :6] = 0  # tensorstore does not store a block equal to the fill value
    _write(tmp_path / "a", data, {"type": "gzip"})
    assert not (tmp_path / "a" / "0" / "0" / "0").exists()
    arr = n5.N5Array(fs, str(tmp_path / "a"))
    assert arr.read_raw((0, 0, 0)) is None
    np.testing.assert_array_equal(arr.read_block((0, 0, 0)), np.zeros(BLOCK, np.int16))
    np.testing.assert_array_equal(arr.to_dask().compute(), data)


def _block_bytes(block_zyx: np.ndarray, codec=None, mode: int = 0) -> bytes:
    """A block object exactly as the N5 spec lays it out: big-endian header, then the big-endian payload."""
    dims = list(reversed(block_zyx.shape))
    header = struct.pack(f">HH{len(dims)}I", mode, len(dims), *dims)
    if mode == 1:
        header += struct.pack(">I", block_zyx.size)
    payload = block_zyx.astype(block_zyx.dtype.newbyteorder(">")).tobytes()  # C order of (z,y,x) = x fastest
    return header + (codec.encode(payload) if codec else payload)


def test_smaller_edge_blocks_and_varlength_headers_as_n5_java_writes_them(tmp_path, fs):
    data = _data(np.int16)
    root = tmp_path / "java"
    root.mkdir()
    attrs = {
        "dimensions": list(reversed(SHAPE)),
        "blockSize": list(reversed(BLOCK)),
        "dataType": "int16",
        "compression": {"type": "gzip", "level": -1},
    }
    (root / "attributes.json").write_text(json.dumps(attrs))
    for iz in range(3):
        for iy in range(3):
            for ix in range(4):
                block = data[iz * 4 : iz * 4 + 4, iy * 8 : iy * 8 + 8, ix * 6 : ix * 6 + 6]  # edge: smaller
                key = root / str(ix) / str(iy) / str(iz)
                key.parent.mkdir(parents=True, exist_ok=True)
                key.write_bytes(_block_bytes(block, numcodecs.GZip(), mode=1 if (ix + iy) % 2 else 0))
    arr = n5.N5Array(fs, str(root))
    np.testing.assert_array_equal(arr.to_dask().compute(), data)
    assert arr.read_block((2, 2, 3)).shape == (3, 3, 5)


def test_a_corrupt_block_names_its_object(tmp_path, fs):
    _write(tmp_path / "a", _data(np.int16), {"type": "gzip"})
    (tmp_path / "a" / "1" / "2" / "0").write_bytes(b"\x00\x00\x00\x03garbage")
    arr = n5.N5Array(fs, str(tmp_path / "a"))
    with pytest.raises(FormatError, match=r"a/1/2/0: N5 block cannot be decoded"):
        arr.read_block((0, 2, 1))
    np.testing.assert_array_equal(arr.read_block((0, 0, 0)), _data(np.int16)[:4, :8, :6])


def test_a_block_smaller_than_its_region_is_refused(tmp_path, fs):
    data = _data(np.int16)
    _write(tmp_path / "a", data, {"type": "raw"})
    (tmp_path / "a" / "0" / "0" / "0").write_bytes(_block_bytes(data[:2, :8, :6]))  # 2 of 4 slices
    with pytest.raises(FormatError, match=r"holds \(2, 8, 6\) voxels.*expected \(4, 8, 6\)"):
        n5.N5Array(fs, str(tmp_path / "a")).read_block((0, 0, 0))


def test_bad_headers_say_what_is_wrong(tmp_path, fs):
    with pytest.raises(FileNotFoundError, match="no N5 array here"):
        n5.N5Array(fs, str(tmp_path / "nothing"))
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "attributes.json").write_text(json.dumps({"n5": "2.5.1", "scales": [[1, 1, 1]]}))
    with pytest.raises(FormatError, match="an N5 group, not an array"):
        n5.N5Array(fs, str(tmp_path / "group"))
    (tmp_path / "lz4").mkdir()
    (tmp_path / "lz4" / "attributes.json").write_text(
        json.dumps({"dimensions": [4], "blockSize": [4], "dataType": "uint8", "compression": {"type": "lz4"}})
    )
    with pytest.raises(FormatError, match="N5 compression 'lz4' is not supported"):
        n5.N5Array(fs, str(tmp_path / "lz4"))
    with pytest.raises(IndexError, match="outside the grid"):
        _write(tmp_path / "ok", _data(np.uint8), {"type": "raw"})
        n5.N5Array(fs, str(tmp_path / "ok")).read_block((3, 0, 0))


# COSEM/OpenOrganelle multiscale metadata, in each of the forms its N5 containers carry
TRANSFORM = {
    "axes": ["z", "y", "x"],
    "scale": [5.92, 8.0, 8.0],
    "translate": [1.48, 2.0, 2.0],
    "units": ["nm"] * 3,
}


def test_voxel_size_from_the_array_transform_and_pixel_resolution():
    assert n5.level_voxel_size_nm({"transform": TRANSFORM}, {}, "s1", "x") == {"z": 5.92, "y": 8.0, "x": 8.0}
    pr = {"pixelResolution": {"dimensions": [0.004, 0.004, 0.00296], "unit": "um"}}
    assert n5.level_voxel_size_nm(pr, {}, "s0", "x") == pytest.approx({"x": 4.0, "y": 4.0, "z": 2.96})
    assert n5.level_voxel_size_nm({"pixelResolution": [4, 4, 2.96]}, {}, "s0", "x") == {
        "x": 4.0,
        "y": 4.0,
        "z": 2.96,
    }


def test_voxel_size_from_the_group_multiscales_and_neuroglancer_scales():
    group = {"multiscales": [{"name": "em", "datasets": [{"path": "s0", "transform": TRANSFORM}]}]}
    assert n5.level_voxel_size_nm({}, group, "s0", "x") == {"z": 5.92, "y": 8.0, "x": 8.0}
    neuroglancer = {
        "axes": ["x", "y", "z"],
        "units": ["nm", "nm", "nm"],
        "scales": [[1, 1, 1], [2, 2, 2], [4, 4, 4]],
        "pixelResolution": {"dimensions": [4.0, 4.0, 2.96], "unit": "nm"},
    }
    assert n5.level_voxel_size_nm({}, neuroglancer, "s2", "x") == pytest.approx(
        {"x": 16, "y": 16, "z": 11.84}
    )
    assert n5.level_voxel_size_nm({}, {}, "s0", "x") is None
    with pytest.raises(FormatError, match="unknown unit 'furlong'"):
        n5.level_voxel_size_nm({"transform": {**TRANSFORM, "units": ["furlong"] * 3}}, {}, "s0", "here")
