"""Every size a remote source announces is bounded before anything is allocated from it.

A server is outside the platform: a ``Content-Length``, an FTP ``SIZE``, a listing's size and a document's
length are claims. Each is checked against the source's own listing where it gives one and against a bound
below, and a claim past it raises :class:`SizeRefused` (permanent: retrying cannot make a lie true) naming
the URL, the field, the value and the bound. Bodies are read only up to their bound, never whole first.

The bounds (docs/deployment.md "Trust boundaries" lists them for operators):

- :data:`MAX_FILE_BYTES` (1 TiB): one downloaded file; :class:`~em_platform.sources.download.DownloadOptions`
  ``max_file_bytes`` changes it per source.
- :data:`MAX_METADATA_BYTES` (64 MiB): one JSON document or HTML listing (``attributes.json``, an EMPIAR
  entry, a DVID info, an index page).
- N5 blocks: :mod:`em_platform.sources.n5` bounds each by the array's ``blockSize`` × data type.
"""

from __future__ import annotations

import json
from typing import Any

from em_platform.sources.retry import PermanentSourceError

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_METADATA_BYTES",
    "SizeRefused",
    "cat_json",
    "cat_limited",
    "checked_size",
    "json_body",
    "read_limited",
]

MAX_FILE_BYTES = 2**40
"""One file a source serves: 1 TiB. The largest single files the public sources hold are tens of GB (EMPIAR
movie stacks and volumes; OpenOrganelle and IDR serve chunks), so this refuses only a server that lies, before
a ranged download plans its parts or preallocates the file (Content-Length 10¹⁷ cost 6.8 s and a MemoryError)."""

MAX_METADATA_BYTES = 64 * 2**20
"""One JSON document or HTML listing: 64 MiB, a few times the largest the sources answer (an EMPIAR folder
index of ~100,000 files is ~20 MB; entry, image and info documents are kilobytes)."""

_READ_BYTES = 64 * 1024


class SizeRefused(PermanentSourceError):
    """A size a server announced (or sent) past its bound or its listing: URL, field, value, bound."""

    def __init__(self, url: str, field: str, value: Any, bound: str):
        self.field = field
        self.value = value
        super().__init__(f"{url}: {field} {value} refused: {bound}", url=url)


def checked_size(
    url: str, field: str, value: Any, bound: int, *, listed: int | None = None, setting: str = ""
) -> int:
    """A size from a server (``Content-Length``, ``SIZE``): a whole number from 0 to ``bound``, and equal to
    ``listed`` when the source's listing gave the file's size; :class:`SizeRefused` otherwise."""
    try:
        size = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise SizeRefused(url, field, repr(value), "not a whole number of bytes") from None
    if size < 0:
        raise SizeRefused(url, field, size, "a size cannot be negative")
    if size > bound:
        how = f" ({setting})" if setting else ""
        raise SizeRefused(url, field, size, f"more than the {bound} bytes one file may have{how}")
    if listed is not None and size != listed:
        raise SizeRefused(url, field, size, f"the source's listing says {listed} bytes")
    return size


def read_limited(response: Any, url: str, limit: int = MAX_METADATA_BYTES, field: str = "body") -> bytes:
    """The body of a streamed ``requests`` response (``stream=True``), at most ``limit`` bytes.

    Refused from ``Content-Length`` alone when it announces more; otherwise read in small blocks and refused
    as soon as one byte more than ``limit`` arrived, so a lying server costs ``limit`` bytes of memory at most.
    """
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise SizeRefused(url, f"{field} Content-Length", int(declared), f"more than {limit} bytes")
    body = bytearray()
    for block in response.iter_content(_READ_BYTES):
        body += block
        if len(body) > limit:
            raise SizeRefused(url, field, f"of more than {limit} bytes", f"at most {limit} bytes are read")
    return bytes(body)


def _parse_json(raw: bytes, url: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise PermanentSourceError(
            f"{url} did not answer JSON ({exc}; body starts {raw[:80]!r}); is the endpoint URL right?",
            url=url,
        ) from None


def json_body(response: Any, url: str, limit: int = MAX_METADATA_BYTES) -> Any:
    """A streamed response's JSON document, read with :func:`read_limited`."""
    return _parse_json(read_limited(response, url, limit), url)


def cat_limited(fs: Any, path: str, limit: int, url: str | None = None, field: str = "object") -> bytes:
    """An fsspec object's bytes, at most ``limit``: one read of ``limit`` + 1 bytes (a ranged GET on S3)."""
    raw = fs.cat_file(path, start=0, end=limit + 1)
    if len(raw) > limit:
        raise SizeRefused(
            url or path, field, f"of more than {limit} bytes", f"at most {limit} bytes are read"
        )
    return raw


def cat_json(fs: Any, path: str, limit: int = MAX_METADATA_BYTES, url: str | None = None) -> Any:
    """An fsspec JSON document (``attributes.json``, ``.zattrs``), read with :func:`cat_limited`."""
    return _parse_json(cat_limited(fs, path, limit, url, "JSON document"), url or path)
