"""The settle loop of the sensors that watch folders (the local inbox, the cryo sessions), without Dagster.

A sensor's cursor is a JSON object, entry key → fingerprint of what it last requested (or dead-lettered): an
unchanged entry is skipped, a changed one is requested again, an entry still being written (changed within
the settle period) waits for a later tick, and a refused one is handed back to be dead-lettered once (again
only if it changes). A key whose entry is gone leaves the cursor, so an entry that comes back is requested.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["SettleResult", "WatchedEntry", "settle_entries"]


@dataclass(frozen=True)
class WatchedEntry(Generic[T]):
    """One entry a sensor found: its key, its fingerprint, what it is (``item``), and whether it is refused."""

    key: str
    fingerprint: str
    item: T
    refused: bool = False


@dataclass
class SettleResult(Generic[T]):
    """What one tick does: request ``requested``, dead-letter ``refused``, and save :meth:`cursor_json`."""

    cursor: dict[str, str]
    requested: list[WatchedEntry[T]] = field(default_factory=list)  # changed and settled, at most ``limit``
    refused: list[WatchedEntry[T]] = field(default_factory=list)  # changed and refused by the edge checks
    waiting: list[str] = field(default_factory=list)  # keys changed within the settle period

    def cursor_json(self) -> str:
        return json.dumps(self.cursor, sort_keys=True)


def settle_entries(
    cursor: str | None,
    entries: Iterable[WatchedEntry[T]],
    *,
    settled: Callable[[T], bool],
    limit: int,
) -> SettleResult[T]:
    """This tick's decisions over ``entries`` in their order, given the last tick's ``cursor``.

    ``settled(item)`` is asked only of changed entries (it may look at the files). The loop stops at the
    ``limit``-th request: the entries after it are left for the next tick, their cursor unchanged.
    """
    entries = list(entries)
    seen: dict[str, Any] = json.loads(cursor) if cursor else {}
    present = {e.key for e in entries}
    result: SettleResult[T] = SettleResult({k: v for k, v in seen.items() if k in present})
    for entry in entries:
        if result.cursor.get(entry.key) == entry.fingerprint:
            continue
        if entry.refused:
            result.refused.append(entry)
            result.cursor[entry.key] = entry.fingerprint
            continue
        if not settled(entry.item):
            result.waiting.append(entry.key)
            continue
        if len(result.requested) >= limit:
            break
        result.requested.append(entry)
        result.cursor[entry.key] = entry.fingerprint
    return result
