"""What the viewer takes from a request's headers: the host it was sent to, the byte range it asks for and
the length of its body. Each is parsed strictly (a value from the network) and small: standard library only.
"""

from __future__ import annotations

import re

# The names a browser on this machine uses for it; always answered (DNS rebinding needs a name the attacker
# controls, and no web page elsewhere can make a browser send these).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

_HOST = re.compile(r"(?P<name>[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_RANGE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})", re.IGNORECASE)  # 18 digits: past any file
_LENGTH = re.compile(r"[0-9]{1,18}")


class Unsatisfiable(ValueError):
    """A ``Range`` that starts past the end of the file (HTTP 416)."""


def host_name(value: str | None) -> str | None:
    """The host name of a ``Host`` header or an allow-list entry: lower case, without port, brackets or a
    trailing dot (``[::1]:3030`` → ``::1``); None when ``value`` is no host name."""
    match = _HOST.fullmatch(value.strip()) if value else None
    if match is None:
        return None
    return match["name"].lower().strip("[]").rstrip(".") or None


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
