"""How long the platform keeps what grows with every montage, run and refusal, from the environment.

A facility's year is some 10⁵ montages, 10⁸ tiles and 10⁵ runs. Kept for ever, the acquisition journal alone
grows by about 10 kB a tile (every message, with each tile's statistics and matches), and every montage stays
a partition of Dagster's ``montages``, whose pages slow with the count. What the platform keeps, and for how
long (each a number of days, or ``forever``):

``EM_RETAIN_JOURNAL_DAYS`` (default 14)
    an archived montage (its catalog record ``complete``: uploaded, its tile records written) keeps its journal
    rows (messages, tiles, QC statuses) and its partition of ``montages`` this long after it was archived; then
    both go, and the catalog answers for it. A montage not archived (in flight, failed) is never let go. Within
    the window a montage can be run again from its journal; later its raw tiles and tile records remain.
``EM_RETAIN_RUNS_DAYS`` (default 90)
    a finished run is kept this long after it ended, and longer while it holds something still shown: a run of
    a partition that still exists, or the latest materialization of an unpartitioned asset.
``EM_RETAIN_DEAD_LETTERS_DAYS`` (default 90)
    a dead letter an operator cleared or replayed is kept this long after; one waiting for a decision, always.
``EM_RETAIN_BUFFER_DAYS`` (default 14)
    a finished montage's folder in the acquisition buffer (``EM_BUFFER``) nothing has written to, and no run of
    it has touched, this long: an archived montage's goes once its archive verifies against the upload
    manifest; a montage never archived goes only while its raw tiles are still where the journal names them
    (a re-run makes it again), else it is kept as the only copy (:mod:`.buffer`).
``EM_RETAIN_CRYO_INTERMEDIATES_DAYS`` (default 14)
    a finished tilt series' re-makeable working files (the even/odd frame sums, the aligned stack, what a
    killed run left) this long after it finished; its products stay (:mod:`.cryo`).
``EM_RETAIN_TILE_RECORDS_DAYS`` (default ``forever``)
    an archived montage's tile records (``tem_tiles``); its catalog record and archived objects stay.

The catalog's records are what the platform produced: kept. Dagster's sensor and schedule ticks are purged by
Dagster itself (``retention`` in both ``dagster.yaml`` files). ``docs/retention.md`` has every store in one table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

FOREVER = math.inf
SETTINGS = {
    "journal_days": ("EM_RETAIN_JOURNAL_DAYS", 14.0),
    "runs_days": ("EM_RETAIN_RUNS_DAYS", 90.0),
    "dead_letters_days": ("EM_RETAIN_DEAD_LETTERS_DAYS", 90.0),
    "buffer_days": ("EM_RETAIN_BUFFER_DAYS", 14.0),
    "cryo_intermediates_days": ("EM_RETAIN_CRYO_INTERMEDIATES_DAYS", 14.0),
    "tile_records_days": ("EM_RETAIN_TILE_RECORDS_DAYS", FOREVER),
}


class RetentionError(ValueError):
    """A retention setting is not a number of days; the message names the variable."""


@dataclass(frozen=True)
class RetentionPolicy:
    journal_days: float = SETTINGS["journal_days"][1]
    runs_days: float = SETTINGS["runs_days"][1]
    dead_letters_days: float = SETTINGS["dead_letters_days"][1]
    buffer_days: float = SETTINGS["buffer_days"][1]
    cryo_intermediates_days: float = SETTINGS["cryo_intermediates_days"][1]
    tile_records_days: float = SETTINGS["tile_records_days"][1]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RetentionPolicy:
        env = os.environ if env is None else env
        values = {}
        for field, (name, default) in SETTINGS.items():
            raw = env.get(name, "").strip()
            values[field] = default if not raw else _days(name, raw)
        return cls(**values)

    def cutoff(self, days: float, now: datetime | None = None) -> datetime | None:
        """The moment before which something kept ``days`` is let go; None when it is kept for ever."""
        if days == FOREVER:
            return None
        return (now or datetime.now(UTC)) - timedelta(days=days)


def _days(name: str, raw: str) -> float:
    if raw.lower() == "forever":
        return FOREVER
    try:
        days = float(raw)
    except ValueError:
        days = -1.0
    if not math.isfinite(days) or days < 1:
        raise RetentionError(f"{name}={raw!r}: a number of days (at least 1), or 'forever'")
    return days
