"""The Allen TEM (TilEM) acquisition protocol: the TEM_comms messages, validated and built.

A message is a Pydantic model of ``pigeon-tem-comms`` (``TEM_comms.topics`` maps topic -> model). This
module validates payloads against those models (what the listener does to every frame it receives) and
builds the messages the platform sends back — per-tile statistics, matches, ``tile.processed``,
``qc.tile``, ``qc.status``, ``buffer.status`` — as JSON-ready dicts, so a real pigeon service reads what
we send. How they travel (STOMP, pigeon's client, topic prefixes, credentials) is
:mod:`em_platform.tem.broker`. No Dagster here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from em_platform.stitch.grid import neighbour_of

__all__ = [  # and, read lazily through __getattr__: CONSUMED, TOPICS
    "PUBLISHED",
    "ProtocolError",
    "buffer_status",
    "decode",
    "match_message",
    "message_version",
    "model_for",
    "qc_status",
    "tile_messages",
    "tile_metadata",
    "validate",
]

log = logging.getLogger(__name__)

_CONSUMED_WANTED = ("tile.raw", "montage.start", "montage.status", "montage.complete")


@functools.cache
def _topics() -> Mapping[str, type[BaseModel]]:
    """TEM_comms' topics, imported on first use: TEM_comms imports pigeon, which reads every installed
    distribution's metadata (0.8 s the code location's start-up and every run paid before)."""
    import TEM_comms

    return TEM_comms.topics


def __getattr__(name: str) -> Any:
    # TOPICS: every topic the installed ``pigeon-tem-comms`` defines, with its model. CONSUMED: what the
    # platform reads from the microscope (``montage.start`` only when TEM_comms defines it; 2.7 does not).
    if name == "TOPICS":
        return _topics()
    if name == "CONSUMED":
        return tuple(t for t in _CONSUMED_WANTED if t in _topics())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PUBLISHED: tuple[str, ...] = (
    "tile.statistics.min_max_mean",
    "tile.statistics.histogram",
    "tile.statistics.focus",
    "tile.matches",
    "tile.processed",
    "qc.tile",
    "qc.status",
    "buffer.status",
)
"""What the platform sends back: per-tile results, QC verdicts (GOOD / STOP_AT_END / STOP_NOW), buffer state."""


class ProtocolError(ValueError):
    """A payload that is not a valid TEM_comms message for its topic; names the topic and the fields."""

    def __init__(self, topic: str, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.topic = topic
        self.fields = fields


# -- messages ------------------------------------------------------------------------------------------


def model_for(topic: str) -> type[BaseModel]:
    """The TEM_comms model of ``topic``; ProtocolError for a topic this TEM_comms version does not define."""
    try:
        return _topics()[topic]
    except KeyError:
        raise ProtocolError(
            topic,
            f"unknown TEM_comms topic {topic!r} (pigeon-tem-comms defines {len(_topics())} topics, "
            f"e.g. {', '.join(sorted(_topics())[:4])}, ...); check the topic name and the installed version",
        ) from None


def _protocol_error(topic: str, exc: ValidationError, what: str) -> ProtocolError:
    fields: list[str] = []
    problems: list[str] = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "(message)"
        fields.append(field)
        shown = err.get("input")
        got = "" if err.get("type") == "missing" else f" (got {shown!r:.60})"
        problems.append(f"field {field!r}: {err.get('msg')}{got}")
    return ProtocolError(
        topic,
        f"invalid {topic} {what} ({model_for(topic).__name__}): " + "; ".join(problems),
        tuple(fields),
    )


def validate(topic: str, payload: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    """Validate ``payload`` against the topic's TEM_comms model; the JSON-ready dict (``model_dump(mode="json")``).

    Raises :class:`ProtocolError` naming the topic and each bad field.
    """
    model = model_for(topic)
    if isinstance(payload, BaseModel):
        payload = payload.model_dump()
    if not isinstance(payload, Mapping):
        raise ProtocolError(
            topic, f"a {topic} message must be a mapping of fields, not {type(payload).__name__}"
        )
    try:
        return model.model_validate(dict(payload)).model_dump(mode="json")
    except ValidationError as exc:
        raise _protocol_error(topic, exc, "message") from exc


def decode(topic: str, body: str | bytes) -> dict[str, Any]:
    """A received frame body -> the JSON-ready dict, with pigeon's semantics (``Model.deserialize`` = JSON validation)."""
    model = model_for(topic)
    try:
        return model.model_validate_json(body).model_dump(mode="json")
    except ValidationError as exc:
        raise _protocol_error(topic, exc, "frame body") from exc
    except (TypeError, ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(topic, f"undecodable {topic} frame body: {exc}") from exc


def message_version(topic: str) -> str:
    """The installed message-package version pigeon puts in the ``version`` header of ``topic``."""
    from pigeon.utils import get_version

    return get_version(model_for(topic))


def buffer_status(queue_length: int, free_space: int, upload_rate: float) -> dict[str, Any]:
    """A validated ``buffer.status`` message, as the Allen tile upload buffer reports itself.

    ``queue_length``: tiles (objects) still waiting to upload; ``free_space``: bytes free on the buffer's
    disk; ``upload_rate``: bits per second. TEM_comms wants integers, so the rate is rounded.
    """
    return validate(
        "buffer.status",
        {"queue_length": int(queue_length), "free_space": int(free_space), "upload_rate": round(upload_rate)},
    )


# -- what the platform sends ------------------------------------------------------------------------------


_MATCH_FIELDS = (
    "row",
    "column",
    "dX",
    "dY",
    "dXsd",
    "dYsd",
    "distance",
    "rotation",
    "position",
    "pX",
    "pY",
    "qX",
    "qY",
)


def tile_metadata(
    tile_id: str,
    montage_id: str,
    row: int,
    column: int,
    overlap: int | None,
    stage_position: tuple[int | None, int | None] | None = None,
) -> dict[str, Any]:
    """The TEM_comms ``TileMetadata`` fields every ``tile.*`` and ``qc.tile`` message carries."""
    meta: dict[str, Any] = {
        "tile_id": tile_id,
        "montage_id": montage_id,
        "row": row,
        "column": column,
        "overlap": overlap or 0,
    }
    x, y = stage_position if stage_position is not None else (None, None)
    if x is not None and y is not None:
        meta["stage_position"] = [int(x), int(y)]
    return meta


def match_message(match: Mapping[str, Any], row: int, column: int) -> dict[str, Any]:
    """A measured match (TEM_comms ``Match`` fields plus quality figures) of the tile at (row, column) as
    the ``Match`` that ``tile.matches`` carries: the neighbour's row and column, float patch centres."""
    out = {k: match[k] for k in _MATCH_FIELDS if k in match}
    r, c = neighbour_of(row, column, match["position"])
    out.setdefault("row", r)
    out.setdefault("column", c)
    for k in ("pX", "pY", "qX", "qY"):
        out[k] = [float(v) for v in out.get(k, [])]
    return out


def tile_messages(
    meta: Mapping[str, Any],
    stats: Mapping[str, Any] | None,
    focus: float | None,
    matches: Iterable[Mapping[str, Any]],
    processed_path: str | None,
    passed: bool,
    faults: list[dict[str, Any]],
) -> list[tuple[str, dict[str, Any]]]:
    """Everything the platform says about one judged tile, in the order TEM_graph and QC send it:
    statistics (min/max/mean/std, histogram, focus), matches, ``tile.processed``, then ``qc.tile``.
    A tile that could not be processed gets its ``qc.tile`` only."""
    out: list[tuple[str, dict[str, Any]]] = []
    if stats is not None:
        out += [
            (
                "tile.statistics.min_max_mean",
                {
                    **meta,
                    "min": stats["min"],
                    "max": stats["max"],
                    "mean": stats["mean"],
                    "std": stats["std"],
                },
            ),
            ("tile.statistics.histogram", {**meta, "hist": list(stats["histogram"])}),
            ("tile.statistics.focus", {**meta, "focus": float(focus or 0.0)}),
        ]
        found = [match_message(m, meta["row"], meta["column"]) for m in matches]
        if found:
            out.append(("tile.matches", {**meta, "matches": found}))
        if processed_path:
            out.append(("tile.processed", {**meta, "path": processed_path}))
    out.append(("qc.tile", {**meta, "passed": passed, "faults": faults}))
    return out


def qc_status(status: str, reason: str | None) -> dict[str, Any]:
    """A ``qc.status``: GOOD / STOP_AT_END / STOP_NOW with the reason (always given when not GOOD)."""
    return {"status": status, "reason": reason}
