"""A tilt series' tilts corrected by cryo-live as they land, and taken by the series' run: each tilt once its
movie is there, before the series is complete; the run takes every kept tilt that matches what it would
compute (the same micrographs as correcting them itself), corrects again one whose movie was written again,
and lets go of what it took. Once the run has begun the series is the run's: cryo-live corrects no more."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mrcfile
import numpy as np

from em_platform.cryo import processing as proc
from em_platform.cryo import session as sess
from em_platform.cryo.exposures_db import ExposureStore
from em_platform.cryo.live_sessions import LiveCryo
from em_platform.cryo.live_tilts import LiveTilts
from em_platform.cryo.motion import MotionSettings
from em_platform.cryo.results_db import CryoResults
from tests.cryo.synthetic import make_tilt_series

KEY = "sessions/grid1/TS_01"


def _corrected(ts, work: Path, live: Path | None) -> tuple[dict, np.ndarray]:
    doc = proc.motion_correct(ts, proc.Workspace(work, ts.key), MotionSettings(), live_root=live)
    with mrcfile.open(work / ts.key / "motioncorr" / "corrected.mrc") as m:
        return doc, m.data.copy()


def test_tilts_are_corrected_as_they_land_and_the_run_takes_them(tmp_path):
    root, out, held = tmp_path / "sessions", tmp_path / "live", tmp_path / "held"
    make_tilt_series(root / "grid1", "TS_01", size=96, angles=(-6, 0, 6), frames=4)
    movies = sorted((root / "grid1" / "frames").iterdir())
    held.mkdir()
    for movie in movies[1:]:  # the mdoc names three tilts; one movie saved so far
        shutil.move(movie, held / movie.name)
    store = ExposureStore(f"sqlite:///{tmp_path}/results.sqlite")
    service = LiveCryo({"sessions": root}, store, out)
    try:
        service.scan()
        assert service.process_tilt() and not service.process_tilt()  # one tilt there, corrected once
        kept = sorted(p.name for p in (out / KEY / "tilts").iterdir())
        assert kept == [movies[0].name]
        for movie in movies[1:]:  # the others land
            shutil.move(held / movie.name, movie)
        service.scan()
        while service.process_tilt():
            service.scan()
        assert sorted(p.name for p in (out / KEY / "tilts").iterdir()) == [m.name for m in movies]
        restarted = LiveCryo({"sessions": root}, store, out)
        restarted.scan()
        assert not restarted.process_tilt()  # what the stopped service kept is not corrected again

        (ts,), errors = sess.discover(root, "sessions")
        assert not errors and ts.key == KEY
        fresh_doc, fresh = _corrected(ts, tmp_path / "fresh", None)
        os.utime(movies[2], ns=(1, 2))  # written again after cryo-live corrected it
        (ts,), _ = sess.discover(root, "sessions")
        doc, taken = _corrected(ts, tmp_path / "run", out)
        live = {t["movie"]: t.get("live", False) for t in doc["tilts"]}
        assert live == {str(movies[0]): True, str(movies[1]): True, str(movies[2]): False}
        np.testing.assert_allclose(taken, fresh, rtol=1e-5, atol=1e-5 * float(np.abs(fresh).max()))
        assert [t["total_motion_px"] for t in doc["tilts"]] == [
            t["total_motion_px"] for t in fresh_doc["tilts"]
        ]
        assert not any((out / KEY / "tilts").iterdir())  # what it took is let go of
    finally:
        store.dispose()


def test_once_the_run_has_begun_cryo_live_leaves_the_series_to_it(tmp_path):
    root, out = tmp_path / "sessions", tmp_path / "live"
    make_tilt_series(root / "grid1", "TS_01", size=96, angles=(-6, 0, 6), frames=4)
    url = f"sqlite:///{tmp_path}/results.sqlite"
    store = ExposureStore(url)
    results = CryoResults(url)
    try:
        results.mark(KEY, "processing", series={"name": "TS_01", "kind": "tilt_series"})
        service = LiveCryo({"sessions": root}, store, out)
        service.scan()
        assert not service.process_tilt()
        assert not (out / KEY).exists()
        assert LiveTilts(out).folder(KEY, Path("x.tif")) == out / KEY / "tilts" / "x.tif"
    finally:
        results.dispose()
        store.dispose()
