"""The report of a live single-particle session: what the staff scientist reads beside the microscope.

Each exposure of a session is motion-corrected and CTF-fitted as it lands, then accepted or rejected against
the operator's thresholds (as CryoSPARC Live, Warp and cryoem-services do). During a 48-hour session the
report answers four questions: does the processing keep up (counts, rates, processing lag), is the data good
(defocus, CTF fit resolution and motion against time), why are exposures thrown away (the rejecting rules),
and what do the worst ones look like (micrograph and power spectrum side by side).

One set of figures makes two files: ``report.html``, self-contained (figures and pictures as ``data:`` URIs, no
script, a Content-Security-Policy that forbids any request, so it opens the same mailed or on a machine off the
facility network), and ``report.pdf`` for the session's record. The columns are numpy arrays: after the
mappings are read once, nothing is done exposure by exposure, so a session of tens of thousands of exposures
draws in seconds. Dense scatter plots are rasterised in the PDF, which keeps it small.

Times are shown in the time zone of ``now``; defocus is positive for underfocus.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

import numpy as np

FIGURES = ("progress", "defocus", "resolution", "motion_histogram", "resolution_histogram", "reasons")
FIGURE_TITLES = {
    "progress": "Exposures, cumulative",
    "defocus": "Defocus",
    "resolution": "CTF fit resolution",
    "motion_histogram": "Total motion",
    "resolution_histogram": "CTF fit resolution, all processed",
    "reasons": "Why exposures were rejected",
}
FAILED_SHOWN = 200  # newest first: a session whose every movie fails must not make a report of megabytes
PICTURE_SIDE = 480  # micrographs and spectra are shrunk to this many pixels a side before embedding
NO_RULE = "(no rule given)"

_DPI = 110
_ROW_H = 0.026  # a PDF table's row, in fractions of an A4 page's height
_PDF_ROWS = 24  # rows of a PDF table before the rest is only counted
_SIZE = (6.2, 3.3)
_INK, _MUTED = "#1f2937", "#6b7280"
_ACQUIRED, _PROCESSED = "#3b6ea5", "#8a6bb8"
_ACCEPTED, _REJECTED, _UNJUDGED = "#2e7d4f", "#c0392b", "#9aa3ad"
_STYLE = {
    "font.size": 9,
    "axes.labelcolor": _INK,
    "axes.edgecolor": "#b8bec6",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e6e8eb",
    "grid.linewidth": 0.8,
    "xtick.color": _MUTED,
    "ytick.color": _MUTED,
    "legend.frameon": False,
    "legend.fontsize": 8,
}


def session_plots(
    exposures: Sequence[Mapping[str, Any]], now: datetime, thresholds: Mapping[str, Any] | None = None
) -> dict[str, bytes]:
    """PNG figures by name: "progress" (exposures acquired, processed and accepted, cumulative, against time),
    "defocus" (defocus (mean of U and V, µm) against acquisition time, accepted and rejected marked apart),
    "resolution" (CTF fit resolution (Å) against time), "motion_histogram" (total motion, Å),
    "resolution_histogram", "reasons" (counts of the rejecting rules, horizontal bars).

    With ``thresholds`` the operator's limits are drawn on the figures they bound (the defocus range, the
    largest CTF fit resolution and total motion), so a drift towards a limit shows before it rejects.
    """
    session = _read(exposures, now)
    with _style():
        figures, _ = _figures(session, thresholds or {})
        return {name: _png(fig) for name, fig in figures.items()}


def write_session_report(
    out: Path,
    session: str,
    exposures: Sequence[Mapping[str, Any]],
    thresholds: Mapping[str, Any],
    now: datetime,
    worst: int = 6,
) -> Path:
    """out/report.html (self-contained: figures and thumbnails embedded as data: URIs, no JavaScript, no
    network), and out/report.pdf (matplotlib's PdfPages: the same figures and the summary table). Returns the
    HTML's path. Written atomically (temporary file, then rename).

    The PDF is renamed into place before the HTML: the HTML is never newer than the PDF beside it.
    """
    out = Path(out)
    thresholds = thresholds or {}
    data = _read(exposures, now)
    out.mkdir(parents=True, exist_ok=True)
    summary = _summarise(data)
    reasons = _reasons(data)
    worst_rows = _worst(data, worst)
    with _style():
        figures, empty = _figures(data, thresholds)
        pngs = {name: _png(fig) for name, fig in figures.items()}
        drawn = {name: fig for name, fig in figures.items() if name not in empty}
        _replace_atomically(
            out / "report.pdf",
            lambda tmp: _write_pdf(tmp, session, data, summary, thresholds, reasons, worst_rows, drawn),
        )
    page = _html(session, data, summary, thresholds, reasons, worst_rows, pngs)
    target = out / "report.html"
    _replace_atomically(target, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return target


# ---------------------------------------------------------------------------------------------- the columns


@dataclass(frozen=True)
class _Session:
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


def _read(exposures: Sequence[Mapping[str, Any]], now: datetime) -> _Session:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")
    n = len(exposures)

    def column(field: str) -> np.ndarray:
        return np.fromiter((_number(e.get(field)) for e in exposures), np.float64, n)

    def times(field: str, required: bool) -> np.ndarray:
        return np.fromiter((_epoch(e, field, required) for e in exposures), np.float64, n)

    defocus_u, defocus_v = column("defocus_u_a"), column("defocus_v_a")
    return _Session(
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


def _number(value: Any) -> float:
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
class _Stat:
    key: str
    label: str
    value: float | None
    text: str
    tone: str = ""


def _summarise(s: _Session) -> list[_Stat]:
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

    def count(key: str, label: str, value: int, tone: str = "") -> _Stat:
        return _Stat(key, label, value, f"{value:,}", tone)

    def duration(key: str, label: str, value: float | None) -> _Stat:
        return _Stat(key, label, value, _duration(value))

    return [
        count("acquired", "acquired", s.n),
        count("processed", "processed", s.count("processed")),
        count("accepted", "accepted", accepted, "ok"),
        count("rejected", "rejected", rejected, "bad" if rejected else ""),
        _Stat("acceptance", "acceptance", acceptance, "—" if acceptance is None else f"{acceptance:.1f} %"),
        count("failed", "failed", failed, "bad" if failed else ""),
        count("waiting", "waiting", s.count("waiting")),
        count("processing", "processing", s.count("processing")),
        _Stat("rate-last-hour", "last hour", float(last_hour), f"{last_hour:,} / h"),
        _Stat("rate-session", "whole session", per_hour, _rate(per_hour)),
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


def _reasons(s: _Session) -> list[tuple[str, int]]:
    """Rejecting rules, most frequent first (then by name, so equal counts keep a stable order)."""
    counts = Counter(
        str(s.exposures[i].get("rejected_by") or NO_RULE) for i in np.flatnonzero(s.verdict == 0)
    )
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _worst(s: _Session, k: int) -> list[int]:
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


# ------------------------------------------------------------------------------------------- the figures


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """The report's look, for drawing and for saving (some settings are read when a figure is saved).

    matplotlib's settings are the process's: two threads drawing at once may swap each other's look."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        yield


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor="white")
    return buf.getvalue()


def _figures(s: _Session, thresholds: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The figures by name, and the names of those with nothing to show yet."""
    figures, empty = {}, set()
    for name, draw in (
        ("progress", _progress),
        ("defocus", _defocus),
        ("resolution", _resolution),
        ("motion_histogram", _motion_histogram),
        ("resolution_histogram", _resolution_histogram),
        ("reasons", _reasons_bars),
    ):
        fig, ax = _new_figure(FIGURE_TITLES[name])
        if not draw(ax, s, thresholds):
            empty.add(name)
        figures[name] = fig
    return figures, empty


def _new_figure(title: str, left_in: float = 0.8):
    """A figure with margins fixed in inches: every figure's plot area starts at the same place, and saving
    does not search for a layout (matplotlib's constrained layout is most of the time a figure takes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=_DPI)
    _margins(fig, left_in)
    fig.text(0.1 / _SIZE[0], 1 - 0.1 / _SIZE[1], title, va="top", size=10, weight="bold", color=_INK)
    return fig, fig.add_subplot()


def _margins(fig, left_in: float) -> None:
    w, h = _SIZE
    fig.subplots_adjust(left=left_in / w, right=1 - 0.2 / w, bottom=0.62 / h, top=1 - 0.4 / h)


def _nothing(ax, message: str) -> bool:
    """The figure says why it is empty (the report's layout stays the same). Returns False: nothing drawn."""
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color=_MUTED, size=11)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    return False


def _days(seconds: np.ndarray | float) -> np.ndarray | float:
    """Unix seconds as matplotlib's date numbers (days since its epoch), without a datetime per point."""
    import matplotlib.dates as mdates

    epoch = np.datetime64(mdates.get_epoch(), "s").astype(np.int64)
    return (np.asarray(seconds, np.float64) - float(epoch)) / 86400.0


def _time_axis(ax, s: _Session) -> None:
    """Clock times in ``now``'s zone, from the first exposure to now: the three time plots line up."""
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(tz=s.tz, minticks=3, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=s.tz))
    start, end = float(s.acquired.min()), max(s.now, float(np.nanmax(s.acquired)))
    pad = max(60.0, 0.02 * (end - start))
    ax.set_xlim(_days(start - pad), _days(end + pad))


def _marker_size(n: int) -> float:
    return 3.5 if n < 2_000 else 2.0 if n < 20_000 else 1.2


def _threshold(thresholds: Mapping[str, Any], name: str) -> float | None:
    value = _number(thresholds.get(name))
    return value if np.isfinite(value) else None


def _range(thresholds: Mapping[str, Any], name: str) -> tuple[float, float] | None:
    value = thresholds.get(name)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        return None
    lo, hi = _number(value[0]), _number(value[1])
    return (lo, hi) if np.isfinite(lo) and np.isfinite(hi) else None


def _progress(ax, s: _Session, thresholds: Mapping[str, Any]) -> bool:
    if s.n == 0:
        return _nothing(ax, "no exposures yet")
    start = float(s.acquired.min())
    processed = s.status == "processed"
    accepted_at = np.where(np.isfinite(s.processed), s.processed, s.acquired)[s.verdict == 1]
    for label, times, color in (
        ("acquired", s.acquired, _ACQUIRED),
        ("processed", s.processed[processed], _PROCESSED),
        ("accepted", accepted_at, _ACCEPTED),
    ):
        t = np.sort(times[np.isfinite(times)])
        x = np.concatenate(([start], t, [max(s.now, t[-1] if t.size else start)]))
        y = np.concatenate(([0], np.arange(1, t.size + 1), [t.size]))
        ax.plot(_days(x), y, drawstyle="steps-post", color=color, lw=1.6, label=f"{label} ({t.size:,})")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("exposures")
    ax.legend(loc="upper left")
    _time_axis(ax, s)
    return True


def _legend_above(ax, **options) -> None:
    """The legend in the top margin, right of the title: points fill the plot, and finding an empty corner
    among tens of thousands of them (``loc="best"``) is slow."""
    ax.legend(
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncols=4,
        borderaxespad=0.2,
        handletextpad=0.3,
        columnspacing=1.0,
        **options,
    )


def _by_verdict(ax, s: _Session, y: np.ndarray) -> int:
    """Points against acquisition time, accepted and rejected in different colours and shapes (readable
    without colour); rasterised so the PDF of a long session stays small. Returns how many were drawn."""
    ms = _marker_size(s.n)
    drawn = 0
    finite = np.isfinite(y)
    for verdict, label, color, marker, size in (
        (-1, "not judged", _UNJUDGED, "o", ms),
        (1, "accepted", _ACCEPTED, "o", ms),
        (0, "rejected", _REJECTED, "x", ms * 1.1),
    ):
        m = finite & (s.verdict == verdict)
        count = int(np.count_nonzero(m))
        if count:
            ax.plot(
                _days(s.acquired[m]),
                y[m],
                ls="none",
                marker=marker,
                ms=size,
                mew=0.8 if marker == "x" else 0,
                color=color,
                alpha=0.7 if s.n < 2_000 else 0.45,
                label=f"{label} ({count:,})",
                rasterized=True,
            )
            drawn += count
    return drawn


def _defocus(ax, s: _Session, thresholds: Mapping[str, Any]) -> bool:
    if s.n == 0:
        return _nothing(ax, "no exposures yet")
    # the range as one setting, or as curation's two (either may be off)
    lo, hi = _range(thresholds, "defocus_range_um") or (
        _threshold(thresholds, "min_defocus_um"),
        _threshold(thresholds, "max_defocus_um"),
    )
    if lo is not None and hi is not None:
        ax.axhspan(lo, hi, color=_ACCEPTED, alpha=0.09, lw=0, label=f"range {lo:g}–{hi:g} µm")
    elif lo is not None or hi is not None:
        limit = lo if lo is not None else hi
        ax.axhline(limit, color=_REJECTED, lw=1, ls="--", label=f"limit {limit:g} µm")
    if not _by_verdict(ax, s, s.defocus_um):
        return _nothing(ax, "no defocus fitted yet")
    ax.set_ylabel("defocus, mean of U and V (µm)")
    _legend_above(ax, markerscale=3.5 / _marker_size(s.n))
    ax.margins(y=0.15)
    _time_axis(ax, s)
    return True


def _resolution(ax, s: _Session, thresholds: Mapping[str, Any]) -> bool:
    if s.n == 0:
        return _nothing(ax, "no exposures yet")
    limit = _threshold(thresholds, "max_ctf_fit_resolution_a")
    if not _by_verdict(ax, s, s.resolution):
        return _nothing(ax, "no CTF fitted yet")
    if limit is not None:
        ax.axhline(limit, color=_REJECTED, lw=1, ls="--", label=f"limit {limit:g} Å")
    ax.set_ylabel("CTF fit resolution (Å), lower is better")
    _legend_above(ax, markerscale=3.5 / _marker_size(s.n))
    ax.margins(y=0.15)
    _time_axis(ax, s)
    return True


def _stacked_histogram(ax, s: _Session, values: np.ndarray, limit: float | None, unit: str) -> bool:
    """Accepted, rejected and not-judged stacked on shared bins, with the operator's limit as a line."""
    finite = np.isfinite(values)
    if not finite.any():
        return False
    v = values[finite]
    top_edge = min(float(v.max()), 1.25 * max(float(np.percentile(v, 99)), limit or -np.inf))
    edges = np.histogram_bin_edges(
        v, bins=40, range=(float(v.min()), top_edge) if top_edge > v.min() else None
    )
    values = np.minimum(values, edges[-1])  # a long tail in the last bin, not forty empty ones
    beyond = int(np.count_nonzero(v > edges[-1]))
    bottom = np.zeros(edges.size - 1)
    for verdict, label, color in (
        (1, "accepted", _ACCEPTED),
        (0, "rejected", _REJECTED),
        (-1, "not judged", _UNJUDGED),
    ):
        counts, _ = np.histogram(values[finite & (s.verdict == verdict)], bins=edges)
        if counts.any():
            top = bottom + counts
            ax.stairs(top, edges, baseline=bottom, fill=True, color=color, label=label, lw=0)
            bottom = top
    if limit is not None:
        ax.axvline(limit, color=_INK, lw=1, ls="--", label=f"limit {limit:g} {unit}")
    if beyond:
        ax.text(
            0.99,
            0.97,
            f"last bin: {beyond:,} above {edges[-1]:.3g} {unit}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            size=7.5,
            color=_MUTED,
        )
    ax.set_ylabel("exposures")
    ax.yaxis.get_major_locator().set_params(integer=True)
    _legend_above(ax)
    ax.grid(axis="x", visible=False)
    return True


def _motion_histogram(ax, s: _Session, thresholds: Mapping[str, Any]) -> bool:
    limit = _threshold(thresholds, "max_total_motion_a")
    if not _stacked_histogram(ax, s, s.total_motion, limit, "Å"):
        return _nothing(ax, "no exposure motion-corrected yet")
    ax.set_xlabel("total motion (Å)")
    return True


def _resolution_histogram(ax, s: _Session, thresholds: Mapping[str, Any]) -> bool:
    limit = _threshold(thresholds, "max_ctf_fit_resolution_a")
    if not _stacked_histogram(ax, s, s.resolution, limit, "Å"):
        return _nothing(ax, "no CTF fitted yet")
    ax.set_xlabel("CTF fit resolution (Å)")
    return True


def _reasons_bars(ax, s: _Session, thresholds: Mapping[str, Any]) -> bool:
    reasons = _reasons(s)
    if not reasons:
        return _nothing(ax, "no exposure rejected")
    if len(reasons) > 10:
        reasons = [*reasons[:9], ("other rules", sum(c for _, c in reasons[9:]))]
    labels = [_shorten(rule, 28) for rule, _ in reasons]
    _margins(ax.figure, 0.35 + max(_width_in(label, 9) for label in labels))  # the longest rule name fits
    positions = np.arange(len(reasons))
    bars = ax.barh(positions, [c for _, c in reasons], color=_REJECTED, height=0.6)
    ax.set_yticks(positions, labels=[_plain(label) for label in labels])
    ax.set_ylim(max(len(reasons), 5) - 0.5, -0.5)  # the most frequent on top; a few rules, thin bars
    ax.bar_label(bars, labels=[f"{c:,}" for _, c in reasons], padding=3, color=_INK, size=8)
    ax.margins(x=0.12)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("rejected exposures")
    ax.grid(axis="y", visible=False)
    return True


def _width_in(text: str, size: float) -> float:
    """How wide ``text`` is drawn at ``size`` points, in inches (from the font's glyphs, no drawing)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    width, _, _ = text_to_path.get_text_width_height_descent(_plain(text), FontProperties(size=size), False)
    return width / 72


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _plain(text: str) -> str:
    """Text from the data drawn as written: a ``$`` would otherwise start matplotlib's mathtext."""
    return str(text).replace("$", r"\$")


# ---------------------------------------------------------------------------------------------- the PDF


def _write_pdf(
    path: Path,
    session: str,
    s: _Session,
    summary: list[_Stat],
    thresholds: Mapping[str, Any],
    reasons: list[tuple[str, int]],
    worst: list[int],
    figures: Mapping[str, Any],
) -> None:
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    made = datetime.fromtimestamp(s.now, s.tz)
    pages = [Figure(figsize=(11.69, 8.27))]  # A4 landscape
    page = pages[0]
    page.text(0.04, 0.95, _plain(f"Session {session}"), size=16, weight="bold", color=_INK)
    page.text(0.04, 0.92, f"report made {_clock(s.now, s.tz)}", size=9, color=_MUTED)
    bottom = min(
        _pdf_table(page, 0.04, 0.87, 0.28, "Summary", [(x.label, x.text) for x in summary]),
        _pdf_table(
            page,
            0.36,
            0.87,
            0.28,
            "Thresholds",
            [(_shorten(str(k), 36), _shorten(_given(v), 20)) for k, v in thresholds.items()],
        ),
        _pdf_table(page, 0.68, 0.87, 0.28, "Rejected by", [(_shorten(r, 36), f"{c:,}") for r, c in reasons]),
    )
    if worst:
        rows = [
            (
                _tail(str(s.exposures[i].get("movie")), 70),
                _shorten(_verdict_text(s.exposures[i]), 34),
                _fmt(s.resolution[i], "{:.2f} Å"),
                _fmt(s.total_motion[i], "{:.1f} Å"),
                _fmt(s.defocus_um[i], "{:.2f} µm"),
            )
            for i in worst[:_PDF_ROWS]
        ]
        top = bottom - 0.08
        if top - _ROW_H * (len(rows) + 1) < 0.03:
            pages.append(Figure(figsize=(11.69, 8.27)))
            top = 0.9
        _pdf_table(
            pages[-1],
            0.04,
            top,
            0.92,
            "Worst exposures",
            [("movie", "verdict", "CTF fit", "motion", "defocus"), *rows],
            widths=(0.5, 0.23, 0.09, 0.09, 0.09),
            header=True,
        )
    with PdfPages(path, metadata={"Title": f"Session {session}", "CreationDate": made}) as pdf:
        for page in pages:
            pdf.savefig(page, facecolor="white")
        for fig in figures.values():  # a figure with nothing to show yet is left out of the record
            pdf.savefig(fig, facecolor="white")


def _pdf_table(
    page,
    left: float,
    top: float,
    width: float,
    title: str,
    rows: list[tuple[str, ...]],
    widths: tuple[float, ...] | None = None,
    header: bool = False,
) -> float:
    """A table drawn as one text per cell and one set of rules (matplotlib's ``table`` sizes every cell);
    at most a page's worth of rows, the rest counted. Returns where it ends (figure fraction)."""
    from matplotlib.collections import LineCollection

    page.text(left, top + 0.01, title, size=11, weight="bold", color=_INK)
    if not rows:
        page.text(left, top - 0.025, "none", size=9, color=_MUTED)
        return top - 0.04
    if len(rows) > _PDF_ROWS + header:
        more = len(rows) - _PDF_ROWS - header
        rows = [*rows[: _PDF_ROWS + header], (f"… and {more:,} more",) + ("",) * (len(rows[0]) - 1)]
    widths = widths or ((0.6, 0.4) if len(rows[0]) == 2 else (1 / len(rows[0]),) * len(rows[0]))
    starts = left + width * np.concatenate(([0.0], np.cumsum(widths)[:-1]))
    for r, row in enumerate(rows):
        y = top - (r + 0.5) * _ROW_H
        bold = header and r == 0
        for x, cell in zip(starts, row, strict=True):
            page.text(
                x + 0.004,
                y,
                _plain(cell),
                va="center",
                size=8.5,
                weight="bold" if bold else "normal",
                color=_MUTED if bold else _INK,
            )
    ys = top - _ROW_H * np.arange(len(rows) + 1)
    rules = [((left, y), (left + width, y)) for y in ys]
    page.add_artist(LineCollection(rules, colors="#dde1e6", linewidths=0.6, transform=page.transFigure))
    return float(ys[-1])


# --------------------------------------------------------------------------------------------- the HTML


_CSS = """
:root { --ink:#1f2937; --muted:#6b7280; --line:#e3e6ea; --bg:#f4f5f7; --card:#fff;
        --ok:#2e7d4f; --bad:#b8322a; --head:#1e2a38; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header.top { background: var(--head); color: #fff; }
header.top div { max-width: 1240px; margin: 0 auto; padding: 14px 24px;
                 display: flex; flex-wrap: wrap; align-items: baseline; gap: 6px 18px; }
header.top h1 { margin: 0; font-size: 20px; font-weight: 600; overflow-wrap: anywhere; }
header.top p { margin: 0; color: #c3ccd7; font-size: 13px; }
main { max-width: 1240px; margin: 0 auto; padding: 8px 24px 40px; }
section { margin-top: 18px; }
h2 { margin: 0 0 8px; font-size: 13px; font-weight: 650; letter-spacing: .05em; text-transform: uppercase;
     color: var(--muted); }
.stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(138px, 1fr)); gap: 8px; }
.stats + h2 { margin-top: 12px; }
.stat { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 7px 12px; }
.stat .label { display: block; font-size: 12px; color: var(--muted); }
.stat .value { display: block; font-size: 21px; font-weight: 600; font-variant-numeric: tabular-nums;
               white-space: nowrap; }
.stat.ok .value { color: var(--ok); }
.stat.bad .value { color: var(--bad); }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; align-items: start; }
table { width: 100%; border-collapse: collapse; background: var(--card); border: 1px solid var(--line); }
th, td { padding: 4px 10px; text-align: left; vertical-align: top; border-bottom: 1px solid var(--line); }
thead th { background: #eef0f3; font-size: 12px; font-weight: 600; color: var(--muted); }
tbody th { font-weight: 500; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
.figures { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.figures figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px;
                  padding: 6px; }
.figures img { display: block; width: 100%; height: auto; }
.worst { display: grid; grid-template-columns: repeat(auto-fill, minmax(370px, 1fr)); gap: 12px; }
.exposure { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px; }
.exposure h3 { margin: 0 0 8px; font-size: 13px; font-weight: 600; }
.pictures { display: grid; grid-template-columns: 1fr 1fr; gap: 6px; margin-bottom: 8px; }
.pictures figure { margin: 0; }
.pictures img, .pictures .missing { display: block; width: 100%; aspect-ratio: 1; object-fit: contain;
                                    background: #111; border-radius: 4px; }
.pictures .missing { display: flex; align-items: center; justify-content: center; background: #eceef1;
                     color: var(--muted); font-size: 12px; }
.pictures figcaption { font-size: 11px; color: var(--muted); text-align: center; }
.exposure table { border: none; font-size: 12.5px; }
.exposure td, .exposure th { padding: 2px 6px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 11.5px; font-weight: 600;
         margin-right: 6px; color: #fff; background: #7b8591; }
.badge.rejected { background: var(--bad); }
.badge.accepted { background: var(--ok); }
.note, .empty { color: var(--muted); margin: 6px 0; }
.error { white-space: pre-wrap; }
code.movie { overflow-wrap: anywhere; }
code.movie .folder { color: var(--muted); }
td.when { white-space: nowrap; }
"""

# No script may run and nothing may be fetched: the report's pictures are data: URIs, its style is inline.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html(
    session: str,
    s: _Session,
    summary: list[_Stat],
    thresholds: Mapping[str, Any],
    reasons: list[tuple[str, int]],
    worst: list[int],
    pngs: Mapping[str, bytes],
) -> str:
    first = _clock(float(s.acquired.min()), s.tz) if s.n else "—"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Session {_e(session)} — cryo-EM session report</title>",
        f"<style>{_CSS}</style></head><body>",
        '<header class="top"><div>',
        f'<h1>Session <span id="session">{_e(session)}</span></h1>',
        f'<p>report made <time id="made">{_e(_clock(s.now, s.tz))}</time> · first exposure {_e(first)}</p>',
        "</div></header><main>",
        '<section id="summary">',
    ]
    for heading, group in (("Exposures", summary[:8]), ("Pace and processing lag", summary[8:])):
        parts.append(f'<h2>{heading}</h2><div class="stats">')
        for stat in group:
            value = "" if stat.value is None else repr(float(stat.value))
            parts.append(
                f'<div class="stat {stat.tone}" id="stat-{stat.key}" data-value="{value}">'
                f'<span class="label">{_e(stat.label)}</span><span class="value">{_e(stat.text)}</span></div>'
            )
        parts.append("</div>")
    parts.append("</section>")

    parts.append('<section id="figures"><h2>Figures</h2><div class="figures">')
    for name in FIGURES:
        parts.append(
            f'<figure id="figure-{name}"><img alt="{_e(FIGURE_TITLES[name])}" '
            f'src="data:image/png;base64,{base64.b64encode(pngs[name]).decode()}"></figure>'
        )
    parts.append("</div></section>")

    parts.append('<div class="cols"><section id="reasons"><h2>Rejected by</h2>')
    if reasons:
        rejected = sum(c for _, c in reasons)
        parts.append(
            '<table><thead><tr><th>rule</th><th class="num">exposures</th><th class="num">share</th></tr>'
            "</thead><tbody>"
        )
        parts += [
            f'<tr data-rule="{_e(rule)}" data-count="{c}"><td><code>{_e(rule)}</code></td>'
            f'<td class="num">{c:,}</td><td class="num">{100 * c / rejected:.1f} %</td></tr>'
            for rule, c in reasons
        ]
        parts.append("</tbody></table>")
    else:
        parts.append('<p class="empty">no exposure rejected</p>')
    parts.append('</section><section id="thresholds"><h2>Thresholds</h2>')
    if thresholds:
        parts.append("<table><thead><tr><th>setting</th><th>value</th></tr></thead><tbody>")
        parts += [
            f"<tr><th><code>{_e(k)}</code></th><td>{_e(_given(v))}</td></tr>" for k, v in thresholds.items()
        ]
        parts.append("</tbody></table>")
    else:
        parts.append('<p class="empty">no thresholds set</p>')
    parts.append("</section></div>")

    parts.append(f'<section id="worst"><h2>Worst exposures ({len(worst)})</h2>')
    if worst:
        parts.append(
            '<p class="note">Rejected first, then by worst CTF fit resolution, then by most motion.</p>'
        )
        parts.append('<div class="worst">')
        parts += [_exposure_card(s, i, rank) for rank, i in enumerate(worst, 1)]
        parts.append("</div>")
    else:
        parts.append('<p class="empty">no exposure processed yet</p>')
    parts.append("</section>")

    parts.append(_failed_section(s))
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _exposure_card(s: _Session, i: int, rank: int) -> str:
    e = s.exposures[i]
    movie = str(e.get("movie"))
    verdict = {1: "accepted", 0: "rejected"}.get(int(s.verdict[i]), "not judged")
    rule = (e.get("rejected_by") or NO_RULE) if verdict == "rejected" else None
    badge = f'<span class="badge {verdict.replace(" ", "-")}">{verdict}</span>'
    rule_html = f"<code>{_e(rule)}</code>" if rule else ""
    rows = [
        ("acquired", _e(_clock(float(s.acquired[i]), s.tz))),
        ("CTF fit resolution", _fmt(s.resolution[i], "{:.2f} Å")),
        ("total motion", _fmt(s.total_motion[i], "{:.1f} Å")),
        ("early motion", _fmt(s.early_motion[i], "{:.1f} Å")),
        ("defocus U / V", _defocus_uv(e)),
        ("astigmatism", _fmt(s.astigmatism[i], "{:,.0f} Å")),
        ("CTF figure of merit", _fmt(s.figure_of_merit[i], "{:.3f}")),
        ("ice ring density", _fmt(s.ice[i], "{:.3f}")),
    ]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (
        f'<article class="exposure" data-rank="{rank}" data-movie="{_e(movie)}">'
        f"<h3>{badge}{rule_html}</h3><p>{_movie(movie)}</p>"
        f'<div class="pictures">{_picture(e.get("thumbnail"), "micrograph", "JPEG")}'
        f"{_picture(e.get('spectrum'), 'power spectrum, CTF fit', 'PNG')}</div>"
        f"<table><tbody>{table}</tbody></table></article>"
    )


def _movie(movie: str) -> str:
    """The movie's path with its folder greyed (the file name is what a person looks for), broken at its
    slashes rather than inside a name."""
    folder, slash, name = movie.rpartition("/")
    folder = "/<wbr>".join(_e(part) for part in (folder + slash).split("/"))
    return f'<code class="movie"><span class="folder">{folder}</span>{_e(name)}</code>'


def _picture(path: Any, caption: str, fmt: str) -> str:
    """The picture shrunk and embedded; a missing or unreadable file is said, and the report still made."""
    if not path:
        return f'<figure><div class="missing">no {caption.split(",")[0]}</div><figcaption>{caption}</figcaption></figure>'
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.thumbnail((PICTURE_SIDE, PICTURE_SIDE))
            picture = im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            buf = io.BytesIO()
            picture.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    except FileNotFoundError:
        return (
            f'<figure><div class="missing" title="{_e(path)}">file missing</div>'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    except (OSError, ValueError, Image.DecompressionBombError):
        return (
            f'<figure><div class="missing" title="{_e(path)}">unreadable</div>'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    uri = f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"
    return f'<figure><img alt="{caption}" src="{uri}"><figcaption>{caption}</figcaption></figure>'


def _failed_section(s: _Session) -> str:
    failed = np.flatnonzero(s.status == "failed")
    parts = [f'<section id="failed"><h2>Failed exposures ({failed.size:,})</h2>']
    if not failed.size:
        parts.append('<p class="empty">none failed</p></section>')
        return "\n".join(parts)
    newest = failed[np.argsort(-s.acquired[failed], kind="stable")][:FAILED_SHOWN]
    if failed.size > newest.size:
        parts.append(f'<p class="note">The {newest.size:,} most recent of {failed.size:,}.</p>')
    parts.append("<table><thead><tr><th>movie</th><th>acquired</th><th>error</th></tr></thead><tbody>")
    for i in newest:
        e = s.exposures[i]
        parts.append(
            f'<tr data-movie="{_e(e.get("movie"))}"><td>{_movie(str(e.get("movie")))}</td>'
            f'<td class="when">{_e(_clock(float(s.acquired[i]), s.tz))}</td>'
            f'<td class="error">{_e(e.get("error") or "(no error recorded)")}</td></tr>'
        )
    parts.append("</tbody></table></section>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- helpers


def _clock(seconds: float, tz: tzinfo) -> str:
    return datetime.fromtimestamp(seconds, tz).strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _fmt(value: float, template: str) -> str:
    return template.format(value) if np.isfinite(value) else "—"


def _defocus_uv(e: Mapping[str, Any]) -> str:
    u, v = _number(e.get("defocus_u_a")), _number(e.get("defocus_v_a"))
    if not (np.isfinite(u) or np.isfinite(v)):
        return "—"
    return f"{_fmt(u / 1e4, '{:.2f}')} / {_fmt(v / 1e4, '{:.2f}')} µm"


def _verdict_text(e: Mapping[str, Any]) -> str:
    accepted = e.get("accepted")
    if accepted is None:
        return "not judged"
    return "accepted" if accepted else f"rejected: {e.get('rejected_by') or NO_RULE}"


def _given(value: Any) -> str:
    """A threshold as the operator gave it (a range as ``[lo, hi]``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _tail(text: str, width: int) -> str:
    """The end of a long path: the movie's name is at its end."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write beside ``path`` under a temporary name, then rename: a reader sees the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the report from the web server
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
