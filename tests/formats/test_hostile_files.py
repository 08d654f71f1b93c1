"""Pixel types from files are claims (issue 50, point 3): a raw sidecar, an MRC mode, a TIFF's sample format
and a DM data type each name how the file's bytes are taken, and only the numeric types of ALLOWED_DTYPES are
accepted, in either byte order, before any array is made over the bytes. An object dtype took a file's bytes
for Python object pointers and ended the process with SIGSEGV; structured, string, void, date, boolean and
complex types make arrays that are not images. Each is refused with a FormatError naming the file, the
field, the rule and what to do; a stated byte order is read as stated."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import dask.array as da
import mrcfile
import numpy as np
import pytest
import tifffile

from em_platform.formats import FormatError, Volume, open_volume
from em_platform.formats.dm_writer import write_dm
from em_platform.formats.lazy import memmap_dask
from em_platform.formats.tiff_arriving import contiguous_layout


def _raw(tmp_path, spec: dict, data: bytes = bytes(64)):
    p = tmp_path / "t.raw"
    p.write_bytes(data)
    (tmp_path / "t.raw.json").write_text(json.dumps(spec))
    return p


def test_an_object_dtype_sidecar_is_refused_not_taken_for_pointers(tmp_path):
    """The review's file: 8 "objects" whose pointers are the bytes 0x41…: read in a child process, so a
    reader that dereferences them shows here as a signal, not as a crashed test worker."""
    p = _raw(tmp_path, {"shape": [8], "dtype": "O"}, b"\x41" * 64)
    child = textwrap.dedent(
        """
        import sys
        from em_platform.formats import FormatError, open_volume
        try:
            print("READ", open_volume(sys.argv[1]).data.compute())
        except FormatError as exc:
            print("REFUSED", exc)
        """
    )
    done = subprocess.run([sys.executable, "-c", child, str(p)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        f"the reader ended the process (exit {done.returncode}): {done.stderr[-800:]}"
    )
    assert done.stdout.startswith("REFUSED"), done.stdout
    message = done.stdout
    assert "t.raw (sidecar t.raw.json): dtype 'O' refused" in message
    assert "object dtype would take the file's bytes for Python object pointers" in message
    assert "ALLOWED_DTYPES" in message and "uint16" in message and "sidecar dtype" in message


@pytest.mark.parametrize(
    "dtype, rule",
    [
        ([["a", "<i4"]], "structured (record) dtype"),  # numpy's JSON form of [('a', 'i4')]
        ("i4,i4", "structured (record) dtype"),
        ("(2,)u1", "subarray dtype"),
        ("V8", "void (raw bytes) dtype"),
        ("S8", "bytes dtype holds text"),
        ("U2", "string dtype holds text"),
        ("M8[ns]", "datetime dtype"),
        ("m8[s]", "timedelta dtype"),
        ("c8", "complex values"),
        ("bool", "boolean image"),
        ("g", "float128 is not one of the allowed pixel types"),
        ("uint13", "numpy cannot read it as a data type"),
        (None, "no pixel type is stated"),
        (2, "a number is not a pixel type"),
        ("u1" * 40, "longer than any pixel type's name"),
    ],
)
def test_a_sidecar_dtype_that_is_not_a_number_type_is_refused_naming_the_rule(tmp_path, dtype, rule):
    p = _raw(tmp_path, {"shape": [2], "dtype": dtype})
    with pytest.raises(FormatError) as exc:
        open_volume(p)
    message = str(exc.value)
    assert "t.raw (sidecar t.raw.json): dtype" in message and rule in message
    assert "Allowed pixel types (ALLOWED_DTYPES): uint8, uint16" in message and "either byte order" in message


@pytest.mark.parametrize("dtype", [">u2", ">i2", ">u4", ">i8", ">f4", ">f8"])
def test_a_big_endian_sidecar_dtype_reads_the_right_values(tmp_path, dtype):
    """``>u2`` says big-endian by itself; it was read little-endian unless byte_order said so too."""
    values = np.array([0, 1, 258, 1031, 4000, 30000, 7, 65], dtype)  # none reads the same byte-swapped
    p = _raw(tmp_path, {"shape": [8], "dtype": dtype}, values.tobytes())
    vol = open_volume(p)
    np.testing.assert_array_equal(vol.data.compute(), values)
    assert vol.data.dtype.isnative and vol.source_metadata["byte_order"] == "big"


def test_a_byte_order_that_contradicts_the_dtype_is_refused(tmp_path):
    p = _raw(tmp_path, {"shape": [8], "dtype": "<u2", "byte_order": "big"})
    with pytest.raises(
        FormatError, match="dtype '<u2' is little-endian but byte_order says big; state the byte order once"
    ):
        open_volume(p)
    p = _raw(tmp_path, {"shape": [8], "dtype": "uint16", "byte_order": "middle"})
    with pytest.raises(FormatError, match='byte_order \'middle\' must be "little" or "big"'):
        open_volume(p)


def test_a_complex_mrc_is_refused_naming_its_mode(tmp_path):
    p = tmp_path / "fft.mrc"
    with mrcfile.new(p) as m:
        m.set_data(np.zeros((2, 4, 4), np.complex64))  # mode 4
    with pytest.raises(FormatError) as exc:
        open_volume(p)
    message = str(exc.value)
    assert "fft.mrc: MRC mode 4 pixel type" in message and "complex values" in message
    assert "convert it to a real-valued mode" in message


@pytest.mark.parametrize(
    "array, rule",
    [(np.zeros((8, 8), np.complex64), "complex values"), (np.zeros((8, 8), bool), "boolean image")],
    ids=["complex", "bilevel"],
)
def test_a_tiff_of_complex_or_bilevel_pixels_is_refused(tmp_path, array, rule):
    p = tmp_path / "t.tif"
    tifffile.imwrite(p, array)
    with pytest.raises(FormatError) as exc:
        open_volume(p)
    assert "t.tif: pixel type (SampleFormat × BitsPerSample)" in str(exc.value) and rule in str(exc.value)


def test_a_tiff_read_while_arriving_checks_its_pixel_type_first(tmp_path):
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, np.zeros((3, 8, 8), np.complex64))
    with open(p, "rb") as f, pytest.raises(FormatError, match="stack.tif: pixel type .* complex values"):
        contiguous_layout(f)


def test_a_binary_dm_image_is_refused(tmp_path):
    p = write_dm(tmp_path / "mask.dm4", np.zeros((8, 8), bool), version=4)
    with pytest.raises(FormatError) as exc:
        open_volume(p)
    assert "mask.dm4: DM data type 14 pixel type" in str(exc.value) and "boolean image" in str(exc.value)


def test_the_memory_map_and_the_volume_refuse_what_a_reader_let_through(tmp_path):
    """The last lines: every reader's bytes are mapped by memmap_dask, and every reader returns a Volume."""
    p = tmp_path / "x.bin"
    p.write_bytes(bytes(64))
    with pytest.raises(FormatError, match="x.bin: dtype 'O' refused: an object dtype"):
        memmap_dask(p, 0, (8,), "O")
    with pytest.raises(FormatError, match="x.bin: pixel type dtype\\('O'\\) refused"):
        Volume(da.from_array(np.empty(4, object), chunks=4), ("x",), (None,), (None,), "raw", (p,))
