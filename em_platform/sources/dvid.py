"""A small client for DVID (Janelia's versioned image store): an instance's info, its bounds, and raw voxels.

DVID speaks x,y,z order everywhere in its URLs and its info JSON, while numpy and NGFF speak z,y,x; this
module is the one place that turns one into the other. A raw GET answers uint8 voxels with x fastest,
which is exactly a C-order (z, y, x) array.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests

from em_platform.formats.dtypes import checked_dtype
from em_platform.formats.errors import FormatError
from em_platform.sources.bounds import read_limited
from em_platform.sources.download import is_transient
from em_platform.sources.retry import (
    PermanentSourceError,
    RetryPolicy,
    TransientSourceError,
    http_error,
    retrying,
)

log = logging.getLogger(__name__)

ZYX = tuple[int, int, int]


@dataclass(frozen=True)
class DvidOptions:
    policy: RetryPolicy = RetryPolicy()
    timeout_s: tuple[float, float] = (10.0, 120.0)  # connect, read (a 256³ block is 16 MiB)
    read_bytes: int = 1 * 2**20  # read size while streaming a body


def _zyx(xyz: Sequence[Any], what: str, url: str) -> ZYX:
    try:
        x, y, z = (int(v) for v in list(xyz)[:3])
    except (TypeError, ValueError) as exc:
        raise PermanentSourceError(f"{url}: {what} is not three integers ({xyz!r})", url=url) from exc
    return (z, y, x)


def parse_bounds(info: dict[str, Any], url: str = "DVID info") -> tuple[ZYX, ZYX]:
    """(min_zyx, max_zyx) of an instance's voxels, both inclusive, from any info form seen in the wild.

    Tried in order: top-level ``Extents`` (DVID's current extents; ``Extended``'s copy is "no longer
    updated" in DVID's source), ``Extended.MinPoint/MaxPoint`` (x,y,z, the form DVID's uint8blk info has),
    ``Extended.MinZyx/MaxZyx`` (z,y,x) and a top-level ``bounds`` [start_xyz, stop_xyz) with an exclusive
    stop, as macroscope's loader read them.
    """
    ext = info.get("Extended") or {}
    extents = info.get("Extents") or {}
    if extents.get("MinPoint") is not None and extents.get("MaxPoint") is not None:
        return _zyx(extents["MinPoint"], "Extents.MinPoint", url), _zyx(
            extents["MaxPoint"], "Extents.MaxPoint", url
        )
    if ext.get("MinPoint") is not None and ext.get("MaxPoint") is not None:
        return _zyx(ext["MinPoint"], "Extended.MinPoint", url), _zyx(
            ext["MaxPoint"], "Extended.MaxPoint", url
        )
    if ext.get("MinZyx") is not None and ext.get("MaxZyx") is not None:
        # already z,y,x: reverse so _zyx's x,y,z reading gives them back in order
        return _zyx(list(ext["MinZyx"])[:3][::-1], "Extended.MinZyx", url), _zyx(
            list(ext["MaxZyx"])[:3][::-1], "Extended.MaxZyx", url
        )
    bounds = info.get("bounds")
    if isinstance(bounds, list | tuple) and len(bounds) == 2:
        lo = _zyx(bounds[0], "bounds[0]", url)
        stop = _zyx(bounds[1], "bounds[1]", url)
        return lo, (stop[0] - 1, stop[1] - 1, stop[2] - 1)
    raise PermanentSourceError(
        f"{url}: the info JSON has no bounds (looked for Extents.MinPoint/MaxPoint, Extended.MinPoint/"
        f"MaxPoint, Extended.MinZyx/MaxZyx and bounds); check that the instance holds image data",
        url=url,
    )


def parse_voxel_size(info: dict[str, Any]) -> tuple[tuple[float, float, float], str] | None:
    """((z, y, x) voxel size, unit) from ``Extended.VoxelSize/VoxelUnits``, or None when absent or unusable."""
    ext = info.get("Extended") or {}
    size: Any = ext.get("VoxelSize")  # JSON of any kind: list() refuses a non-sequence (TypeError: None)
    units = ext.get("VoxelUnits")
    try:
        x, y, z = (float(v) for v in list(size)[:3])
    except (TypeError, ValueError):
        return None
    if min(x, y, z) <= 0:
        return None
    unit_list = [units] * 3 if isinstance(units, str) else list(units or [])
    if len(unit_list) < 3 or len(set(unit_list[:3])) != 1:
        return None  # no units, or mixed units: do not guess
    return (z, y, x), str(unit_list[0])


RAW_DTYPE = np.dtype(np.uint8)
"""What :meth:`DvidClient.raw` reads: a uint8blk instance's voxels."""


def check_value_type(info: dict[str, Any], url: str = "DVID info") -> np.dtype:
    """The voxel type an instance's info states (``Extended.Values[].DataType``, uint8 when it states none),
    once it is on the allow-list (:func:`~em_platform.formats.dtypes.checked_dtype`) and is the uint8 a raw
    GET answers; FormatError naming ``url`` otherwise, before any voxel is fetched as the wrong type."""
    values = (info.get("Extended") or {}).get("Values") or []
    stated: list[Any] = []
    for value in values if isinstance(values, list) else [values]:
        kind = value.get("DataType") if isinstance(value, dict) else value
        if kind not in stated:
            stated.append(kind)
    if not stated:
        return RAW_DTYPE
    if len(stated) != 1:
        raise FormatError(
            f"{url}: Extended.Values states several voxel types {stated}; raw reads one (uint8)"
        )
    dtype = checked_dtype(stated.pop(), where=url, field="Extended.Values DataType")
    if dtype != RAW_DTYPE:
        raise FormatError(
            f"{url}: the instance holds {dtype.name} voxels, and raw reads uint8blk instances only; check the "
            "instance name (a grayscale instance, not labels)"
        )
    return dtype


class DvidClient:
    """One DVID image instance (``server``/``uuid``/``instance``); thread-safe, one HTTP session per thread."""

    def __init__(
        self,
        server: str,
        uuid: str,
        instance: str,
        options: DvidOptions = DvidOptions(),
        *,
        logger: logging.Logger | logging.LoggerAdapter = log,
    ):
        if "://" not in server:
            server = "http://" + server
        self.server = server.rstrip("/")
        self.uuid = uuid
        self.instance = instance
        self.options = options
        self.logger = logger
        self._local = threading.local()

    @property
    def node_url(self) -> str:
        return f"{self.server}/api/node/{self.uuid}/{self.instance}"

    @property
    def info_url(self) -> str:
        return f"{self.node_url}/info"

    def raw_url(self, offset_zyx: Sequence[int], size_zyx: Sequence[int]) -> str:
        (z0, y0, x0), (sz, sy, sx) = offset_zyx, size_zyx
        return f"{self.node_url}/raw/0_1_2/{sx}_{sy}_{sz}/{x0}_{y0}_{z0}"

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def close(self) -> None:
        """Close this thread's session (other threads' sessions close when their threads end)."""
        s = getattr(self._local, "session", None)
        if s is not None:
            s.close()
            self._local.session = None

    def _get(self, url: str, *, stream: bool) -> requests.Response:
        try:
            r = self._session().get(url, timeout=self.options.timeout_s, stream=stream)
        except requests.exceptions.InvalidURL as exc:
            raise PermanentSourceError(
                f"{url}: not a valid URL ({exc}); check the DVID server setting"
            ) from exc
        if r.status_code >= 400:
            reason = next(r.iter_content(200), b"")  # the start of the error body, never all of it
            r.close()
            raise http_error(r.status_code, url, reason.decode("utf-8", "replace").strip())
        return r

    def info(self) -> dict[str, Any]:
        """The instance's info JSON (``Base`` and ``Extended``), retried on transient faults."""
        url = self.info_url

        def once() -> dict[str, Any]:
            with self._get(url, stream=True) as r:
                body = read_limited(r, url)
            try:
                data = json.loads(body)
            except ValueError as exc:
                raise PermanentSourceError(
                    f"{url} did not answer JSON ({body[:120]!r}); check the DVID server, uuid and instance",
                    url=url,
                ) from exc
            if not isinstance(data, dict):
                raise PermanentSourceError(
                    f"{url} answered {type(data).__name__}, not an info object", url=url
                )
            return data

        return retrying(
            once, what=f"GET {url}", policy=self.options.policy, transient=is_transient, logger=self.logger
        )

    def bounds(self, info: dict[str, Any] | None = None) -> tuple[ZYX, ZYX]:
        """(min_zyx, max_zyx), both inclusive; see :func:`parse_bounds`."""
        return parse_bounds(self.info() if info is None else info, self.info_url)

    def raw(self, offset_zyx: Sequence[int], size_zyx: Sequence[int]) -> np.ndarray:
        """The uint8 voxels of a box as a C-order (z, y, x) array, retried on transient faults.

        The body is streamed into one preallocated buffer (no second copy); a body of the wrong length is
        an error naming the URL and both lengths.
        """
        size = tuple(int(s) for s in size_zyx)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"size_zyx must be three positive integers, not {tuple(size_zyx)!r}")
        url = self.raw_url(offset_zyx, size)
        expected = size[0] * size[1] * size[2]

        def once() -> np.ndarray:
            buf = np.empty(expected, dtype=np.uint8)
            view = memoryview(buf)
            got = 0
            with self._get(url, stream=True) as r:
                for chunk in r.iter_content(self.options.read_bytes):
                    n = len(chunk)
                    if got + n > expected:
                        raise TransientSourceError(
                            f"{url}: body longer than the {expected} bytes a {size} uint8 box has", url=url
                        )
                    view[got : got + n] = chunk
                    got += n
            if got != expected:
                raise TransientSourceError(
                    f"{url}: body of {got} bytes, expected {expected} for a {size} (z,y,x) uint8 box", url=url
                )
            return buf.reshape(size)

        return retrying(
            once, what=f"GET {url}", policy=self.options.policy, transient=is_transient, logger=self.logger
        )
