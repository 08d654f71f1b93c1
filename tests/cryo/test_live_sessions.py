"""Live single-particle sessions: each exposure processed once as its movie lands, judged against the
session's thresholds, re-judged without recomputing when they change; a movie still being written waits, a
corrupt one fails alone naming the file; a worker's claim that runs out is processed again, once."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import starfile

from em_platform.cryo.exposures_db import FAILED, PROCESSED, WAITING, ExposureStore
from em_platform.cryo.live_sessions import LiveCryo
from tests.cryo.synthetic import make_movie_set

SESSION = "sessions/grid1/micrographs"


class Clock:
    def __init__(self, t: float = 1.0e9):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/results.sqlite"
    return request.getfixturevalue("pg_url")


def _service(root: Path, url: str, out: Path, **kw) -> LiveCryo:
    return LiveCryo({"sessions": root}, ExposureStore(url), out, **kw)


def test_each_exposure_is_processed_once_as_it_lands_and_judged(tmp_path, url):
    root, out = tmp_path / "sessions", tmp_path / "out"
    truths = make_movie_set(root / "grid1", n_movies=3, size=256)
    service = _service(root, url, out)
    try:
        assert service.scan() == 3 and service.scan() == 0
        while service.process_next():
            pass
        service.write_stars(force=True)
        rows = service.store.rows(SESSION)
        assert [r["movie"] for r in rows] == [t["movie"] for t in truths]
        for row, truth in zip(rows, truths, strict=True):
            assert row["status"] == PROCESSED and row["attempts"] == 1 and row["error"] is None
            mean = (truth["defocus_u_A"] + truth["defocus_v_A"]) / 2
            assert abs((row["defocus_u_a"] + row["defocus_v_a"]) / 2 - mean) < 0.05 * mean
            assert 0 < row["total_motion_a"] < 50 and row["accepted"] is not None
            for name in ("micrograph", "thumbnail", "spectrum"):
                assert (out / SESSION / row[name]).is_file()
        ctf = starfile.read(out / SESSION / "micrographs_ctf.star")
        assert list(ctf["micrographs"]["rlnMicrographName"]) == [r["micrograph"] for r in rows]
        assert all((out / SESSION / m).is_file() for m in ctf["micrographs"]["rlnMicrographName"])
        accepted = out / SESSION / "accepted" / "micrographs_ctf.star"
        assert len(starfile.read(accepted)["micrographs"]) == sum(r["accepted"] for r in rows)
        # a new movie lands: only it is processed
        make_movie_set(tmp_path / "more", n_movies=4, size=256, seed=1)
        for name in ("FoilHole_0003_fractions.tif", "FoilHole_0003_fractions.tif.mdoc"):
            shutil.copy(tmp_path / "more" / name, root / "grid1" / name)
        assert service.scan() == 1
        assert service.process_next() and not service.process_next()
        assert len(service.store.rows(SESSION)) == 4
    finally:
        service.store.dispose()


def test_a_movie_still_being_written_waits_and_a_corrupt_one_fails_alone(tmp_path, url):
    root, out, clock = tmp_path / "sessions", tmp_path / "out", Clock()
    make_movie_set(root / "grid1", n_movies=3, size=256)
    grid = root / "grid1"
    whole = (grid / "FoilHole_0001_fractions.tif").read_bytes()
    (grid / "FoilHole_0001_fractions.tif").write_bytes(whole[: len(whole) // 2])  # the writer is half-way
    (grid / "FoilHole_0002_fractions.tif").write_bytes(b"II*\0" + bytes(len(whole) - 4))  # garbage
    service = _service(root, url, out, give_up_s=120, clock=clock)
    try:
        assert service.scan() == 1  # only the whole one
        clock.t += 60
        (grid / "FoilHole_0001_fractions.tif").write_bytes(whole)  # written and closed
        assert service.scan() == 1
        assert service.scan() == 0  # the garbage one has not changed for 60 s: it waits still
        clock.t += 61
        assert service.scan() == 0  # given up: recorded as failed, not as complete
        while service.process_next():
            pass
        rows = {r["movie"]: r for r in service.store.rows(SESSION)}
        assert rows["FoilHole_0000_fractions.tif"]["status"] == PROCESSED
        assert rows["FoilHole_0001_fractions.tif"]["status"] == PROCESSED
        bad = rows["FoilHole_0002_fractions.tif"]
        assert bad["status"] == FAILED and "FoilHole_0002_fractions.tif" in bad["error"]
        assert "unchanged for 120 s" in bad["error"] and "--retry" in bad["error"]
    finally:
        service.store.dispose()


def test_a_changed_threshold_rejudges_the_session_without_recomputing(tmp_path, url):
    root, out = tmp_path / "sessions", tmp_path / "out"
    make_movie_set(root / "grid1", n_movies=3, size=256)
    service = _service(root, url, out)
    try:
        service.scan()
        while service.process_next():
            pass
        before = service.store.rows(SESSION)
        assert all(r["accepted"] for r in before), [r["rejected_by"] for r in before]
        worst = max(before, key=lambda r: r["ctf_fit_resolution_a"])
        limit = (worst["ctf_fit_resolution_a"] + min(r["ctf_fit_resolution_a"] for r in before)) / 2
        (root / "grid1" / "em_session.yaml").write_text(f"curation:\n  max_ctf_fit_resolution_a: {limit}\n")
        service.scan()
        after = {r["movie"]: r for r in service.store.rows(SESSION)}
        assert after[worst["movie"]]["accepted"] is False
        assert after[worst["movie"]]["rejected_by"] == "ctf_fit_resolution"
        assert [after[r["movie"]]["processed_at"] for r in before] == [r["processed_at"] for r in before]
        (root / "grid1" / "em_session.yaml").write_text("curation:\n  max_ctf_fit_resolution_a: null\n")
        service.scan()
        assert all(r["accepted"] for r in service.store.rows(SESSION))
        (root / "grid1" / "em_session.yaml").write_text("curation:\n  max_total_motion: 3\n")  # a typo
        service.scan()  # logged; the thresholds keep their last values
        assert all(r["accepted"] for r in service.store.rows(SESSION))
    finally:
        service.store.dispose()


def test_a_claim_that_runs_out_is_processed_again_once(tmp_path, url):
    root, out = tmp_path / "sessions", tmp_path / "out"
    make_movie_set(root / "grid1", n_movies=1, size=256)
    dead = _service(root, url, out, lease_s=30)
    live = _service(root, url, out, lease_s=30)
    try:
        dead.scan()
        claim = dead.store.claim(dead.owner, timedelta(seconds=-1))  # claimed, then its worker died
        assert claim is not None and live.store.rows(SESSION)[0]["status"] == "processing"
        live.scan()
        assert live.process_next() and not live.process_next()
        (row,) = live.store.rows(SESSION)
        assert row["status"] == PROCESSED and row["attempts"] == 2
        assert not dead.store.save(claim, dead.owner, {}, live.sessions[SESSION].thresholds)  # too late
        assert live.store.rows(SESSION)[0]["defocus_u_a"] == row["defocus_u_a"]
    finally:
        dead.store.dispose()
        live.store.dispose()


def test_an_exposure_that_keeps_killing_its_worker_is_failed_not_retried_forever(tmp_path, url):
    store = ExposureStore(url)
    try:
        from datetime import UTC, datetime

        store.add("s/micrographs", [("m.tif", datetime.now(UTC))])
        for _ in range(3):
            assert store.claim("a", timedelta(seconds=-1)) is not None
        assert store.claim("a", timedelta(seconds=30)) is None
        (row,) = store.rows("s/micrographs")
        assert row["status"] == FAILED and "3 times" in row["error"]
        assert store.retry("s/micrographs") == 1 and store.rows("s/micrographs")[0]["status"] == WAITING
    finally:
        store.dispose()
