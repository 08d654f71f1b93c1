"""TIFF, OME-TIFF, folder stacks, MRC and raw: lazy, true dtype, physical sizes, clear errors."""

from __future__ import annotations

import json

import dask.array as da
import mrcfile
import numpy as np
import pytest
import tifffile

from em_platform.formats import FormatError, open_volume
from em_platform.formats.raw import read_raw
from em_platform.samples import em_texture


def test_ome_tiff_physical_sizes_and_dtype(tmp_path):
    vol = em_texture((6, 40, 50), seed=1, dtype=np.uint16)
    p = tmp_path / "a.ome.tif"
    tifffile.imwrite(
        p,
        vol,
        ome=True,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeX": 4.0,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 4.5,
            "PhysicalSizeYUnit": "nm",
            "PhysicalSizeZ": 0.03,
            "PhysicalSizeZUnit": "µm",
        },
    )
    v = open_volume(p)
    assert v.format == "ome-tiff" and v.axes == ("z", "y", "x")
    assert v.data.dtype == np.uint16 and v.data.shape == vol.shape
    assert isinstance(v.data, da.Array) and v.data.npartitions >= 1
    assert v.units == ("micrometer", "nanometer", "nanometer")
    assert v.voxel_size_nm() == pytest.approx({"z": 30.0, "y": 4.5, "x": 4.0})
    np.testing.assert_array_equal(v.data.compute(), vol)


def test_ome_tiff_default_unit_is_micrometre(tmp_path):
    p = tmp_path / "b.ome.tif"
    tifffile.imwrite(
        p,
        np.zeros((8, 8), np.uint8),
        ome=True,
        metadata={"axes": "YX", "PhysicalSizeX": 0.002, "PhysicalSizeY": 0.002},
    )
    assert open_volume(p).voxel_size_nm() == pytest.approx({"y": 2.0, "x": 2.0})


def test_imagej_tiff_with_spacing(tmp_path):
    vol = em_texture((5, 30, 20), seed=2)
    p = tmp_path / "ij.tif"
    tifffile.imwrite(
        p,
        vol,
        imagej=True,
        resolution=(1 / 3.0, 1 / 3.0),
        metadata={"axes": "ZYX", "spacing": 25.0, "unit": "nm"},
    )
    v = open_volume(p)
    assert v.axes == ("z", "y", "x")
    assert v.voxel_size_nm() == pytest.approx({"z": 25.0, "y": 3.0, "x": 3.0})
    np.testing.assert_array_equal(v.data.compute(), vol)


def test_plain_tiff_without_calibration_says_so(tmp_path):
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, np.arange(64, dtype=np.float32).reshape(8, 8))
    v = open_volume(p)
    assert v.data.dtype == np.float32
    assert not v.calibrated and v.voxel_size_nm() == {"y": None, "x": None}


def test_multipage_tiff_is_lazy_and_chunked_by_pages(tmp_path):
    vol = em_texture((40, 256, 256), seed=3, dtype=np.uint16)
    p = tmp_path / "pages.tif"
    tifffile.imwrite(p, vol, compression="zlib")
    v = open_volume(p)
    assert v.data.shape == vol.shape
    np.testing.assert_array_equal(v.data[17:19, 100:110].compute(), vol[17:19, 100:110])


def test_folder_stack_in_natural_order(tmp_path):
    vol = em_texture((11, 24, 32), seed=4)
    folder = tmp_path / "stack"
    folder.mkdir()
    for i, sl in enumerate(vol):  # slice_2 must come before slice_10
        tifffile.imwrite(
            folder / f"slice_{i}.tif",
            sl,
            imagej=True,
            resolution=(0.5, 0.5),
            metadata={"spacing": 50.0, "unit": "nm"},
        )
    v = open_volume(folder)
    assert v.format == "tiff-stack" and len(v.source_files) == 11
    np.testing.assert_array_equal(v.data.compute(), vol)
    assert v.voxel_size_nm() == pytest.approx({"z": 50.0, "y": 2.0, "x": 2.0})


def test_folder_stack_with_mismatched_slice_names_it(tmp_path):
    folder = tmp_path / "stack"
    folder.mkdir()
    tifffile.imwrite(folder / "s1.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(folder / "s2.tif", np.zeros((8, 9), np.uint8))
    with pytest.raises(FormatError, match="s2.tif"):
        open_volume(folder)


def test_mrc_volume_voxel_size_from_header(tmp_path):
    vol = (em_texture((7, 33, 21), seed=5, dtype=np.uint16).astype(np.int32) - 20000).astype(np.int16)
    p = tmp_path / "t.mrc"
    with mrcfile.new(p) as m:
        m.set_data(vol)
        m.voxel_size = (2.5, 3.0, 4.0)  # x, y, z in Å
    v = open_volume(p)
    assert v.format == "mrc" and v.axes == ("z", "y", "x") and v.data.dtype == np.int16
    assert v.units == ("angstrom",) * 3
    assert v.voxel_size_nm() == pytest.approx({"z": 0.4, "y": 0.3, "x": 0.25})
    np.testing.assert_array_equal(v.data.compute(), vol)


def test_mrc_image_and_float_mode(tmp_path):
    img = np.random.default_rng(0).standard_normal((16, 12)).astype(np.float32)
    p = tmp_path / "i.mrc"
    with mrcfile.new(p) as m:
        m.set_data(img)
        m.voxel_size = 1.1
    v = open_volume(p)
    assert v.axes == ("y", "x")
    np.testing.assert_array_equal(v.data.compute(), img)


def test_mrc_graph_pickles_without_the_data(tmp_path):
    """Dask graphs ship to worker processes: the lazy array must pickle as a file reference, not its voxels."""
    import pickle

    vol = np.zeros((64, 128, 128), np.float32)
    p = tmp_path / "big.mrc"
    with mrcfile.new(p) as m:
        m.set_data(vol)
    v = open_volume(p)
    assert len(pickle.dumps(v.data)) < 50_000 < vol.nbytes


def test_truncated_mrc_is_a_format_error(tmp_path):
    p = tmp_path / "cut.mrc"
    with mrcfile.new(p) as m:
        m.set_data(np.zeros((4, 32, 32), np.uint16))
    p.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(FormatError, match="cut.mrc.*truncated"):
        open_volume(p)


def test_garbage_files_are_format_errors(tmp_path):
    for name in ("junk.mrc", "junk.tif"):
        p = tmp_path / name
        p.write_bytes(b"this is not an image" * 20)
        with pytest.raises(FormatError, match=name):
            open_volume(p)


def test_truncated_tiff_is_a_format_error(tmp_path):
    p = tmp_path / "cut.tif"
    tifffile.imwrite(p, np.ones((6, 64, 64), np.uint16))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="cut.tif"):
        open_volume(p)


def test_unsupported_suffix(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(FormatError, match="unsupported file type .txt"):
        open_volume(p)


def test_raw_with_sidecar_big_endian(tmp_path):
    vol = em_texture((3, 10, 12), seed=6, dtype=np.uint16)
    p = tmp_path / "v.raw"
    vol.astype(">u2").tofile(p)
    (tmp_path / "v.raw.json").write_text(
        json.dumps(
            {
                "shape": [3, 10, 12],
                "dtype": "uint16",
                "byte_order": "big",
                "voxel_size": [40, 4, 4],
                "unit": "nm",
            }
        )
    )
    v = open_volume(p)
    assert v.data.dtype == np.dtype("uint16") and v.data.dtype.isnative
    np.testing.assert_array_equal(v.data.compute(), vol)
    assert v.voxel_size_nm() == {"z": 40.0, "y": 4.0, "x": 4.0}


def test_raw_errors_name_the_problem(tmp_path):
    p = tmp_path / "v.raw"
    np.zeros(100, np.uint8).tofile(p)
    with pytest.raises(FormatError, match="sidecar v.raw.json"):
        open_volume(p)
    with pytest.raises(FormatError, match="truncated"):
        read_raw(p, (10, 11), "uint8")
    with pytest.raises(FormatError, match="dtype"):
        read_raw(p, (10, 10), "uint13")
