"""The live session report: its numbers read back from the HTML and checked against the exposures, its figures,
the worst exposures' order, escaping of what the data holds, the edge cases of a session (nothing yet, nothing
processed, everything failed, figures missing, 50,000 exposures), and the page as Chromium shows it."""

from __future__ import annotations

import base64
import io
import math
import re
import shutil
import statistics
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from em_platform.cryo import session_report
from em_platform.cryo.session_columns import NO_RULE
from em_platform.cryo.session_figures import FIGURES, session_plots
from em_platform.cryo.session_html import FAILED_SHOWN
from em_platform.cryo.session_report import write_session_report

FACILITY = timezone(timedelta(hours=1))  # the report's clock; the exposures carry UTC
START = datetime(2025, 3, 14, 7, 2, 11, tzinfo=UTC)
SESSION = "2025-03-14_krios1_apoferritin_grid3"
THRESHOLDS = {
    "max_total_motion_a": 30,
    "max_ctf_fit_resolution_a": 6,
    "defocus_range_um": [0.5, 3.0],
    "max_astigmatism_a": 1000,
    "min_ctf_figure_of_merit": 0.08,
    "max_ice_ring_density": 0.25,
}
# The operator's rules in the order the judging applies them: the first that fails names the rejection.
RULES = (
    ("total_motion_a", lambda e: e["total_motion_a"] > 30),
    ("ctf_fit_resolution_a", lambda e: e["ctf_fit_resolution_a"] > 6),
    ("defocus_range", lambda e: not 0.5 <= (e["defocus_u_a"] + e["defocus_v_a"]) / 2e4 <= 3.0),
    ("astigmatism_a", lambda e: e["astigmatism_a"] > 1000),
    ("ctf_figure_of_merit", lambda e: e["ctf_figure_of_merit"] < 0.08),
    ("ice_ring_density", lambda e: e["ice_ring_density"] > 0.25),
)
ERRORS = (
    "MotionCor2: frame 31 of 40 is truncated (file still being written?)",
    "CTFFIND: no Thon rings found above the noise",
    "gain reference not found: CountRef_grid3.dm4",
)


def exposure(i: int, acquired_at: datetime, status: str, **values) -> dict:
    """One row as the live pipeline hands it over; figures None until processed."""
    row = {
        "movie": f"Images-Disc1/GridSquare_{i // 50:04d}/Data/FoilHole_{i:06d}_Data_fractions.tiff",
        "acquired_at": acquired_at,
        "processed_at": None,
        "status": status,
        "error": None,
        "total_motion_a": None,
        "early_motion_a": None,
        "defocus_u_a": None,
        "defocus_v_a": None,
        "astigmatism_a": None,
        "ctf_fit_resolution_a": None,
        "ctf_figure_of_merit": None,
        "ice_ring_density": None,
        "accepted": None,
        "rejected_by": None,
        "thumbnail": None,
        "spectrum": None,
    }
    row.update(values)
    return row


def judge(row: dict) -> dict:
    rule = next((name for name, fails in RULES if fails(row)), None)
    row.update(accepted=rule is None, rejected_by=rule)
    return row


def synthetic_session(n: int, seed: int, pictures: Path | None) -> tuple[list[dict], datetime]:
    """A session as a Krios writes it, about 160 exposures an hour: defocus stepped through the operator's
    list, motion mostly 8-25 Å with a tail, CTF fits mostly 3-5 Å with a tail; the newest movies still
    waiting or processing, a few failed. Returns the exposures and the report's ``now``."""
    rng = np.random.default_rng(seed)
    acquired = [START + timedelta(seconds=float(s)) for s in np.cumsum(rng.gamma(6.0, 22.5 / 6.0, n))]
    targets = np.array([0.8, 1.1, 1.4, 1.7, 2.0, 2.3, 2.6])
    pool = picture_pool(rng) if pictures else None
    rows = []
    for i in range(n):
        at = acquired[i]
        if i >= n - 9:
            rows.append(exposure(i, at, "waiting"))
            continue
        if i >= n - 12:
            rows.append(exposure(i, at, "processing"))
            continue
        lag = timedelta(seconds=float(rng.lognormal(math.log(75), 0.35)))
        if rng.random() < 0.035:
            rows.append(exposure(i, at, "failed", processed_at=at + lag, error=ERRORS[i % len(ERRORS)]))
            continue
        motion = float(rng.gamma(4.5, 3.4))
        defocus = targets[(i // 4) % targets.size] * 1e4 + rng.normal(0, 400)
        if rng.random() < 0.03:
            defocus = rng.choice([0.35e4, 3.4e4])  # the autofocus missed
        astigmatism = float(abs(rng.normal(250, 200)) + (1500 if rng.random() < 0.02 else 0))
        row = exposure(
            i,
            at,
            "processed",
            processed_at=at + lag,
            total_motion_a=round(motion, 2),
            early_motion_a=round(motion * rng.uniform(0.3, 0.6), 2),
            defocus_u_a=float(defocus + astigmatism / 2),
            defocus_v_a=float(defocus - astigmatism / 2),
            astigmatism_a=round(astigmatism, 1),
            ctf_fit_resolution_a=round(float(rng.lognormal(math.log(4.1), 0.22)), 1),
            ctf_figure_of_merit=round(float(rng.beta(6, 20)), 3),
            ice_ring_density=round(float(rng.gamma(2, 0.04)), 3),
        )
        if pool is not None:
            micrograph, spectra = pool
            row["thumbnail"] = str(pictures / f"{i:06d}.jpg")
            row["spectrum"] = str(pictures / f"{i:06d}_ctf.png")
            Path(row["thumbnail"]).write_bytes(micrograph[i % len(micrograph)])
            Path(row["spectrum"]).write_bytes(spectra[min(int(defocus / 0.8e4), len(spectra) - 1)])
        rows.append(judge(row))
    # two rejected at the worst resolution (the fit gave up at the ice ring), told apart by their motion
    worst = [r for r in rows if r["status"] == "processed"][5:7]
    for r, motion in zip(worst, (18.5, 26.0), strict=True):
        r.update(
            ctf_fit_resolution_a=15.0,
            total_motion_a=motion,
            accepted=False,
            rejected_by="ctf_fit_resolution_a",
        )
    now = (rows[-1]["acquired_at"] + timedelta(seconds=40)).astimezone(FACILITY)
    return rows, now


def picture_pool(rng: np.random.Generator) -> tuple[list[bytes], list[bytes]]:
    """A few micrographs (low-passed noise with dark particles) and power spectra (Thon rings of growing
    defocus, data on the left, the fitted CTF on the right), encoded once and copied per exposure."""
    side = 192
    yy, xx = np.mgrid[:side, :side]
    micrographs = []
    for _ in range(4):
        spectrum = np.fft.rfft2(rng.normal(size=(side, side)))
        k2 = np.fft.fftfreq(side)[:, None] ** 2 + np.fft.rfftfreq(side)[None, :] ** 2
        image = np.fft.irfft2(spectrum * np.exp(-k2 / (2 * 0.06**2)), s=(side, side))
        for cy, cx in rng.uniform(8, side - 8, (30, 2)):
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < 30] -= 2.5 * image.std()
        micrographs.append(_encode(image, "JPEG"))
    k = np.hypot(
        *np.meshgrid(np.fft.fftshift(np.fft.fftfreq(side, 3.0)), np.fft.fftshift(np.fft.fftfreq(side, 3.0)))
    )
    spectra = []
    for defocus in (0.8e4, 1.6e4, 2.4e4, 3.2e4):
        ctf = np.sin(np.pi * 0.0197 * defocus * k**2) ** 2 * np.exp(-((k / 0.12) ** 2))
        image = np.where(xx < side // 2, ctf + rng.normal(0, 0.12, ctf.shape), ctf)
        spectra.append(_encode(image, "PNG"))
    return micrographs, spectra


def _encode(image: np.ndarray, fmt: str) -> bytes:
    lo, hi = np.percentile(image, [0.5, 99.5])
    grey = (np.clip((image - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format=fmt)
    return buf.getvalue()


class Page(HTMLParser):
    """What the tests read back from the report: the summary's values, the rules' counts, the worst and
    failed exposures in page order, the images' sources, and the text."""

    def __init__(self, text: str):
        super().__init__()
        self.stats: dict[str, str] = {}
        self.rules: dict[str, int] = {}
        self.worst: list[str] = []
        self.failed: list[str] = []
        self.images: list[str] = []
        self.figures: dict[str, bytes] = {}
        self._figure: str | None = None
        self.headings: list[str] = []
        self.text: list[str] = []
        self._in: str | None = None
        self._section: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._section = a.get("id")
        if a.get("id", "").startswith("stat-"):
            self.stats[a["id"][5:]] = a["data-value"]
        if "data-rule" in a:
            self.rules[a["data-rule"]] = int(a["data-count"])
        if tag == "article" and "data-rank" in a:
            self.worst.append(a["data-movie"])
        if tag == "tr" and self._section == "failed" and "data-movie" in a:
            self.failed.append(a["data-movie"])
        if tag == "figure":
            self._figure = a.get("id")
        if tag == "img":
            self.images.append(a["src"])
            if (self._figure or "").startswith("figure-"):
                self.figures[self._figure[7:]] = base64.b64decode(a["src"].partition(",")[2])
        if tag == "h2":
            self.headings.append("")
        if tag in ("h2", "script"):
            self._in = tag

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None
        if tag == "figure":
            self._figure = None

    def handle_data(self, data):
        self.text.append(data)
        if self._in == "h2":
            self.headings[-1] += data
        if self._in == "script":
            raise AssertionError(f"a <script> element in the report: {data!r}")

    def value(self, key: str) -> float | None:
        return float(self.stats[key]) if self.stats[key] else None


def expected_summary(rows: list[dict], now: datetime) -> dict[str, float | None]:
    """The summary computed from the mappings directly, without the module's columns."""
    status = Counter(r["status"] for r in rows)
    accepted = sum(r["accepted"] is True for r in rows)
    rejected = sum(r["accepted"] is False for r in rows)
    lags = [(r["processed_at"] - r["acquired_at"]).total_seconds() for r in rows if r["processed_at"]]
    pending = [
        (now - r["acquired_at"]).total_seconds() for r in rows if r["status"] in ("waiting", "processing")
    ]
    hours = (now - min(r["acquired_at"] for r in rows)).total_seconds() / 3600 if rows else 0
    return {
        "acquired": len(rows),
        "processed": status["processed"],
        "failed": status["failed"],
        "waiting": status["waiting"],
        "processing": status["processing"],
        "accepted": accepted,
        "rejected": rejected,
        "acceptance": 100 * accepted / (accepted + rejected) if accepted + rejected else None,
        "rate-last-hour": sum(now - timedelta(hours=1) < r["acquired_at"] <= now for r in rows),
        "rate-session": len(rows) / hours if hours > 0 else None,
        "lag-p50": statistics.median(lags) if lags else None,
        "lag-p95": statistics.quantiles(lags, n=20, method="inclusive")[18]
        if len(lags) > 1
        else (lags or [None])[0],
        "lag-max": max(lags) if lags else None,
        "oldest-pending": max(pending) if pending else None,
    }


def expected_worst(rows: list[dict], k: int) -> list[str]:
    def key(r):
        resolution, motion = r["ctf_fit_resolution_a"], r["total_motion_a"]
        return (
            r["accepted"] is not False,
            -resolution if resolution is not None else math.inf,
            -motion if motion is not None else math.inf,
        )

    return [r["movie"] for r in sorted((r for r in rows if r["status"] == "processed"), key=key)[:k]]


def assert_summary(page: Page, rows: list[dict], now: datetime) -> None:
    for key, want in expected_summary(rows, now).items():
        got = page.value(key)
        if want is None:
            assert got is None, (key, got)
        else:
            assert got == pytest.approx(want, rel=1e-9, abs=1e-3), (key, got, want)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The realistic session, its report written once for the module."""
    folder = tmp_path_factory.mktemp("session")
    pictures = folder / "pictures"
    pictures.mkdir()
    rows, now = synthetic_session(320, seed=7, pictures=pictures)
    html_path = write_session_report(folder / "report", SESSION, rows, THRESHOLDS, now)
    return rows, now, html_path, Page(html_path.read_text(encoding="utf-8"))


def test_the_synthetic_session_is_a_realistic_mix(session):
    rows, _, _, _ = session
    status = Counter(r["status"] for r in rows)
    assert status["processed"] > 250 and status["failed"] >= 5 and status["waiting"] and status["processing"]
    rules = Counter(r["rejected_by"] for r in rows if r["accepted"] is False)
    assert len(rules) >= 4, rules


def test_summary_numbers_match_the_exposures(session):
    rows, now, _, page = session
    assert_summary(page, rows, now)
    text = "".join(page.text)
    assert f"{page.value('acceptance'):.1f} %" in text


def test_rules_are_counted(session):
    rows, _, _, page = session
    assert page.rules == Counter(r["rejected_by"] for r in rows if r["accepted"] is False)
    assert list(page.rules.values()) == sorted(page.rules.values(), reverse=True)


def test_thresholds_are_listed_as_given(session):
    _, _, html_path, _ = session
    text = html_path.read_text(encoding="utf-8")
    assert "<code>defocus_range_um</code></th><td>[0.5, 3.0]</td>" in text
    assert "<code>max_total_motion_a</code></th><td>30</td>" in text


def test_worst_exposures_rejected_first_then_by_resolution_then_motion(session):
    rows, _, _, page = session
    assert page.worst == expected_worst(rows, 6)
    by_movie = {r["movie"]: r for r in rows}
    first, second = (by_movie[m] for m in page.worst[:2])
    assert first["ctf_fit_resolution_a"] == second["ctf_fit_resolution_a"] == 15.0
    assert first["total_motion_a"] > second["total_motion_a"]
    assert all(by_movie[m]["accepted"] is False for m in page.worst)
    # each card shows its micrograph (JPEG) and power spectrum (PNG) side by side, besides the six figures
    assert sum(src.startswith("data:image/jpeg;base64,") for src in page.images) == 6
    assert sum(src.startswith("data:image/png;base64,") for src in page.images) == 6 + 6


def test_failed_exposures_are_listed_with_their_error(session):
    rows, _, html_path, page = session
    failed = sorted(
        (r for r in rows if r["status"] == "failed"), key=lambda r: r["acquired_at"], reverse=True
    )
    assert page.failed == [r["movie"] for r in failed]
    text = html_path.read_text(encoding="utf-8")
    for r in failed:
        assert r["error"] in text


def test_figures_are_pngs_of_a_sane_size(session):
    _, _, _, page = session
    assert list(page.figures) == list(FIGURES)
    for name, png in page.figures.items():
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), name
        with Image.open(io.BytesIO(png)) as im:
            assert 400 <= im.width <= 1600 and 250 <= im.height <= 1200, (name, im.size)
            # drawn on, not blank: a figure of data has many grey levels
            assert len(im.convert("L").getcolors(256) or []) > 20, name
        assert 5_000 < len(png) < 500_000, (name, len(png))


def test_session_plots_are_the_reports_figures(odd):
    rows, now, _, text = odd
    plots = session_plots(rows, now, ODD_THRESHOLDS)
    assert list(plots) == list(FIGURES)
    assert plots == Page(text).figures


def test_pdf_holds_the_summary_and_the_figures(session):
    _, _, html_path, _ = session
    pdf = (html_path.parent / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page\b", pdf)) == 1 + len(FIGURES)  # the summary, then each figure
    assert sorted(p.name for p in html_path.parent.iterdir()) == ["report.html", "report.pdf"]


def test_the_page_needs_no_network_and_runs_no_script(session):
    _, _, html_path, _ = session
    text = html_path.read_text(encoding="utf-8")
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text
    assert "default-src 'none'" in text


# ------------------------------------------------------------------------------- odd data and edge cases


ODD_SESSION = 'grid<script>alert("session")</script> & $x$'
ODD_THRESHOLDS = {"<i>rule</i>": "<u>1</u>", "max_ctf_fit_resolution_a": "six", "max_total_motion_a": 30}


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """A short session whose strings hold markup, whose pictures are missing or unreadable, and whose
    figures are partly None."""
    folder = tmp_path_factory.mktemp("odd")
    good_jpeg, good_png = folder / "good.jpg", folder / "good.png"
    Image.new("L", (64, 64), 90).save(good_jpeg)
    Image.new("L", (64, 64), 160).save(good_png)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    t0 = START

    def processed(i, movie, resolution, motion, accepted, rule=None, **more):
        return exposure(
            i,
            t0 + timedelta(minutes=i),
            "processed",
            movie=movie,
            processed_at=t0 + timedelta(minutes=i, seconds=50),
            total_motion_a=motion,
            ctf_fit_resolution_a=resolution,
            accepted=accepted,
            rejected_by=rule,
            **{"defocus_u_a": 15000.0, "defocus_v_a": 14000.0, **more},
        )

    rows = [
        processed(
            0,
            "<script>alert('movie')</script>.tiff",
            7.5,
            12.0,
            False,
            "<b>ctf_fit_resolution_a</b>",
            thumbnail=str(good_jpeg),
            spectrum=str(good_png),
        ),
        processed(1, "no_resolution.tiff", None, 40.0, False, "total_motion_a"),
        processed(
            2,
            "broken_pictures.tiff",
            8.0,
            None,
            False,
            "ctf_fit_resolution_a",
            thumbnail=str(folder / "broken.jpg"),
            spectrum=str(folder / "missing.png"),
        ),
        processed(3, "accepted.tiff", 3.2, 9.0, True),
        processed(4, "not_judged.tiff", None, None, None),
        processed(7, "rejected_without_rule.tiff", None, None, False, defocus_u_a=None, defocus_v_a=None),
        exposure(
            5,
            t0 + timedelta(minutes=5),
            "failed",
            movie='"><img src=x onerror=alert(1)>.tiff',
            processed_at=t0 + timedelta(minutes=6),
            error="<iframe src=//evil> & broken",
        ),
        exposure(6, t0 + timedelta(minutes=6), "waiting"),
    ]
    now = t0 + timedelta(minutes=8)
    html_path = write_session_report(folder / "report", ODD_SESSION, rows, ODD_THRESHOLDS, now, worst=10)
    return rows, now, html_path, html_path.read_text(encoding="utf-8")


def test_strings_from_the_data_are_escaped(odd):
    _, _, _, text = odd
    for raw in ("<script", "<b>ctf", "<img src=x", "<iframe", "<i>rule", "<u>1"):
        assert raw not in text, raw
    for escaped in (
        "grid&lt;script&gt;alert(&quot;session&quot;)&lt;/script&gt; &amp; $x$",
        "&lt;script&gt;alert(&#x27;movie&#x27;)&lt;/script&gt;.tiff",
        "&lt;b&gt;ctf_fit_resolution_a&lt;/b&gt;",
        "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;.tiff",
        "&lt;iframe src=//evil&gt; &amp; broken",
        "&lt;i&gt;rule&lt;/i&gt;",
    ):
        assert escaped in text, escaped
    page = Page(text)  # fails on any <script> element
    assert page.failed == ['"><img src=x onerror=alert(1)>.tiff']


def test_pictures_are_embedded_or_said_missing(odd):
    rows, now, html_path, text = odd
    page = Page(text)
    assert page.worst == expected_worst(rows, 10)
    assert page.worst == [
        "broken_pictures.tiff",
        "<script>alert('movie')</script>.tiff",
        "no_resolution.tiff",
        "rejected_without_rule.tiff",
        "accepted.tiff",
        "not_judged.tiff",
    ]
    assert page.rules[NO_RULE] == 1 and sum(page.rules.values()) == 4
    assert text.count("data:image/jpeg;base64,") == 1
    assert text.count(">unreadable<") == 1 and text.count(">file missing<") == 1
    assert text.count(">no micrograph<") == 4 and text.count(">no power spectrum<") == 4
    assert_summary(page, rows, now)
    assert (html_path.parent / "report.pdf").read_bytes().startswith(b"%PDF")


def _none_processed():
    return [
        exposure(i, START + timedelta(seconds=30 * i), "waiting" if i > 2 else "processing")
        for i in range(20)
    ]


def _all_failed():
    return [
        exposure(
            i,
            START + timedelta(seconds=30 * i),
            "failed",
            processed_at=START + timedelta(seconds=30 * i + 9),
            error=ERRORS[i % 3],
        )
        for i in range(20)
    ]


@pytest.mark.parametrize(
    "case, rows, worst, failed",
    [
        ("no exposures", [], 0, 0),
        ("none processed", _none_processed(), 0, 0),
        ("all failed", _all_failed(), 0, 20),
    ],
)
def test_edge_cases_still_make_a_report(tmp_path, case, rows, worst, failed):
    """Every figure is in the page (saying why it is empty); the PDF keeps only the summary and the
    progress curves, the one figure with something to show once anything was acquired."""
    now = START + timedelta(minutes=15)
    html_path = write_session_report(tmp_path, case, rows, THRESHOLDS, now)
    page = Page(html_path.read_text(encoding="utf-8"))
    assert_summary(page, rows, now)
    assert len(page.worst) == worst and len(page.failed) == failed
    assert page.worst == expected_worst(rows, 6)
    assert list(page.figures) == list(FIGURES)
    pdf = (tmp_path / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page\b", pdf)) == (1 if case == "no exposures" else 2)


def test_a_time_without_its_zone_is_refused(tmp_path):
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        write_session_report(tmp_path, "s", [], {}, datetime(2025, 3, 14, 9))
    naive = exposure(0, datetime(2025, 3, 14, 9), "waiting", movie="naive.tiff")
    with pytest.raises(ValueError, match="'naive.tiff': acquired_at must be a timezone-aware datetime"):
        session_plots([naive], START)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_previous_report(odd, tmp_path, monkeypatch):
    folder = shutil.copytree(odd[2].parent, tmp_path / "report")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken_pdf(path, *args):
        path.write_bytes(b"%PDF half a file")
        raise OSError("disk full")

    monkeypatch.setattr(session_report, "write_pdf", broken_pdf)
    with pytest.raises(OSError, match="disk full"):
        write_session_report(folder, "second", [], {}, START)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_fifty_thousand_exposures(tmp_path):
    """A 48-hour session at full speed: drawn in seconds (numpy, not a loop per exposure); the failed list is
    cut to the newest, so the page stays a few megabytes at most."""
    n = 50_000
    rng = np.random.default_rng(3)
    seconds = np.cumsum(rng.gamma(6.0, 3.4 / 6.0, n))
    motion = rng.gamma(4.5, 3.4, n).round(2)
    resolution = rng.lognormal(math.log(4.1), 0.22, n).round(2)
    defocus = rng.uniform(0.8e4, 2.6e4, n)
    failed = rng.random(n) < 0.03
    rows = [
        {
            "movie": f"FoilHole_{i}.tiff",
            "acquired_at": START + timedelta(seconds=float(seconds[i])),
            "processed_at": START + timedelta(seconds=float(seconds[i]) + 60),
            "status": "failed" if failed[i] else "processed",
            "error": "CTFFIND: no Thon rings" if failed[i] else None,
            "total_motion_a": None if failed[i] else float(motion[i]),
            "early_motion_a": None,
            "defocus_u_a": None if failed[i] else float(defocus[i]),
            "defocus_v_a": None if failed[i] else float(defocus[i]),
            "astigmatism_a": None,
            "ctf_fit_resolution_a": None if failed[i] else float(resolution[i]),
            "ctf_figure_of_merit": None,
            "ice_ring_density": None,
            "accepted": None if failed[i] else bool(motion[i] <= 30 and resolution[i] <= 6),
            "rejected_by": None
            if failed[i] or (motion[i] <= 30 and resolution[i] <= 6)
            else ("total_motion_a" if motion[i] > 30 else "ctf_fit_resolution_a"),
            "thumbnail": None,
            "spectrum": None,
        }
        for i in range(n)
    ]
    now = rows[-1]["acquired_at"] + timedelta(seconds=90)
    html_path = write_session_report(tmp_path, "long", rows, THRESHOLDS, now)  # its time: bench, not here
    page = Page(html_path.read_text(encoding="utf-8"))
    assert page.value("acquired") == n and page.value("failed") == failed.sum()
    assert len(page.failed) == FAILED_SHOWN
    assert html_path.stat().st_size < 3_000_000 and (tmp_path / "report.pdf").stat().st_size < 3_000_000


# ------------------------------------------------------------------------------------------ in a browser


def test_report_in_chromium(session, odd):
    """Opened from disk in headless Chromium at 1280 × 800: no request leaves the file, nothing is written to
    the console, every picture decodes, nothing is wider than the window; the odd session's markup stays text.
    Its screenshot is the docs' picture (made anew with EM_UPDATE_DOC_PICTURES=1)."""
    from tests.support.browser import new_page, open_browser, screenshot
    from tests.support.doc_pictures import keep_doc_picture

    _, _, html_path, _ = session
    with open_browser() as browser:
        page = new_page(browser, viewport={"width": 1280, "height": 800})
        requests, problems = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on(
            "console",
            lambda m: (
                problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None
            ),
        )
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
        page.goto(html_path.as_uri(), wait_until="load")
        images = page.locator("img").evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
        assert images and all(images), images
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        assert page.locator("#stat-acquired .value").inner_text() == "320"
        headings = page.locator("h2").all_inner_texts()
        picture = screenshot(page, "cryo-session-report")

        page.goto(odd[2].as_uri(), wait_until="load")
        assert page.locator("#session").inner_text() == ODD_SESSION
        assert page.locator("#failed code").first.inner_text() == '"><img src=x onerror=alert(1)>.tiff'
    assert not problems, problems
    assert [
        u for u in requests if u not in (html_path.as_uri(), odd[2].as_uri()) and not u.startswith("data:")
    ] == []
    keep_doc_picture(
        "cryo-session-report",
        picture,
        [h.strip().lower() for h in headings] + sorted(Page(html_path.read_text(encoding="utf-8")).stats),
    )
