"""The report of a live single-particle session: what the staff scientist reads beside the microscope.

Each exposure of a session is motion-corrected and CTF-fitted as it lands, then accepted or rejected against
the operator's thresholds (as CryoSPARC Live, Warp and cryoem-services do). During a 48-hour session the
report answers four questions: does the processing keep up (counts, rates, processing lag), is the data good
(defocus, CTF fit resolution and motion against time), why are exposures thrown away (the rejecting rules),
and what do the worst ones look like (micrograph and power spectrum side by side).

One set of figures (em_platform.cryo.session_figures) makes two files: ``report.html``, self-contained
(session_html), and ``report.pdf`` for the session's record (session_pdf); the exposures are read once into
columns (session_columns).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from em_platform.cryo.session_columns import report_content
from em_platform.cryo.session_figures import draw_figures, png, style
from em_platform.cryo.session_html import html_page
from em_platform.cryo.session_pdf import write_pdf


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
    report = report_content(session, exposures, thresholds or {}, now, worst)
    out.mkdir(parents=True, exist_ok=True)
    with style():
        figures, empty = draw_figures(report.columns, report.thresholds)
        pngs = {name: png(fig) for name, fig in figures.items()}
        drawn = {name: fig for name, fig in figures.items() if name not in empty}
        _replace_atomically(out / "report.pdf", lambda tmp: write_pdf(tmp, report, drawn))
    page = html_page(report, pngs)
    target = out / "report.html"
    _replace_atomically(target, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return target


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
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
