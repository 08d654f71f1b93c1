"""DM3/DM4: the test-side writer is checked by two independent readers, then read_dm is tested on its files.

ncempy and RosettaSciIO were written separately (LBNL and the HyperSpy project), so a file both read back
bit for bit, with the calibration that was written, is a real DM file as far as readers can tell.
"""

from __future__ import annotations

import gc
import json
import pickle
import struct
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import psutil
import pytest
from ncempy.io import dm as ncempy_dm
from rsciio.digitalmicrograph import file_reader as rsciio_read

from em_platform.formats import open_volume
from em_platform.formats.dm import read_dm
from em_platform.formats.dm_writer import data_offset, write_dm
from em_platform.formats.errors import FormatError

VERSIONS = [3, 4]
DTYPES = ["uint8", "uint16", "int16", "int32", "float32"]
SHAPES = {"2d": (48, 64), "3d": (4, 48, 64)}
# Scale and unit differ on every axis, so a reader that mixes up DM's x-first order fails.
# 0.1 is not exact in float32 (DM stores calibrations as float32): read_dm must still report 0.1.
CALIBRATION = {
    "2d": {"scale": (2.5, 0.1), "units": ("Å", "µm"), "origin": (12.0, -3.0)},
    "3d": {"scale": (40.0, 2.5, 0.1), "units": ("nm", "Å", "µm"), "origin": (0.0, 12.0, -3.0)},
}
NGFF_UNITS = {"2d": ("angstrom", "micrometer"), "3d": ("nanometer", "angstrom", "micrometer")}


def pixels(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random pixels over the dtype's whole range, with its extremes (and for floats -0.0 and NaN) included."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        a = rng.normal(0.0, 1e3, size=shape).astype(dt)
        a.flat[:4] = [np.finfo(dt).max, np.finfo(dt).tiny, -0.0, np.nan]
    else:
        info = np.iinfo(dt)
        a = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dt)
        a.flat[:2] = [info.min, info.max]
    return a


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    got = np.asarray(got)
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


@pytest.fixture(params=VERSIONS, ids=lambda v: f"dm{v}")
def version(request) -> int:
    return request.param


@pytest.fixture(params=list(SHAPES))
def kind(request) -> str:
    return request.param


@pytest.fixture(params=DTYPES)
def written(request, tmp_path: Path, version: int, kind: str) -> tuple[Path, np.ndarray, dict]:
    array = pixels(request.param, SHAPES[kind])
    path = write_dm(tmp_path / f"image.dm{version}", array, version=version, **CALIBRATION[kind])
    return path, array, CALIBRATION[kind]


# --- the writer, checked by two independent readers -------------------------------------------------


def test_ncempy_reads_back_what_was_written(written):
    path, array, cal = written
    with ncempy_dm.fileDM(path) as f:
        got = f.getDataset(0)
    assert same_bits(got["data"], array)
    assert [float(s) for s in got["pixelSize"]] == [float(np.float32(s)) for s in cal["scale"]]
    assert list(got["pixelUnit"]) == list(cal["units"])
    assert [float(o) for o in got["pixelOrigin"]] == list(cal["origin"])


def test_rosettasciio_reads_back_what_was_written(written):
    path, array, cal = written
    (image,) = rsciio_read(str(path))
    assert same_bits(image["data"], array)
    axes = image["axes"]
    assert [ax["size"] for ax in axes] == list(array.shape)
    assert [ax["scale"] for ax in axes] == [float(np.float32(s)) for s in cal["scale"]]
    assert [ax["units"] for ax in axes] == list(cal["units"])
    # RosettaSciIO turns DM's origin (in pixels) into an offset: -origin * scale.
    assert [ax["offset"] for ax in axes] == pytest.approx(
        [-o * float(np.float32(s)) for o, s in zip(cal["origin"], cal["scale"], strict=True)]
    )


def test_thumbnail_is_skipped_by_both_readers(tmp_path: Path, version: int):
    array = pixels("uint16", SHAPES["3d"], seed=1)
    path = write_dm(tmp_path / f"t.dm{version}", array, version=version, thumbnail=True, **CALIBRATION["3d"])
    with ncempy_dm.fileDM(path) as f:
        assert f.thumbnail and f.numObjects == 2
        assert same_bits(f.getDataset(0)["data"], array)
    (image,) = rsciio_read(str(path))  # the Thumbnails list hides image 0
    assert same_bits(image["data"], array)


_ELEMENT_SIZE = {2: 2, 3: 4, 4: 2, 5: 4, 6: 4, 7: 8, 8: 1, 9: 1, 10: 1, 11: 8, 12: 8}


def _walk_group(raw: bytes, at: int, word: int, version: int) -> int:
    """Walk one tag group from its header at ``at`` and return where it ends, checking every DM4 entry's
    size field against where the entry really ends (neither ncempy nor RosettaSciIO look at those)."""
    n_tags = int.from_bytes(raw[at + 2 : at + 2 + word], "big")
    at += 2 + word
    for _ in range(n_tags):
        tag_id, label_length = raw[at], int.from_bytes(raw[at + 1 : at + 3], "big")
        at += 3 + label_length
        declared = int.from_bytes(raw[at : at + 8], "big") if version == 4 else None
        at += 8 if version == 4 else 0
        start = at
        if tag_id == 20:
            at = _walk_group(raw, at, word, version)
        else:
            assert tag_id == 21 and raw[at : at + 4] == b"%%%%"
            n_info = int.from_bytes(raw[at + 4 : at + 4 + word], "big")
            info = [
                int.from_bytes(raw[at + 4 + word * i : at + 4 + word * (i + 1)], "big")
                for i in range(1, n_info + 1)
            ]
            at += 4 + word * (1 + n_info)
            if info[0] == 20:  # array of a simple type: [20, type, length]
                at += _ELEMENT_SIZE[info[1]] * info[2]
            elif info[0] == 15:  # struct: [15, name length, n fields, (name length, type) ...]
                at += sum(_ELEMENT_SIZE[t] for t in info[4::2])
            else:
                at += _ELEMENT_SIZE[info[0]]
        if declared is not None:
            assert at - start == declared, f"DM4 entry size {declared} but the entry has {at - start} bytes"
    return at


def test_tag_structure_sizes_are_consistent(tmp_path: Path, version: int):
    tags = {
        "Microscope Info": {"Name": "Krios", "Voltage": 300000.0, "Stage Position": {"Stage Alpha": -60.0}}
    }
    array = pixels("float32", SHAPES["3d"])
    path = write_dm(tmp_path / f"s.dm{version}", array, version=version, thumbnail=True, image_tags=tags)
    raw = path.read_bytes()
    word = 4 if version == 3 else 8
    header = 4 + word + 4
    root_length = int.from_bytes(raw[4 : 4 + word], "big")
    end = _walk_group(raw, header, word, version)
    # Digital Micrograph (GMS 2+) records the root group's length, plus 4 in DM3; then 8 zero bytes end the file.
    assert root_length == end - header + (4 if version == 3 else 0)
    assert raw[end:] == bytes(8)


# --- read_dm ------------------------------------------------------------------------------------------


def test_read_dm_returns_the_calibrated_volume(written, version: int, kind: str):
    path, array, cal = written
    vol = read_dm(path)
    assert vol.axes == (("y", "x") if kind == "2d" else ("z", "y", "x"))
    assert vol.data.dtype == array.dtype
    assert vol.data.shape == array.shape
    assert vol.scale == cal["scale"]  # exactly: 0.1, not float32's 0.10000000149011612
    assert vol.units == NGFF_UNITS[kind]
    assert vol.calibrated
    assert vol.format == f"dm{version}"
    assert vol.source_files == (path,)
    assert same_bits(vol.data.compute(), array)

    meta = json.loads(json.dumps(vol.source_metadata))  # JSON-serialisable as it is
    assert meta["dm_version"] == version
    assert meta["dtype"] == array.dtype.name
    assert meta["shape"] == list(array.shape)
    assert meta["calibration"] == {
        "origin": list(cal["origin"]),
        "scale": list(cal["scale"]),
        "unit": list(cal["units"]),
    }


def test_read_dm_is_lazy(tmp_path: Path, version: int):
    array = pixels("uint16", (5, 48, 64), seed=2)
    path = write_dm(tmp_path / f"stack.dm{version}", array, version=version)
    vol = read_dm(path)
    assert isinstance(vol.data, da.Array)
    assert vol.data.numblocks == (5, 1, 1)  # one slice per chunk
    graph = pickle.dumps(dict(vol.data.__dask_graph__()))
    assert len(graph) < array.nbytes // 4, "the dask graph carries the pixels instead of a file reference"

    # Pixels are read when computed, not when opened: change them on disk after read_dm.
    changed = array[::-1].copy()
    with open(path, "r+b") as fh:
        fh.seek(data_offset(path))
        fh.write(changed.astype("<u2").tobytes())
    assert same_bits(vol.data[3].compute(), changed[3])
    assert same_bits(vol.data.compute(), changed)


def test_read_dm_skips_the_thumbnail(tmp_path: Path, version: int):
    array = pixels("int16", SHAPES["2d"], seed=3)
    path = write_dm(tmp_path / f"t.dm{version}", array, version=version, thumbnail=True, **CALIBRATION["2d"])
    vol = read_dm(path)
    assert vol.data.shape == array.shape
    assert same_bits(vol.data.compute(), array)
    assert vol.source_metadata["image_index"] == 1
    assert vol.source_metadata["images_in_file"] == 1


def test_uncalibrated_and_non_length_axes_have_no_scale(tmp_path: Path, version: int):
    array = pixels("float32", (3, 48, 64), seed=4)
    path = write_dm(
        tmp_path / f"u.dm{version}",
        array,
        version=version,
        scale=(1.0, 0.5, 0.25),
        units=("", "1/nm", "nm"),  # z uncalibrated (DM's default), y reciprocal space, x a length
    )
    vol = read_dm(path)
    assert vol.scale == (None, None, 0.25)
    assert vol.units == (None, None, "nanometer")
    assert not vol.calibrated
    assert vol.source_metadata["calibration"]["unit"] == ["", "1/nm", "nm"]

    zero = write_dm(
        tmp_path / f"z.dm{version}", array[0], version=version, scale=(0.0, 0.5), units=("nm", "nm")
    )
    assert read_dm(zero).scale == (None, 0.5)


def test_microscope_tags_reach_source_metadata(tmp_path: Path):
    tags = {
        "DataBar": {"Acquisition Date": "7/20/2015", "Device Name": "OneView", "Exposure Time (s)": 0.5},
        "Microscope Info": {
            "Illumination Mode": "TEM",
            "Indicated Magnification": 25000.0,
            "Name": "Titan Krios",
            "Voltage": 300000.0,
        },
    }
    path = write_dm(tmp_path / "m.dm4", pixels("uint16", (48, 64)), version=4, image_tags=tags, name="grid 3")
    meta = read_dm(path).source_metadata
    assert meta["microscope"] == {
        "microscope": "Titan Krios",
        "voltage_v": 300000.0,
        "indicated_magnification": 25000.0,
        "illumination_mode": "TEM",
        "camera": "OneView",
        "exposure_s": 0.5,
        "acquisition_date": "7/20/2015",
    }
    assert meta["name"] == "grid 3"
    json.dumps(meta)


def test_open_volume_dispatches_dm_files(tmp_path: Path):
    array = pixels("uint8", SHAPES["3d"], seed=5)
    path = write_dm(tmp_path / "stack.dm3", array, version=3, **CALIBRATION["3d"])
    vol = open_volume(path)
    assert vol.format == "dm3" and vol.axes == ("z", "y", "x")
    assert same_bits(vol.data.compute(), array)


# --- what read_dm refuses ---------------------------------------------------------------------------


def _patch_tag_value(path: Path, label: bytes, value: int) -> None:
    """Overwrite the 4-byte value of the first simple tag named ``label`` (e.g. DataType)."""
    raw = bytearray(path.read_bytes())
    version = struct.unpack(">I", raw[:4])[0]
    word = 4 if version == 3 else 8
    at = raw.index(b"\x15" + struct.pack(">H", len(label)) + label) + 3 + len(label)
    at += (8 if version == 4 else 0) + 4 + 2 * word  # [entry size], %%%%, info length, encoded type
    raw[at : at + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(raw))


def _raises_naming(path: Path, *phrases: str) -> str:
    with pytest.raises(FormatError) as caught:
        read_dm(path)
    message = str(caught.value)
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message, message
    return message


def test_missing_file(tmp_path: Path):
    _raises_naming(tmp_path / "absent.dm3", "does not exist")


@pytest.mark.parametrize("kind", list(SHAPES))
def test_file_cut_in_its_data_block(tmp_path: Path, version: int, kind: str):
    array = pixels("uint16", SHAPES[kind], seed=6)
    path = write_dm(tmp_path / f"cut.dm{version}", array, version=version)
    raw = path.read_bytes()
    path.write_bytes(raw[: data_offset(path) + array.nbytes // 2])
    _raises_naming(path, "truncated", f"DM{version}")


@pytest.mark.parametrize("keep", [0, 10, 200], ids=["empty", "in-header", "in-tags"])
def test_file_cut_before_its_data(tmp_path: Path, version: int, keep: int):
    path = write_dm(tmp_path / f"cut.dm{version}", pixels("uint8", SHAPES["2d"]), version=version)
    path.write_bytes(path.read_bytes()[:keep])
    _raises_naming(path, "empty" if keep == 0 else "truncated")


def test_wrong_magic(tmp_path: Path, version: int):
    path = write_dm(tmp_path / f"magic.dm{version}", pixels("uint8", SHAPES["2d"]), version=version)
    path.write_bytes(b"\x00\x00\x00\x07" + path.read_bytes()[4:])
    _raises_naming(path, "not a readable DM3/DM4 file", "remove it from the inbox")


def test_garbage_and_other_formats(tmp_path: Path):
    garbage = tmp_path / "garbage.dm4"
    garbage.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _raises_naming(garbage, "not a readable DM3/DM4 file")

    tiff = tmp_path / "really_a_tiff.dm3"
    tiff.write_bytes(b"II*\x00" + bytes(500))
    _raises_naming(tiff, "not a readable DM3/DM4 file")


def test_garbage_after_a_valid_header(tmp_path: Path, version: int):
    path = write_dm(tmp_path / f"g.dm{version}", pixels("uint8", SHAPES["2d"]), version=version)
    raw = bytearray(path.read_bytes())
    header = 12 if version == 3 else 16
    raw[header:] = np.random.default_rng(8).integers(0, 256, len(raw) - header, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    _raises_naming(path, "DM")


def test_damaged_tag_delimiter(tmp_path: Path, version: int):
    path = write_dm(tmp_path / f"d.dm{version}", pixels("uint8", SHAPES["2d"]), version=version)
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"%%%%", b"%%x%", 1))
    _raises_naming(path, "damaged tag structure")


def test_data_type_that_does_not_match_the_data_block(tmp_path: Path, version: int):
    path = write_dm(tmp_path / f"t.dm{version}", pixels("uint16", SHAPES["3d"]), version=version)
    _patch_tag_value(path, b"DataType", 2)  # float32: 4 bytes a pixel, the block holds 2
    _raises_naming(path, "damaged", "need")


@pytest.mark.parametrize(("data_type", "what"), [(3, "complex64"), (23, "RGB")])
def test_non_real_pixels(tmp_path: Path, data_type: int, what: str):
    path = write_dm(
        tmp_path / "c.dm4", pixels("int32", SHAPES["2d"]), version=4
    )  # 4 bytes a pixel, like both
    _patch_tag_value(path, b"DataType", data_type)
    _raises_naming(path, f"{what} pixels")


def test_spectra_are_not_volumes(tmp_path: Path):
    spectrum = write_dm(tmp_path / "eels.dm3", pixels("float32", (2048,)), version=3, units=("eV",))
    _raises_naming(spectrum, "1-D spectrum")

    tags = {"Meta Data": {"Format": "Spectrum image", "Signal": "EELS"}}
    si = write_dm(tmp_path / "si.dm4", pixels("float32", (16, 4, 4)), version=4, image_tags=tags)
    _raises_naming(si, "spectrum image")

    by_unit = write_dm(
        tmp_path / "si2.dm4",
        pixels("float32", (16, 4, 4)),
        version=4,
        units=("eV", "nm", "nm"),
        scale=(1, 2, 2),
    )
    _raises_naming(by_unit, "spectrum image")


# --- file handles ---------------------------------------------------------------------------------------


def test_no_file_handles_are_left_open(tmp_path: Path, version: int):
    good = write_dm(tmp_path / f"good.dm{version}", pixels("uint16", SHAPES["3d"]), version=version)
    bad = tmp_path / f"bad.dm{version}"
    bad.write_bytes(good.read_bytes()[:300])
    proc = psutil.Process()

    def still_open() -> set[str]:
        gc.collect()
        return {Path(f.path).name for f in proc.open_files()} & {good.name, bad.name}

    # A Python file object (ncempy's, or ours) left open warns when collected; the memory map
    # of the pixels may stay open while the volume lives, but not after.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            with pytest.raises(FormatError):
                read_dm(bad)
        assert not still_open(), "a failed read_dm left the file open"
        vol = read_dm(good)
        vol.data.compute()
        del vol
        assert not still_open(), "the file stayed open after the volume was gone"
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
