"""``report.html``, the session's report as one self-contained page: figures and pictures are ``data:`` URIs,
there is no script, and a Content-Security-Policy forbids any request, so it opens the same mailed or on a
machine off the facility network.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from em_platform.cryo.session_columns import (
    NO_RULE,
    ReportContent,
    SessionColumns,
    as_number,
    clock,
    fmt,
    given,
)
from em_platform.cryo.session_figures import FIGURE_TITLES, FIGURES

FAILED_SHOWN = 200  # newest first: a session whose every movie fails must not make a report of megabytes
PICTURE_SIDE = 480  # micrographs and spectra are shrunk to this many pixels a side before embedding


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


def html_page(report: ReportContent, pngs: Mapping[str, bytes]) -> str:
    """The page; ``pngs`` are the figures by name."""
    s, session, worst = report.columns, report.session, report.worst
    first = clock(float(s.acquired.min()), s.tz) if s.n else "—"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Session {_e(session)} — cryo-EM session report</title>",
        f"<style>{_CSS}</style></head><body>",
        '<header class="top"><div>',
        f'<h1>Session <span id="session">{_e(session)}</span></h1>',
        f'<p>report made <time id="made">{_e(clock(s.now, s.tz))}</time> · first exposure {_e(first)}</p>',
        "</div></header><main>",
        '<section id="summary">',
    ]
    for heading, group in (
        ("Exposures", report.summary[:8]),
        ("Pace and processing lag", report.summary[8:]),
    ):
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
    if report.reasons:
        rejected = sum(c for _, c in report.reasons)
        parts.append(
            '<table><thead><tr><th>rule</th><th class="num">exposures</th><th class="num">share</th></tr>'
            "</thead><tbody>"
        )
        parts += [
            f'<tr data-rule="{_e(rule)}" data-count="{c}"><td><code>{_e(rule)}</code></td>'
            f'<td class="num">{c:,}</td><td class="num">{100 * c / rejected:.1f} %</td></tr>'
            for rule, c in report.reasons
        ]
        parts.append("</tbody></table>")
    else:
        parts.append('<p class="empty">no exposure rejected</p>')
    parts.append('</section><section id="thresholds"><h2>Thresholds</h2>')
    if report.thresholds:
        parts.append("<table><thead><tr><th>setting</th><th>value</th></tr></thead><tbody>")
        parts += [
            f"<tr><th><code>{_e(k)}</code></th><td>{_e(given(v))}</td></tr>"
            for k, v in report.thresholds.items()
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


def _exposure_card(s: SessionColumns, i: int, rank: int) -> str:
    e = s.exposures[i]
    movie = str(e.get("movie"))
    verdict = {1: "accepted", 0: "rejected"}.get(int(s.verdict[i]), "not judged")
    rule = (e.get("rejected_by") or NO_RULE) if verdict == "rejected" else None
    badge = f'<span class="badge {verdict.replace(" ", "-")}">{verdict}</span>'
    rule_html = f"<code>{_e(rule)}</code>" if rule else ""
    rows = [
        ("acquired", _e(clock(float(s.acquired[i]), s.tz))),
        ("CTF fit resolution", fmt(s.resolution[i], "{:.2f} Å")),
        ("total motion", fmt(s.total_motion[i], "{:.1f} Å")),
        ("early motion", fmt(s.early_motion[i], "{:.1f} Å")),
        ("defocus U / V", _defocus_uv(e)),
        ("astigmatism", fmt(s.astigmatism[i], "{:,.0f} Å")),
        ("CTF figure of merit", fmt(s.figure_of_merit[i], "{:.3f}")),
        ("ice ring density", fmt(s.ice[i], "{:.3f}")),
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


def _failed_section(s: SessionColumns) -> str:
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
            f'<td class="when">{_e(clock(float(s.acquired[i]), s.tz))}</td>'
            f'<td class="error">{_e(e.get("error") or "(no error recorded)")}</td></tr>'
        )
    parts.append("</tbody></table></section>")
    return "\n".join(parts)


def _defocus_uv(e: Mapping[str, Any]) -> str:
    u, v = as_number(e.get("defocus_u_a")), as_number(e.get("defocus_v_a"))
    if not (np.isfinite(u) or np.isfinite(v)):
        return "—"
    return f"{fmt(u / 1e4, '{:.2f}')} / {fmt(v / 1e4, '{:.2f}')} µm"
