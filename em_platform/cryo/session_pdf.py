"""``report.pdf``, the session's record: a page of the summary, thresholds, rejecting rules and worst
exposures, then the report's figures (those with something to show), through matplotlib's PdfPages.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from em_platform.cryo.session_columns import NO_RULE, ReportContent, clock, fmt, given, shorten
from em_platform.cryo.session_figures import INK, MUTED, plain

_ROW_H = 0.026  # a PDF table's row, in fractions of an A4 page's height
_PDF_ROWS = 24  # rows of a PDF table before the rest is only counted


def write_pdf(path: Path, report: ReportContent, figures: Mapping[str, Any]) -> None:
    """The PDF at ``path``; ``figures`` are the drawn ones by name."""
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    s, session, worst = report.columns, report.session, report.worst
    made = datetime.fromtimestamp(s.now, s.tz)
    pages = [Figure(figsize=(11.69, 8.27))]  # A4 landscape
    page = pages[0]
    page.text(0.04, 0.95, plain(f"Session {session}"), size=16, weight="bold", color=INK)
    page.text(0.04, 0.92, f"report made {clock(s.now, s.tz)}", size=9, color=MUTED)
    bottom = min(
        _pdf_table(page, 0.04, 0.87, 0.28, "Summary", [(x.label, x.text) for x in report.summary]),
        _pdf_table(
            page,
            0.36,
            0.87,
            0.28,
            "Thresholds",
            [(shorten(str(k), 36), shorten(given(v), 20)) for k, v in report.thresholds.items()],
        ),
        _pdf_table(
            page, 0.68, 0.87, 0.28, "Rejected by", [(shorten(r, 36), f"{c:,}") for r, c in report.reasons]
        ),
    )
    if worst:
        rows = [
            (
                _tail(str(s.exposures[i].get("movie")), 70),
                shorten(_verdict_text(s.exposures[i]), 34),
                fmt(s.resolution[i], "{:.2f} Å"),
                fmt(s.total_motion[i], "{:.1f} Å"),
                fmt(s.defocus_um[i], "{:.2f} µm"),
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

    page.text(left, top + 0.01, title, size=11, weight="bold", color=INK)
    if not rows:
        page.text(left, top - 0.025, "none", size=9, color=MUTED)
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
                plain(cell),
                va="center",
                size=8.5,
                weight="bold" if bold else "normal",
                color=MUTED if bold else INK,
            )
    ys = top - _ROW_H * np.arange(len(rows) + 1)
    rules = [((left, y), (left + width, y)) for y in ys]
    page.add_artist(LineCollection(rules, colors="#dde1e6", linewidths=0.6, transform=page.transFigure))
    return float(ys[-1])


def _verdict_text(e: Mapping[str, Any]) -> str:
    accepted = e.get("accepted")
    if accepted is None:
        return "not judged"
    return "accepted" if accepted else f"rejected: {e.get('rejected_by') or NO_RULE}"


def _tail(text: str, width: int) -> str:
    """The end of a long path: the movie's name is at its end."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]
