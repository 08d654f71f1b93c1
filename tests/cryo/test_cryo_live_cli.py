"""`em-platform cryo-live` as an operator runs it: killed with SIGKILL while it processes an exposure, the next
start processes every exposure once (the dead one's claim taken back at once), and its metrics say how many
landed and were processed and how far processing is behind."""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import starfile

from em_platform.cryo.exposures_db import PROCESSED, PROCESSING, ExposureStore
from tests.cryo.synthetic import make_movie_set
from tests.support.cryo_live_service import start_cryo_live
from tests.support.metrics import scrape
from tests.support.polling import wait_until
from tests.support.ports import free_port

SESSION = "sessions/grid1/micrographs"


def test_killed_mid_exposure_the_next_start_processes_each_exposure_once(tmp_path):
    root = tmp_path / "sessions"
    make_movie_set(root / "grid1", n_movies=4, size=1024, frames=8)
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    port = free_port()
    store = ExposureStore(url)
    first, _ = start_cryo_live(tmp_path / "data", root, url, port)
    try:
        claimed = wait_until(
            lambda: [r for r in store.rows(SESSION) if r["status"] == PROCESSING],
            120,
            "an exposure claimed",
            0.05,
        )
        os.killpg(first.pid, signal.SIGKILL)  # mid-exposure: its claim and maybe a half-written file left
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    restarted = datetime.now(UTC)
    second, started = start_cryo_live(tmp_path / "data", root, url, port)
    try:
        rows = wait_until(
            lambda: (r := store.rows(SESSION)) and all(x["status"] == PROCESSED for x in r) and r,
            120,
            "every exposure processed",
            0.05,
        )
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        assert samples[("em_cryo_processing_lag_seconds", ())] == 0
        by_second = sum(r["processed_at"] > restarted for r in rows)
        assert samples[("em_cryo_exposures_total", (("session_state", "processed"),))] == by_second >= 1
    finally:
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=60)
    store.dispose()
    assert second.returncode == 0 and "cryo-live: stopped" in out
    assert sorted(r["movie"] for r in rows) == [f"FoilHole_{i:04d}_fractions.tif" for i in range(4)]
    again = {r["movie"]: r for r in rows}[claimed[0]["movie"]]
    assert again["attempts"] == 2  # the killed one's claim was taken back, not waited out, and done once
    assert "taking back the exposures of cryo-live@" in started
    out_dir = tmp_path / "data" / "cryo" / "live" / SESSION
    ctf = starfile.read(out_dir / "micrographs_ctf.star")["micrographs"]
    assert sorted(ctf["rlnMicrographName"]) == sorted(r["micrograph"] for r in rows)  # each once
    published = sorted(p.name for p in (out_dir / "micrographs").iterdir() if not p.name.startswith("."))
    assert published == sorted(Path(r["micrograph"]).name for r in rows)
