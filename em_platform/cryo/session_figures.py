"""The figures of a live session's report, drawn with matplotlib from the session's columns: the same
figures are the HTML's pictures, the PDF's pages and the dashboard's plots.

Dense scatter plots are rasterised, which keeps the PDF of a long session small.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from em_platform.cryo.session_columns import (
    SessionColumns,
    as_number,
    read_columns,
    rejection_reasons,
    shorten,
)

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn
    from matplotlib.typing import RcKeyType

FIGURES = ("progress", "defocus", "resolution", "motion_histogram", "resolution_histogram", "reasons")
FIGURE_TITLES = {
    "progress": "Exposures, cumulative",
    "defocus": "Defocus",
    "resolution": "CTF fit resolution",
    "motion_histogram": "Total motion",
    "resolution_histogram": "CTF fit resolution, all processed",
    "reasons": "Why exposures were rejected",
}
_DPI = 110
_SIZE = (6.2, 3.3)
INK, MUTED = "#1f2937", "#6b7280"  # text and its lighter kind, the PDF's too
_ACQUIRED, _PROCESSED = "#3b6ea5", "#8a6bb8"
_ACCEPTED, _REJECTED, _UNJUDGED = "#2e7d4f", "#c0392b", "#9aa3ad"
_STYLE: dict[RcKeyType, Any] = {
    "font.size": 9,
    "axes.labelcolor": INK,
    "axes.edgecolor": "#b8bec6",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e6e8eb",
    "grid.linewidth": 0.8,
    "xtick.color": MUTED,
    "ytick.color": MUTED,
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
    session = read_columns(exposures, now)
    with style():
        figures, _ = draw_figures(session, thresholds or {})
        return {name: png(fig) for name, fig in figures.items()}


# ------------------------------------------------------------------------------------------- the figures


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The report's look, for drawing and for saving (some settings are read when a figure is saved).

    matplotlib's settings are the process's: two threads drawing at once may swap each other's look."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        yield


def png(fig) -> bytes:
    """A figure as the PNG both the page and ``session_plots`` give."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor="white")
    return buf.getvalue()


def draw_figures(s: SessionColumns, thresholds: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
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
    fig.text(0.1 / _SIZE[0], 1 - 0.1 / _SIZE[1], title, va="top", size=10, weight="bold", color=INK)
    return fig, fig.add_subplot()


def _margins(fig, left_in: float) -> None:
    w, h = _SIZE
    fig.subplots_adjust(left=left_in / w, right=1 - 0.2 / w, bottom=0.62 / h, top=1 - 0.4 / h)


def _nothing(ax, message: str) -> bool:
    """The figure says why it is empty (the report's layout stays the same). Returns False: nothing drawn."""
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color=MUTED, size=11)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    return False


def _days(seconds: np.ndarray | float) -> np.ndarray | float:
    """Unix seconds as matplotlib's date numbers (days since its epoch), without a datetime per point."""
    import matplotlib.dates as mdates

    epoch = np.datetime64(mdates.get_epoch(), "s").astype(np.int64)
    return (np.asarray(seconds, np.float64) - float(epoch)) / 86400.0


def _time_axis(ax, s: SessionColumns) -> None:
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
    value = as_number(thresholds.get(name))
    return value if np.isfinite(value) else None


def _range(thresholds: Mapping[str, Any], name: str) -> tuple[float, float] | None:
    value = thresholds.get(name)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        return None
    lo, hi = as_number(value[0]), as_number(value[1])
    return (lo, hi) if np.isfinite(lo) and np.isfinite(hi) else None


def _progress(ax, s: SessionColumns, thresholds: Mapping[str, Any]) -> bool:
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


def _by_verdict(ax, s: SessionColumns, y: np.ndarray) -> int:
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


def _defocus(ax, s: SessionColumns, thresholds: Mapping[str, Any]) -> bool:
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


def _resolution(ax, s: SessionColumns, thresholds: Mapping[str, Any]) -> bool:
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


def _stacked_histogram(ax, s: SessionColumns, values: np.ndarray, limit: float | None, unit: str) -> bool:
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
        ax.axvline(limit, color=INK, lw=1, ls="--", label=f"limit {limit:g} {unit}")
    if beyond:
        ax.text(
            0.99,
            0.97,
            f"last bin: {beyond:,} above {edges[-1]:.3g} {unit}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            size=7.5,
            color=MUTED,
        )
    ax.set_ylabel("exposures")
    ax.yaxis.get_major_locator().set_params(integer=True)
    _legend_above(ax)
    ax.grid(axis="x", visible=False)
    return True


def _motion_histogram(ax, s: SessionColumns, thresholds: Mapping[str, Any]) -> bool:
    limit = _threshold(thresholds, "max_total_motion_a")
    if not _stacked_histogram(ax, s, s.total_motion, limit, "Å"):
        return _nothing(ax, "no exposure motion-corrected yet")
    ax.set_xlabel("total motion (Å)")
    return True


def _resolution_histogram(ax, s: SessionColumns, thresholds: Mapping[str, Any]) -> bool:
    limit = _threshold(thresholds, "max_ctf_fit_resolution_a")
    if not _stacked_histogram(ax, s, s.resolution, limit, "Å"):
        return _nothing(ax, "no CTF fitted yet")
    ax.set_xlabel("CTF fit resolution (Å)")
    return True


def _reasons_bars(ax, s: SessionColumns, thresholds: Mapping[str, Any]) -> bool:
    reasons = rejection_reasons(s)
    if not reasons:
        return _nothing(ax, "no exposure rejected")
    if len(reasons) > 10:
        reasons = [*reasons[:9], ("other rules", sum(c for _, c in reasons[9:]))]
    labels = [shorten(rule, 28) for rule, _ in reasons]
    _margins(ax.figure, 0.35 + max(_width_in(label, 9) for label in labels))  # the longest rule name fits
    positions = np.arange(len(reasons))
    bars = ax.barh(positions, [c for _, c in reasons], color=_REJECTED, height=0.6)
    ax.set_yticks(positions, labels=[plain(label) for label in labels])
    ax.set_ylim(max(len(reasons), 5) - 0.5, -0.5)  # the most frequent on top; a few rules, thin bars
    ax.bar_label(bars, labels=[f"{c:,}" for _, c in reasons], padding=3, color=INK, size=8)
    ax.margins(x=0.12)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("rejected exposures")
    ax.grid(axis="y", visible=False)
    return True


def _width_in(text: str, size: float) -> float:
    """How wide ``text`` is drawn at ``size`` points, in inches (from the font's glyphs, no drawing)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    width, _, _ = text_to_path.get_text_width_height_descent(plain(text), FontProperties(size=size), False)
    return width / 72


def plain(text: str) -> str:
    """Text from the data drawn as written (the PDF's too): a ``$`` would otherwise start matplotlib's
    mathtext."""
    return str(text).replace("$", r"\$")
