"""Image shapes from headers and sidecars are claims: positive, multiplied with exact integers (numpy's
fixed-width product wraps), and at most what the file holds. Crafted files that lie are refused at open with
a FormatError naming the file, the field and the bound, before any array is built over bytes that are not
there (and in bounded memory)."""

from __future__ import annotations

import json
import struct

import mrcfile
import numpy as np
import pytest
import tifffile

from em_platform.formats import FormatError, open_volume
from em_platform.formats.lazy import memmap_dask
from tests.support.memory import peak_memory

MiB = 2**20


def _mrc_header(path, nx: int, ny: int, nz: int) -> None:
    """A valid MRC file cut to its 1,024-byte header, then made to claim nx × ny × nz voxels."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.zeros((1, 1, 1), np.int8))
    header = bytearray(path.read_bytes()[:1024])
    struct.pack_into("<3i", header, 0, nx, ny, nz)
    path.write_bytes(bytes(header))


def test_a_1kib_mrc_claiming_2_to_the_64_voxels_is_refused(tmp_path):
    """2²¹ × 2²¹ × 2²² int8 voxels: numpy's int64 product is 0, so this file once passed as complete."""
    p = tmp_path / "huge.mrc"
    _mrc_header(p, 2**21, 2**21, 2**22)
    with pytest.raises(FormatError) as exc:
        open_volume(p)
    msg = str(exc.value)
    assert "huge.mrc" in msg and "nx=2097152" in msg and "nz=4194304" in msg
    assert "1024 bytes on disk" in msg and str(1024 + 2**64) in msg  # the bound (the file) and the claim


@pytest.mark.parametrize(
    "shape, says",
    [
        ([4194304, 2097152, 2097152], "16 bytes on disk"),  # 2⁶⁴ bytes: wraps to 0 in int64
        ([-4, -4], "positive whole numbers"),  # (-4)·(-4) = 16 = the file's size
        ([4.5, 2], "whole numbers"),  # int(4.5) × 2 = 8 ≤ 16 once passed
        ([0, 16], "positive whole numbers"),
    ],
)
def test_raw_sidecar_shapes_that_lie_are_refused(tmp_path, shape, says):
    p = tmp_path / "x.raw"
    p.write_bytes(bytes(16))
    (tmp_path / "x.raw.json").write_text(json.dumps({"shape": shape, "dtype": "uint8"}))
    with pytest.raises(FormatError) as exc:
        open_volume(p)
    assert "x.raw" in str(exc.value) and "sidecar x.raw.json" in str(exc.value) and says in str(exc.value)


def test_a_raw_sidecar_offset_past_the_data_is_refused(tmp_path):
    p = tmp_path / "x.raw"
    p.write_bytes(bytes(16))
    (tmp_path / "x.raw.json").write_text(json.dumps({"shape": [4, 4], "dtype": "uint8", "offset": -8}))
    with pytest.raises(FormatError, match="offset -8"):
        open_volume(p)


def test_memmap_dask_never_builds_an_array_over_bytes_that_are_not_there(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(bytes(1024))
    with pytest.raises(ValueError, match="1024 bytes on disk"):
        memmap_dask(p, 0, (2**21, 2**21, 2**22), np.int8)


def _tiff_claiming(path, width: int, height: int, **write) -> None:
    """An 8 × 8 one-strip TIFF whose ImageWidth, ImageLength and RowsPerStrip then claim width × height."""
    tifffile.imwrite(path, np.full((8, 8), 7, np.uint8), metadata=None, **write)
    with tifffile.TiffFile(path) as tf:
        offsets = {t.name: t.valueoffset for t in tf.pages[0].tags.values()}
    raw = bytearray(path.read_bytes())
    for name, value in (("ImageWidth", width), ("ImageLength", height), ("RowsPerStrip", height)):
        struct.pack_into("<I", raw, offsets[name], value)
    path.write_bytes(bytes(raw))


def test_an_uncompressed_tiff_page_larger_than_its_strips_is_refused(tmp_path):
    """10¹⁰ pixels over a 64-byte strip: reading it allocated 9.3 GiB before failing."""
    p = tmp_path / "liar.tif"
    _tiff_claiming(p, 100_000, 100_000)
    with pytest.raises(FormatError) as exc:
        open_volume(p)
    msg = str(exc.value)
    assert "liar.tif" in msg and "100000x100000" in msg and "ImageWidth" in msg and "only 64 bytes" in msg


def test_a_compressed_tiff_page_claiming_gigapixels_from_a_few_bytes_is_refused(tmp_path):
    p = tmp_path / "liar.tif"
    _tiff_claiming(p, 100_000, 100_000, compression="zlib")
    with pytest.raises(FormatError, match=r"liar\.tif.*100000x100000.*MAX_COMPRESSION_RATIO"):
        open_volume(p)


def test_a_well_compressed_tiff_page_is_still_read(tmp_path):
    """Far below the bound: 16 MiB of zeros in 16 KiB of deflate (1,000:1, deflate's ceiling)."""
    p = tmp_path / "blank.tif"
    tifffile.imwrite(p, np.zeros((4096, 4096), np.uint8), compression="zlib")
    assert open_volume(p).data.shape == (4096, 4096)


def test_ome_xml_declaring_more_planes_than_the_file_has_pages_is_refused(tmp_path):
    """tifffile listed each declared plane it could not find as a missing page: SizeZ=10⁹ cost 90 s and
    8 GB before the reader's own checks; now the declaration is checked against the pages first."""
    p = tmp_path / "a.ome.tif"
    tifffile.imwrite(p, np.zeros((8, 8), np.uint8), ome=True)
    with tifffile.TiffFile(p) as tf:
        xml = tf.ome_metadata.replace('SizeZ="1"', 'SizeZ="10000000"')
    tifffile.imwrite(p, np.zeros((8, 8), np.uint8), description=xml, metadata=None)
    with peak_memory() as peak, pytest.raises(FormatError) as exc:
        open_volume(p)
    assert "a.ome.tif" in str(exc.value) and "declares 10000000 planes" in str(exc.value)
    assert "holds 1 pages" in str(exc.value)
    assert peak["bytes"] < 16 * MiB  # tifffile's list of 10⁷ missing pages alone is 80 MB
