"""The trust boundary: every name and path that arrives from outside the process is checked here, once.

Outside means: a STOMP message from the microscope, an inbox entry (symlinks included), a partition key or
dataset id in a run request, a file name in a remote listing, a CLI argument, a session folder. Each entry
point calls this module before it builds a path, a storage key or a database row from such a value; a value
that does not pass raises :class:`Refused` naming the field, the value and the reason, and the entry point
dead-letters it (``em_platform.catalog.dead_letters``) instead of dropping it.

The rules (README "Trust boundaries" documents them for operators):

- ids from the wire match :data:`MONTAGE_ID`, :data:`TILE_ID`, :data:`DATASET_ID`: ASCII letters, digits,
  ``.``, ``_``, ``-``; starting with a letter or digit; no ``..``; bounded length (64 where the journal
  stores them in 64-character columns). Names taken from files (inbox entries, session folders) are
  :func:`check_file_name` / :func:`check_relative_key`: any printable name, but one path component each.
- :func:`inside` joins parts under a root and resolves the result (symlinks followed): it must stay inside
  the resolved root. :func:`join_key` does the same for object-store keys (no ``..``, no absolute part).
- :func:`under_shares`: a raw tile's path must resolve inside one of the scope's shares (an allow-list).
- sizes from the microscope (:class:`MontageBounds`): a montage's rows, columns and planned tiles, and the
  stage positions of its tiles, stay within operator settings (``EM_MONTAGE_MAX_GRID``, ``EM_STAGE_MAX_NM``),
  since they size what the platform allocates per montage (focus map, missing-tile listing, fused canvas).

Standard library only, so every layer (domain, sensors, CLI) can import it.
"""

from __future__ import annotations

import operator
import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ACQUISITION_ID",
    "DATASET_ID",
    "MONTAGE_ID",
    "TILE_ID",
    "MONTAGE_MAX_GRID",
    "STAGE_MAX_NM",
    "IdKind",
    "MontageBounds",
    "Refused",
    "check_file_name",
    "check_relative_key",
    "check_tem_message",
    "inside",
    "join_key",
    "under_shares",
]

_SHOWN = 200  # characters of a refused value kept in messages (the dead letter keeps the whole body)


class Refused(ValueError):
    """A name or path from outside that fails its check: which field, which value, why."""

    def __init__(self, field: str, value: Any, reason: str):
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field} {str(value)[:_SHOWN]!r} refused: {reason}")


@dataclass(frozen=True)
class IdKind:
    """A kind of id and its pattern; :meth:`check` returns the id or raises :class:`Refused`."""

    name: str
    pattern: re.Pattern[str]
    rule: str  # the pattern in words, for the refusal and the README

    def check(self, value: Any, field: str | None = None) -> str:
        field = field or self.name
        if not isinstance(value, str):
            raise Refused(field, value, f"a {self.name} must be a string, not {type(value).__name__}")
        if not self.pattern.fullmatch(value):
            raise Refused(field, value, f"not a valid {self.name}: {self.rule}")
        return value


def _id_kind(name: str, max_len: int) -> IdKind:
    return IdKind(
        name,
        re.compile(rf"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{{0,{max_len - 1}}}"),
        f"1-{max_len} ASCII letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'",
    )


MONTAGE_ID = _id_kind("montage id", 64)  # acq_montages.montage_id is String(64); names the buffer folder
TILE_ID = _id_kind("tile id", 64)
ACQUISITION_ID = _id_kind("acquisition id", 64)
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
DATASET_ID = IdKind(  # public-ingest partitions, e.g. 11759, jrc_hela-2/fibsem-uint16/s4
    "dataset id",
    re.compile(rf"(?=.{{1,128}}$)(?!.*\.\.){_SEGMENT}(/{_SEGMENT})*"),
    "1-128 ASCII letters, digits, '.', '_', '-' and '/' between segments that start with a letter or "
    "digit, without '..'",
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_NAME_BYTES = 255  # one file name on every common file system


def check_file_name(value: Any, field: str = "name") -> str:
    """One path component taken from a file system or a request: a file or folder name, nothing more.

    Refused: empty, ``.`` / ``..``, hidden (leading ``.``), a separator (``/`` or ``\\``), a control character,
    ``...`` (Dagster refuses it in partition keys), more than 255 bytes.
    """
    if not isinstance(value, str) or not value:
        raise Refused(field, value, "must be a non-empty file name")
    if value in (".", "..") or value.startswith("."):
        raise Refused(field, value, "must not be '.', '..' or a hidden name")
    if "/" in value or "\\" in value:
        raise Refused(field, value, "must be one file name, without '/' or '\\'")
    if _CONTROL.search(value) or "..." in value:
        raise Refused(field, value, "must not contain control characters or '...'")
    if len(value.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        raise Refused(field, value, f"longer than {_MAX_NAME_BYTES} bytes")
    return value


def check_relative_key(value: Any, field: str = "key", max_len: int = 1024) -> str:
    """A ``/``-separated key made of file names (e.g. a cryo series ``sessions/grid1/ts_01``)."""
    if not isinstance(value, str) or not value:
        raise Refused(field, value, "must be a non-empty key")
    if len(value) > max_len:
        raise Refused(field, value, f"longer than {max_len} characters")
    for part in value.split("/"):
        try:
            check_file_name(part, field)
        except Refused as exc:
            raise Refused(field, value, f"segment {part!r}: {exc.reason}") from None
    return value


def inside(root: str | os.PathLike[str], *parts: str | os.PathLike[str], field: str = "path") -> Path:
    """``root / parts``, resolved (symlinks followed), refused unless it stays inside the resolved root.

    An absolute part, a ``..`` that climbs out, or a symlink on the way that points elsewhere all land
    outside and are refused. The result is the resolved path (what will actually be opened).
    """
    base = Path(root).resolve()
    for p in parts:
        if "\x00" in os.fspath(p):
            raise Refused(field, p, "contains a NUL byte")
    target = base.joinpath(*parts).resolve()
    if target != base and not target.is_relative_to(base):
        shown = os.fspath(Path(*parts)) if parts else ""
        raise Refused(field, shown, f"resolves to {target}, outside {base}")
    return target


def join_key(prefix: str, *parts: str, field: str = "key") -> str:
    """An object-store key (or local path) of ``parts`` under ``prefix``, each part checked lexically.

    Parts may hold ``/`` (e.g. ``acquisition/<montage>``); no part may be absolute, and no segment empty,
    ``.`` or ``..``, or hold ``\\`` or a control character: the key cannot leave the prefix on S3 (which has
    no ``..``, so it would be a key with ``..`` in it) nor on a local disk.
    """
    segments: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise Refused(field, part, f"a key part must be a string, not {type(part).__name__}")
        if part.startswith("/"):
            raise Refused(field, part, "is absolute; a key part must be relative to its prefix")
        for seg in part.split("/"):
            if seg in ("", ".", "..") or "\\" in seg or _CONTROL.search(seg):
                raise Refused(
                    field, part, f"segment {seg!r} is not allowed in a storage key (empty, '.', '..', '\\')"
                )
            segments.append(seg)
    if not segments:
        return prefix
    return posixpath.join(prefix, *segments)


def under_shares(path: Any, shares: Iterable[str | os.PathLike[str]], field: str = "path") -> Path:
    """A raw tile's path, resolved (symlinks followed), refused unless inside one of the scope ``shares``."""
    roots = [Path(s).resolve() for s in shares]
    if not isinstance(path, str) or not path:
        raise Refused(field, path, "must be a non-empty path")
    if "\x00" in path:
        raise Refused(field, path, "contains a NUL byte")
    p = Path(path)
    if not p.is_absolute():
        raise Refused(field, path, "must be an absolute path on a scope share")
    if not roots:
        raise Refused(field, path, "no scope share is configured (set EM_SCOPE_SHARES)")
    resolved = p.resolve()
    if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
        where = os.pathsep.join(str(r) for r in roots)
        extra = f" (it resolves to {resolved})" if resolved != p else ""
        raise Refused(field, path, f"not under a scope share{extra}; allowed: {where} (EM_SCOPE_SHARES)")
    return resolved


# -- sizes from the microscope ------------------------------------------------------------------------------

MONTAGE_MAX_GRID = 256
"""Rows and columns a montage may have, each (``EM_MONTAGE_MAX_GRID``); planned tiles at most its square.

The Allen TEMCA montages are about 70 × 70 tiles: 256 leaves more than 3× that on each side, while the
per-montage tables a grid sizes (focus map, missing-tile listing) stay at 65,536 cells. Unbounded, one
``tile.raw`` at row 100000 made the focus map ask for 28 GiB."""

STAGE_MAX_NM = 10_000_000
"""How far from the stage origin a tile's stage position may lie on either axis, nm (``EM_STAGE_MAX_NM``).

10 mm: a TEM specimen stage travels about ±1 mm around the beam (a 3.05 mm grid), so this leaves room for a
custom stage, while a stray reading can stretch the fused canvas to at most 20 mm a side (5 M px at 4 nm/px,
a few times the largest montage: 256 tiles of 8k px) and positions stay inside the journal's 32-bit columns."""


def _whole_number(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise Refused(field, value, "must be a whole number, not a boolean")
    try:
        return operator.index(value)
    except TypeError:
        raise Refused(field, value, f"must be a whole number, not {type(value).__name__}") from None


@dataclass(frozen=True)
class MontageBounds:
    """The largest montage the platform accepts from the microscope: a message past it is refused (and
    dead-lettered) before anything is allocated from it. See :data:`MONTAGE_MAX_GRID`, :data:`STAGE_MAX_NM`."""

    max_grid: int = MONTAGE_MAX_GRID
    max_stage_nm: int = STAGE_MAX_NM

    @property
    def max_tiles(self) -> int:
        return self.max_grid * self.max_grid

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MontageBounds:
        """``EM_MONTAGE_MAX_GRID`` and ``EM_STAGE_MAX_NM`` (unset: the defaults); ValueError naming a bad one."""
        env = os.environ if env is None else env
        return cls(
            _setting(env, "EM_MONTAGE_MAX_GRID", MONTAGE_MAX_GRID, "tiles per side of the largest montage"),
            _setting(env, "EM_STAGE_MAX_NM", STAGE_MAX_NM, "nm from the stage origin"),
        )

    def index(self, value: Any, field: str, what: str, *, lowest: int = 0) -> int:
        """A row or column: ``lowest`` (0; -1 for a reference frame, which lies on no raster) up to
        ``max_grid`` - 1."""
        n = _whole_number(value, field)
        if not lowest <= n < self.max_grid:
            raise Refused(
                field,
                value,
                f"outside {lowest} to {self.max_grid - 1}: a montage has at most {self.max_grid} {what} "
                "(EM_MONTAGE_MAX_GRID; raise it for a larger montage)",
            )
        return n

    def tile_count(self, value: Any, field: str) -> int:
        n = _whole_number(value, field)
        if not 0 <= n <= self.max_tiles:
            raise Refused(
                field,
                value,
                f"outside 0 to {self.max_tiles}: a montage has at most {self.max_grid} × {self.max_grid} "
                "tiles (EM_MONTAGE_MAX_GRID; raise it for a larger montage)",
            )
        return n

    def stage_position(self, value: Any, field: str) -> None:
        """An (x, y) stage position in nm, each within ±``max_stage_nm``; None (not reported) passes."""
        if value is None:
            return
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise Refused(field, value, "must be an (x, y) pair of nanometres")
        for v in value:
            if abs(_whole_number(v, field)) > self.max_stage_nm:
                raise Refused(
                    field,
                    value,
                    f"farther than {self.max_stage_nm} nm from the stage origin (EM_STAGE_MAX_NM; raise it "
                    "for a stage that travels further)",
                )


def _setting(env: Mapping[str, str], name: str, default: int, what: str) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name}={raw!r} must be a whole number ≥ 1 ({what}; default {default})")
    return int(raw)


_REFERENCE_FLAGS = ("brightfield", "darkfield", "lens_correction")


def _check_sizes(topic: str, payload: Mapping[str, Any], bounds: MontageBounds) -> None:
    """The sizes of one microscope message within ``bounds`` (the fields TEM_comms leaves unbounded)."""
    if topic == "tile.raw" and payload.get("montage_id"):  # a UI or calibration frame joins no montage
        # brightfield, darkfield and lens-correction frames come at row = column = -1 (pyTEM's Acquisition)
        lowest = -1 if any(payload.get(k) for k in _REFERENCE_FLAGS) else 0
        bounds.index(payload.get("row"), "row", "rows", lowest=lowest)
        bounds.index(payload.get("column"), "column", "columns", lowest=lowest)
        bounds.stage_position(payload.get("stage_position"), "stage_position")
    elif topic == "montage.status" and payload.get("total_tiles") is not None:
        bounds.tile_count(payload["total_tiles"], "total_tiles")
    elif topic == "montage.complete":
        tiles = payload.get("tiles") or {}
        bounds.tile_count(len(tiles), "tiles")
        for tile_id, tile in tiles.items():
            where = f"tiles.{tile_id}"
            if not isinstance(tile, Mapping):
                raise Refused(where, tile, "must be a tile's metadata")
            position = tile.get("raster_position")  # TEM_comms: (x, y) = (column, row)
            if position is not None:
                if not isinstance(position, list | tuple) or len(position) != 2:
                    raise Refused(f"{where}.raster_position", position, "must be a (column, row) pair")
                bounds.index(position[0], f"{where}.raster_position", "columns")
                bounds.index(position[1], f"{where}.raster_position", "rows")
            bounds.stage_position(tile.get("stage_position"), f"{where}.stage_position")


# -- the microscope's messages ------------------------------------------------------------------------------

# The fields of consumed TEM_comms messages that name something the platform builds paths, keys or rows from.
_TEM_IDS: Mapping[str, Mapping[str, IdKind]] = {
    "tile.raw": {"tile_id": TILE_ID, "montage_id": MONTAGE_ID},
    "montage.start": {"montage_id": MONTAGE_ID},
    "montage.status": {"montage_id": MONTAGE_ID},
    "montage.complete": {"montage_id": MONTAGE_ID, "acquisition_id": ACQUISITION_ID},
}

_MAY_BE_EMPTY = {("tile.raw", "montage_id"), ("montage.complete", "acquisition_id")}


def check_tem_message(
    topic: str,
    payload: Mapping[str, Any],
    tile_shares: Iterable[str | os.PathLike[str]] | None = None,
    bounds: MontageBounds = MontageBounds(),
) -> None:
    """Check the ids, the sizes (``bounds``) and, with ``tile_shares``, the tile path of one microscope
    message; :class:`Refused` naming the field, the value and the rule or bound.

    A ``tile.raw`` with an empty ``montage_id`` (a UI or calibration frame, not part of a montage) and an
    empty ``acquisition_id`` pass the id check. ``tile_shares`` None skips the path check (a library
    caller that trusts its source).
    """
    for name, kind in _TEM_IDS.get(topic, {}).items():
        value = payload.get(name)
        if value is None or (value == "" and (topic, name) in _MAY_BE_EMPTY):
            continue
        kind.check(value, name)
    if topic == "montage.complete":
        for tile_id in (payload.get("tiles") or {}).keys():
            TILE_ID.check(tile_id, "tiles")
    _check_sizes(topic, payload, bounds)
    if topic == "tile.raw" and tile_shares is not None:
        under_shares(payload.get("path"), tile_shares, "path")
