"""The pixel types the platform reads, in one list: every dtype that comes from outside passes here first.

A dtype from a file (a raw sidecar, an MRC mode, a TIFF's SampleFormat and BitsPerSample, a DM data type,
N5 or Zarr array metadata) decides how the file's bytes are taken. ``"O"`` takes them for Python object
pointers (reading them crashes the process), a structured, string, void or date type makes an array that is
not an image, and ``np.dtype(None)`` quietly means float64. So each reader calls :func:`checked_dtype` on
what it was told, before any array is made over the bytes.

The list is what an EM image is stored as and what the OME-Zarr conversion can write (its pyramid means
need integers or floats): unsigned and signed integers of 8 to 64 bits, and 16-, 32- and 64-bit floats
(MRC mode 12 is float16). Either byte order is accepted, as files state it. Refused by rule: object,
structured (record), subarray, void, string and bytes, datetime and timedelta, boolean (a mask: store it as
uint8), complex (an FFT or a complex MRC mode: not a real-valued image), and the platform-dependent
extended floats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from em_platform.formats.errors import FormatError

ALLOWED_DTYPES = (
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
)
"""The pixel types a reader accepts, by numpy name; each in either byte order."""

_MAX_NAME = 64  # characters: no numeric dtype's name is longer; a longer string is not one of them

_RULES = {
    "O": "an object dtype would take the file's bytes for Python object pointers",
    "V": "a void (raw bytes) dtype holds no pixel values",
    "S": "a bytes dtype holds text, not pixel values",
    "U": "a string dtype holds text, not pixel values",
    "M": "a datetime dtype holds dates, not pixel values",
    "m": "a timedelta dtype holds durations, not pixel values",
    "b": "a boolean image (a mask) cannot be averaged into a pyramid; store it as uint8",
    "c": "complex values (an FFT, a complex MRC mode) are not a real-valued image",
}


def allowed_text() -> str:
    """The allow-list as the error messages and the docs state it."""
    return ", ".join(ALLOWED_DTYPES) + " (either byte order)"


def checked_dtype(value: Any, *, where: str, field: str = "dtype", hint: str = "") -> np.dtype:
    """``value`` as a numpy dtype if it is one of :data:`ALLOWED_DTYPES` (its byte order kept), else
    :class:`FormatError` naming ``where`` (the file or URL), ``field``, the rule it breaks and what to do
    (``hint``, or: state one of the allowed types)."""
    dtype = _parse(value, where, field, hint)
    if dtype.newbyteorder("=").name in ALLOWED_DTYPES and dtype.fields is None and dtype.subdtype is None:
        return dtype
    if dtype.fields is not None:
        rule = "a structured (record) dtype has named fields, not pixel values"
    elif dtype.subdtype is not None:
        rule = "a subarray dtype hides a shape inside each element"
    else:
        rule = _RULES.get(dtype.kind, f"{dtype.name} is not one of the allowed pixel types")
    raise _refused(value, where, field, rule, hint)


def _parse(value: Any, where: str, field: str, hint: str) -> np.dtype:
    if isinstance(value, np.dtype):
        return value
    if isinstance(value, list | tuple | dict):
        raise _refused(
            value, where, field, "a structured (record) dtype has named fields, not pixel values", hint
        )
    if value is None:
        raise _refused(value, where, field, "no pixel type is stated", hint)
    if isinstance(value, bool | int | float):
        raise _refused(value, where, field, "a number is not a pixel type", hint)
    if isinstance(value, str) and len(value) > _MAX_NAME:
        raise _refused(
            value, where, field, f"longer than any pixel type's name ({_MAX_NAME} characters)", hint
        )
    if not isinstance(value, str | type):
        raise _refused(value, where, field, f"a {type(value).__name__} is not a pixel type", hint)
    try:
        return np.dtype(value)
    except (TypeError, ValueError, SyntaxError) as exc:
        raise _refused(value, where, field, f"numpy cannot read it as a data type ({exc})", hint) from None


def _refused(value: Any, where: str, field: str, rule: str, hint: str) -> FormatError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return FormatError(
        f"{where}: {field} {shown} refused: {rule}. Allowed pixel types (ALLOWED_DTYPES): {allowed_text()}; "
        f"{hint or 'state one of them, or convert the data to one'}"
    )
