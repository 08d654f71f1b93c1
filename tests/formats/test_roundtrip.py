"""Each reader round-trips to OME-Zarr bit-exactly, with the physical sizes preserved.

The expected voxels come from the format's own library (tifffile, mrcfile, numpy), not from our reader,
and the written image is read back by ome_zarr's reader as well as by plain zarr.
"""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

from em_platform.formats import open_volume
from em_platform.imaging.ome_zarr import write_ome_zarr
from em_platform.ingest.convert import resolve_voxel_size
from em_platform.samples import em_texture, write_ome_tiff


def _ome_tiff(tmp):
    vol = em_texture((9, 70, 90), seed=11, dtype=np.uint16)
    p = tmp / "v.ome.tif"
    write_ome_tiff(p, vol, {"z": 30.0, "y": 4.0, "x": 4.0})
    return p, tifffile.imread(p), {"z": 30.0, "y": 4.0, "x": 4.0}


def _tiff_2d(tmp):
    img = em_texture((301, 257), seed=12)
    p = tmp / "i.tif"
    tifffile.imwrite(p, img, resolution=(1e7 / 2.0, 1e7 / 2.0), resolutionunit="CENTIMETER")  # 2 nm pixels
    return p, tifffile.imread(p), {"y": 2.0, "x": 2.0}


def _tiff_stack(tmp):
    vol = em_texture((7, 40, 33), seed=13, dtype=np.float32)
    folder = tmp / "stack"
    folder.mkdir()
    for i, sl in enumerate(vol):
        tifffile.imwrite(
            folder / f"z{i:02d}.tif",
            sl,
            imagej=True,
            resolution=(0.25, 0.25),
            metadata={"spacing": 50.0, "unit": "nm"},
        )
    return (
        folder,
        np.stack([tifffile.imread(folder / f"z{i:02d}.tif") for i in range(7)]),
        {"z": 50.0, "y": 4.0, "x": 4.0},
    )


def _mrc(tmp):
    vol = (em_texture((10, 64, 48), seed=14, dtype=np.uint16).astype(np.int32) - 25000).astype(np.int16)
    p = tmp / "t.mrc"
    with mrcfile.new(p) as m:
        m.set_data(vol)
        m.voxel_size = (10.0, 10.0, 20.0)  # Å
    return p, mrcfile.read(p), {"z": 2.0, "y": 1.0, "x": 1.0}


def _raw(tmp):
    vol = em_texture((5, 31, 29), seed=15, dtype=np.uint16)
    p = tmp / "b.raw"
    vol.tofile(p)
    (tmp / "b.raw.json").write_text(
        json.dumps({"shape": list(vol.shape), "dtype": "uint16", "voxel_size": [8, 8, 8], "unit": "nm"})
    )
    return p, np.fromfile(p, dtype="<u2").reshape(vol.shape), {"z": 8.0, "y": 8.0, "x": 8.0}


def _dm(version):
    def make(tmp):
        import ncempy.io.dm

        from em_platform.formats.dm_writer import write_dm

        vol = em_texture((6, 50, 40), seed=16, dtype=np.uint16).astype(
            np.float32 if version == 4 else np.uint16
        )
        p = tmp / f"s.dm{version}"
        write_dm(p, vol, version=version, scale=(12.0, 0.5, 0.5), units=("nm", "nm", "nm"))
        with ncempy.io.dm.fileDM(str(p)) as f:  # an independent reader gives the expected voxels
            expected = np.asarray(f.getDataset(0)["data"])
        return p, expected, {"z": 12.0, "y": 0.5, "x": 0.5}

    return make


CASES = {
    "dm3": _dm(3),
    "dm4": _dm(4),
    "ome-tiff": _ome_tiff,
    "tiff-2d": _tiff_2d,
    "tiff-stack": _tiff_stack,
    "mrc": _mrc,
    "raw": _raw,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reader_to_ome_zarr_is_bit_exact_with_physical_sizes(case, tmp_path):
    path, expected, voxel_nm = CASES[case](tmp_path)
    vol = open_volume(path)
    calibration = resolve_voxel_size(vol)
    resolved, source = calibration.voxel_nm, calibration.source
    assert source == "header" and resolved == pytest.approx(voxel_nm)
    scale = [resolved[a] for a in vol.axes]
    out = tmp_path / "out.ome.zarr"
    info = write_ome_zarr(vol.data, str(out), axes=vol.axes, scale=scale, units=["nanometer"] * len(vol.axes))

    level0 = zarr.open_group(str(out), mode="r")["0"]
    assert level0.dtype == expected.dtype
    np.testing.assert_array_equal(level0[...], expected)

    node = Reader(parse_url(str(out)))()
    image = next(iter(node))
    np.testing.assert_array_equal(np.asarray(image.data[0]), expected)
    multiscale = image.metadata
    assert [a["name"] for a in multiscale["axes"]] == list(vol.axes)
    assert all(a.get("unit") == "nanometer" for a in multiscale["axes"])
    level0_scale = next(
        t["scale"] for t in multiscale["coordinateTransformations"][0] if t["type"] == "scale"
    )
    assert level0_scale == pytest.approx(scale)
    assert list(info.levels[0].scale) == pytest.approx(scale)
    assert len(info.levels) >= 1
