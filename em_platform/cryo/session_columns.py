"""A live session's exposures read once into numpy columns, and what the report says of them: the summary,
the rejecting rules, the worst exposures, and the values written as text.

After the mappings are read, nothing is done exposure by exposure, so a session of tens of thousands of
exposures is summarised and drawn in seconds. Times are shown in the time zone of ``now``; defocus is
positive for underfocus.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

import numpy as np

NO_RULE = "(no rule given)"  # a rejection whose rule is not recorded, as the report names it


# ---------------------------------------------------------------------------------------------- the columns


@dataclass(frozen=True)
class SessionColumns:
    """The exposures as columns: times in Unix seconds, NaN where the mapping holds None."""

    exposures: Sequence[Mapping[str, Any]]
    now: float
    tz: tzinfo
    acquired: np.ndarray
    processed: np.ndarray
    status: np.ndarray
    verdict: np.ndarray  # 1 accepted, 0 rejected, -1 not yet judged
    total_motion: np.ndarray
    early_motion: np.ndarray
    defocus_um: np.ndarray  # mean of U and V
    astigmatism: np.ndarray
    resolution: np.ndarray
    figure_of_merit: np.ndarray
    ice: np.ndarray

    @property
    def n(self) -> int:
        return len(self.exposures)

    def count(self, status: str) -> int:
        return int(np.count_nonzero(self.status == status))


def read_columns(exposures: Sequence[Mapping[str, Any]], now: datetime) -> SessionColumns:
    """The columns every part of the report reads; the one pass over the mappings."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")
    n = len(exposures)

    def column(field: str) -> np.ndarray:
        return np.fromiter((as_number(e.get(field)) for e in exposures), np.float64, n)

    def times(field: str, required: bool) -> np.ndarray:
        return np.fromiter((_epoch(e, field, required) for e in exposures), np.float64, n)

    defocus_u, defocus_v = column("defocus_u_a"), column("defocus_v_a")
    return SessionColumns(
        exposures=exposures,
        now=now.timestamp(),
        tz=now.tzinfo,
        acquired=times("acquired_at", True),
        processed=times("processed_at", False),
        status=np.array([str(e.get("status") or "") for e in exposures], dtype=str).reshape(n),
        verdict=np.fromiter((_verdict(e.get("accepted")) for e in exposures), np.int8, n),
        total_motion=column("total_motion_a"),
        early_motion=column("early_motion_a"),
        defocus_um=(defocus_u + defocus_v) / 2e4,
        astigmatism=column("astigmatism_a"),
        resolution=column("ctf_fit_resolution_a"),
        figure_of_merit=column("ctf_figure_of_merit"),
        ice=column("ice_ring_density"),
    )


def as_number(value: Any) -> float:
    """A float, NaN for None or text: exposures and thresholds hold whatever the pipeline or operator gave."""
    if value is None:
        return np.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def _verdict(accepted: Any) -> int:
    return -1 if accepted is None else int(bool(accepted))


def _epoch(exposure: Mapping[str, Any], field: str, required: bool) -> float:
    """Unix seconds; a naive datetime would be read in this machine's zone and shift the session silently."""
    value = exposure.get(field)
    if value is None and not required:
        return np.nan
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"exposure {exposure.get('movie')!r}: {field} must be a timezone-aware datetime, got {value!r}"
        )
    return value.timestamp()


# -------------------------------------------------------------------------------------------- the summary


@dataclass(frozen=True)
class ReportContent:
    """What the HTML and the PDF both say of a session, computed once for the two."""

    session: str
    columns: SessionColumns
    thresholds: Mapping[str, Any]
    summary: list[Stat]
    reasons: list[tuple[str, int]]  # rejecting rules, most frequent first
    worst: list[int]  # indices into ``columns``, worst first


def report_content(
    session: str,
    exposures: Sequence[Mapping[str, Any]],
    thresholds: Mapping[str, Any],
    now: datetime,
    worst: int,
) -> ReportContent:
    """The session's columns and what is said of them, with the ``worst`` worst exposures."""
    s = read_columns(exposures, now)
    return ReportContent(session, s, thresholds, _summarise(s), rejection_reasons(s), _worst(s, worst))


@dataclass(frozen=True)
class Stat:
    """One tile of the summary, drawn by the HTML and listed by the PDF."""

    key: str
    label: str
    value: float | None
    text: str
    tone: str = ""


def _summarise(s: SessionColumns) -> list[Stat]:
    """The tiles at the top of the report; ``value`` is the raw number (an element's ``data-value``).

    Acceptance is of the judged exposures. The session's rate is per hour since its first exposure, up to
    now: a stall lowers it. The lag counts every exposure with a ``processed_at``, failed ones too: the time
    taken to give up on a movie delays the queue all the same."""
    accepted = int(np.count_nonzero(s.verdict == 1))
    rejected = int(np.count_nonzero(s.verdict == 0))
    judged = accepted + rejected
    acceptance = 100.0 * accepted / judged if judged else None
    last_hour = int(np.count_nonzero((s.acquired > s.now - 3600) & (s.acquired <= s.now)))
    span_h = (s.now - float(s.acquired.min())) / 3600 if s.n else 0.0
    per_hour = s.n / span_h if span_h > 0 else None
    lags = (s.processed - s.acquired)[np.isfinite(s.processed)]
    p50, p95, worst = (
        (float(np.percentile(lags, 50)), float(np.percentile(lags, 95)), float(lags.max()))
        if lags.size
        else (None, None, None)
    )
    pending = np.isin(s.status, ("waiting", "processing"))
    oldest = float(s.now - s.acquired[pending].min()) if pending.any() else None
    failed = s.count("failed")

    def count(key: str, label: str, value: int, tone: str = "") -> Stat:
        return Stat(key, label, value, f"{value:,}", tone)

    def duration(key: str, label: str, value: float | None) -> Stat:
        return Stat(key, label, value, _duration(value))

    return [
        count("acquired", "acquired", s.n),
        count("processed", "processed", s.count("processed")),
        count("accepted", "accepted", accepted, "ok"),
        count("rejected", "rejected", rejected, "bad" if rejected else ""),
        Stat("acceptance", "acceptance", acceptance, "—" if acceptance is None else f"{acceptance:.1f} %"),
        count("failed", "failed", failed, "bad" if failed else ""),
        count("waiting", "waiting", s.count("waiting")),
        count("processing", "processing", s.count("processing")),
        Stat("rate-last-hour", "last hour", float(last_hour), f"{last_hour:,} / h"),
        Stat("rate-session", "whole session", per_hour, _rate(per_hour)),
        duration("lag-p50", "lag, median", p50),
        duration("lag-p95", "lag, p95", p95),
        duration("lag-max", "lag, max", worst),
        duration("oldest-pending", "oldest pending", oldest),
    ]


def _rate(per_hour: float | None) -> str:
    if per_hour is None:
        return "—"
    return f"{per_hour:,.0f} / h" if per_hour >= 100 else f"{per_hour:.1f} / h"


def _duration(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "—"
    if abs(seconds) < 90:
        return f"{seconds:.0f} s"
    if abs(seconds) < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def rejection_reasons(s: SessionColumns) -> list[tuple[str, int]]:
    """Rejecting rules, most frequent first (then by name, so equal counts keep a stable order)."""
    counts = Counter(
        str(s.exposures[int(i)].get("rejected_by") or NO_RULE) for i in np.flatnonzero(s.verdict == 0)
    )
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _worst(s: SessionColumns, k: int) -> list[int]:
    """Indices of the ``k`` worst processed exposures: rejected first, then the worst (largest) CTF fit
    resolution, then the most motion; a missing figure ranks after every present one."""
    candidates = np.flatnonzero(s.status == "processed")
    if k <= 0 or candidates.size == 0:
        return []
    resolution = np.where(np.isnan(s.resolution[candidates]), np.inf, -s.resolution[candidates])
    motion = np.where(np.isnan(s.total_motion[candidates]), np.inf, -s.total_motion[candidates])
    not_rejected = s.verdict[candidates] != 0
    order = np.lexsort((motion, resolution, not_rejected))
    return [int(i) for i in candidates[order[:k]]]


# ------------------------------------------------------------------------------------- the values as text


def clock(seconds: float, tz: tzinfo) -> str:
    """A time as both files print it, in the session's zone."""
    return datetime.fromtimestamp(seconds, tz).strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def fmt(value: float, template: str) -> str:
    """A column's value as both files print it; a dash where it is missing."""
    return template.format(value) if np.isfinite(value) else "—"


def given(value: Any) -> str:
    """A threshold as the operator gave it (a range as ``[lo, hi]``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def shorten(text: str, width: int) -> str:
    """At most ``width`` characters, for the figures' and the PDF's fixed room."""
    return text if len(text) <= width else text[: width - 1] + "…"
