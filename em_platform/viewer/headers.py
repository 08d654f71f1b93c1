"""What the viewer takes from a request's headers: the byte range it asks for and the length of its body.
Each is parsed strictly (a value from the network) and small: standard library only. (The host a request was
sent to is the guard's: :mod:`em_platform.web_guard.rules`.)
"""

from __future__ import annotations

import re

_RANGE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})", re.IGNORECASE)  # 18 digits: past any file
_LENGTH = re.compile(r"[0-9]{1,18}")


class Unsatisfiable(ValueError):
    """A ``Range`` that starts past the end of the file (HTTP 416)."""


def byte_range(value: str | None, size: int) -> tuple[int, int] | None:
    """The first and last byte a ``Range`` header asks for in a file of ``size`` bytes: one range,
    ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` (the last n bytes). None when there is no header or it is not
    one such range (RFC 9110 lets a server ignore it and send the whole file); :class:`Unsatisfiable` when
    the range starts past the end."""
    match = _RANGE.fullmatch(value.strip()) if value else None
    if match is None or match[1] == match[2] == "":
        return None
    first, last = match[1], match[2]
    if not first:  # a suffix: the last n bytes
        if int(last) == 0 or size == 0:
            raise Unsatisfiable(value)
        return max(size - int(last), 0), size - 1
    if last and int(last) < int(first):
        return None  # not a range (RFC 9110 14.1.1): ignored
    if int(first) >= size:
        raise Unsatisfiable(value)
    return int(first), min(int(last), size - 1) if last else size - 1


def content_length(values: list[str] | None) -> int | None:
    """A request body's length from its ``Content-Length`` header(s): one whole number of bytes, else None
    (missing, negative, not a number, or several headers: the body's end is not known)."""
    if not values or len(values) != 1 or not _LENGTH.fullmatch(values[0].strip()):
        return None
    return int(values[0])
