"""A finished tilt series' intermediates, as the real processing leaves them, let go after the window; every
product byte stays; a series still processing, finished within the window, with a run, or whose files changed
within the window keeps them; nothing behind a symlink is touched; and the tomogram can be made again."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from em_platform.cryo import processing as proc
from em_platform.cryo import session as sess
from em_platform.cryo.alignment import AlignmentSettings
from em_platform.cryo.ctf import CTFSearch
from em_platform.cryo.motion import MotionSettings
from em_platform.cryo.optics import Microscope
from em_platform.cryo.results_db import CryoResults, tilt_series
from em_platform.retention.cryo import INTERMEDIATES, apply_cryo_policy
from tests.cryo.synthetic import make_tilt_series

NOW = datetime.now(UTC)
BEFORE = NOW - timedelta(days=14)
SCOPE = Microscope()
KEY = "sessions/grid1/TS_01"


def age(path: Path, days: int) -> None:
    when = (NOW - timedelta(days=days)).timestamp()
    for p in [path, *path.rglob("*")]:
        os.utime(p, (when, when), follow_symlinks=False)


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> tuple[sess.TiltSeries, Path]:
    """One small tilt series with movies through every step, as the cryo assets run them."""
    tmp = tmp_path_factory.mktemp("cryo")
    make_tilt_series(tmp / "sessions" / "grid1", "TS_01", size=64, angles=(-30, -15, 0, 15, 30), frames=3)
    (ts,), errors = sess.discover(tmp / "sessions", "sessions")
    assert errors == {} and ts.key == KEY
    ws = proc.Workspace(tmp / "work", ts.key)
    proc.motion_correct(ts, ws, MotionSettings(patches=(1, 1)))
    proc.estimate_ctf_series(ts, ws, SCOPE, CTFSearch(box=64))
    proc.align_series(ts, ws, AlignmentSettings())
    proc.tomogram_series(ts, ws, SCOPE, proc.TomogramSettings(methods=("wbp",)))
    proc.denoise_series(ts, ws, "tv")
    return ts, ws.dir


def _series(results: CryoResults, work: Path, source: Path, key: str, status: str, days: int) -> None:
    shutil.copytree(source, work / key)
    age(work / key, days)
    series = {"name": key.rsplit("/", 1)[-1], "kind": "tilt_series"}
    if status == "complete":
        results.replace(key, series=series, movie_rows=[], ctf_rows=[], alignment=None, tomogram_rows=[])
    else:
        results.mark(key, status, series=series)
    with results.engine.begin() as conn:
        when = NOW - timedelta(days=days)
        conn.execute(tilt_series.update().where(tilt_series.c.partition_key == key).values(updated_at=when))


def test_intermediates_go_products_stay(processed, tmp_path):
    ts, source = processed
    assert all((source / name).is_file() for name in INTERMEDIATES)  # what the processing really writes
    results = CryoResults(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    work = tmp_path / "work"
    for key, status, days in (
        ("s/done", "complete", 20),
        ("s/failed", "failed", 20),
        ("s/busy", "complete", 20),
        ("s/processing", "processing", 20),
        ("s/recent", "complete", 2),
        ("s/touched", "complete", 20),
    ):
        _series(results, work, source, key, status, days)
    killed = work / "s/done/.tomogram.staging-0a1b2c3d"  # what a killed run left
    killed.mkdir()
    (killed / "stack.mrc").write_bytes(b"s" * 100)
    age(killed, 20)
    (work / "s/touched/tomogram/stack.mrc").touch()  # re-made yesterday by a run of cryo/tomogram
    before = {key: tree(work / key) for key in ("s/done", "s/failed", "s/busy", "s/processing", "s/recent")}
    before["s/touched"] = tree(work / "s/touched")
    intermediate_bytes = sum((source / name).stat().st_size for name in INTERMEDIATES)

    report = apply_cryo_policy(work, results=results, before=BEFORE, busy={"s/busy"})

    assert sorted(report.series) == ["s/done", "s/failed", "s/touched"]
    stack = (source / "tomogram/stack.mrc").stat().st_size
    assert report.freed_bytes == 3 * intermediate_bytes + 100 - stack
    for key in ("s/done", "s/failed"):
        products = {n: b for n, b in before[key].items() if n not in INTERMEDIATES and "staging" not in n}
        assert tree(work / key) == products  # every product, byte for byte
    assert not killed.exists()
    assert tree(work / "s/touched") == {
        n: b for n, b in before["s/touched"].items() if n not in INTERMEDIATES[:2]
    }  # the stack changed within the window: kept
    for key in ("s/busy", "s/processing", "s/recent"):
        assert tree(work / key) == before[key]
    again = apply_cryo_policy(work, results=results, before=BEFORE, busy={"s/busy"})
    assert (again.series, again.freed_bytes) == ([], 0)

    # the tomogram made again after the window, without motion correction: its halves from the even/odd tilts
    doc = proc.tomogram_series(
        ts, proc.Workspace(work, "s/done"), SCOPE, proc.TomogramSettings(methods=("wbp",))
    )
    assert doc["halves_from"] == "tilts" and Path(doc["files"]["wbp"]).is_file()
    results.dispose()


def test_nothing_behind_a_symlink_is_touched(processed, tmp_path):
    _, source = processed
    results = CryoResults(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    work, outside = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(source, outside / "TS_02")
    _series(results, work, source, "s/linked_file", "complete", 20)
    even = work / "s/linked_file/motioncorr/even.mrc"
    even.unlink()
    even.symlink_to(outside / "TS_02" / "motioncorr" / "even.mrc")  # an intermediate is a link out
    (work / "s/linked_folder").symlink_to(outside, target_is_directory=True)  # a series' folder behind a link
    _series(results, outside, source, "TS_03", "complete", 20)  # made there; its key names it via the link
    with results.engine.begin() as conn:
        conn.execute(
            tilt_series.update()
            .where(tilt_series.c.partition_key == "TS_03")
            .values(partition_key="s/linked_folder/TS_03")
        )
    kept = tree(outside)

    report = apply_cryo_policy(work, results=results, before=BEFORE, busy=())

    assert tree(outside) == kept
    assert even.is_symlink() and not (work / "s/linked_file/motioncorr/odd.mrc").exists()
    assert len(report.refused) == 2 and all("symlink" in r for r in report.refused)
    results.dispose()
