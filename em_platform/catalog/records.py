"""Building dataset records: timestamps, ids, nested updates."""

from __future__ import annotations

import copy
import math
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np

SCHEMA_VERSION = "1.0"


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def new_record(
    source: str, source_id: str, description: str, files: list[dict[str, Any]], now: datetime
) -> dict[str, Any]:
    """A fresh record in status 'pending'."""
    return {
        "schema_version": SCHEMA_VERSION,
        "id": str(uuid.uuid4()),
        "source": source,
        "source_id": source_id,
        "status": "pending",
        "created_at": iso(now),
        "updated_at": iso(now),
        "metadata": {"core": {"description": description}},
        "files": {"source": files},
    }


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def ome_zarr_block(info: Any, uri: str) -> dict[str, Any]:
    """The record's ``metadata.ome_zarr`` from what the OME-Zarr writer reports."""
    return {
        "uri": uri,
        "ngff_version": str(info.ngff_version),
        "levels": [
            {"path": lv.path, "shape": [int(n) for n in lv.shape], "scale": [float(s) for s in lv.scale]}
            for lv in info.levels
        ],
        "axes": [
            {"name": a, "type": _AXIS_TYPES[a]} | ({"unit": u} if u else {})
            for a, u in zip(info.axes, info.units, strict=True)
        ],
        "chunks": [int(c) for c in info.chunks],
        "compressor": info.compressor,
    }


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars, tuples and non-finite floats made JSON-safe (header dumps)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)
