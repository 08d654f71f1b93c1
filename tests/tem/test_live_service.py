"""The warm live-QC service (issue 26, point 1): a real `em-platform live-qc` process judges a montage the
simulated scope is acquiring, is killed with SIGKILL mid-montage, and its restart resumes from the journal;
the montage's run, coming after, takes every verdict over. Each tile is judged once (its verdict's
``processed_at`` never changes once set) and the montage completes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from em_platform.settings import load_settings
from em_platform.simulation.scope import simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.storage.store import DataStore
from em_platform.tem.journal import Journal
from em_platform.tem.judging import JudgingClaim, processed_tile_paths
from em_platform.tem.montage_run import MontageRunConfig, run_montage
from em_platform.tem.tile_source import JournalTileSource
from tests.support.environment import clean_env
from tests.support.metrics import scrape
from tests.support.polling import wait_until
from tests.support.ports import free_port

MONTAGE = "live-service-m1"
EM_PLATFORM = Path(sys.executable).parent / "em-platform"


class Service:
    """`em-platform live-qc` in its own process; ``lines`` is what it printed so far."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [str(EM_PLATFORM), "live-qc"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        wait_until(
            lambda: any("watching the journal" in line for line in self.lines), 120, "live-qc to start"
        )

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def _judged(journal: Journal) -> dict[str, object]:
    return {
        t.tile_id: t.processed_at
        for t in journal.tiles(MONTAGE)
        if not t.is_reference and t.qc_passed is not None
    }


def test_a_killed_live_service_resumes_and_each_tile_is_judged_once(tmp_path):
    if not EM_PLATFORM.exists():
        pytest.skip(f"{EM_PLATFORM} not installed (make .venv/.installed)")
    tiles = tmp_path / "scope"
    env = clean_env("EM_", "DAGSTER_", "DASK_")
    env.update(EM_DATA_ROOT=str(tmp_path / "data"), EM_SCOPE_SHARES=str(tiles), EM_SCOPE_PIXEL_SIZE_NM="4")
    settings = load_settings(env)
    journal = Journal(settings.catalog_url, tile_shares=[str(tiles)])
    first = Service(env)
    config = ScopeConfig(rows=3, columns=4, overlap=0.15, jitter_px=8.0, rate=2.0)
    scope = threading.Thread(
        target=simulate_montage,
        args=(config, tiles / MONTAGE, journal.record),
        kwargs={"montage_id": MONTAGE},
    )
    scope.start()
    before = wait_until(lambda: len(_judged(journal)) >= 3 and _judged(journal), 120, "three verdicts")
    first.kill()
    at_kill = len(_judged(journal))
    assert len(before) < 12, "the service judged the whole montage before the kill: nothing was resumed"
    metrics = f"127.0.0.1:{free_port()}"
    second = Service({**env, "EM_LIVE_QC_METRICS": metrics})  # waits out the killed claim, then resumes
    try:
        scope.join(60)
        try:
            judged = wait_until(
                lambda: len(_judged(journal)) == 12 and _judged(journal), 60, "a verdict for every tile"
            )
        except AssertionError:
            print("FIRST", "".join(first.lines)[-3000:], "SECOND", "".join(second.lines)[-5000:])
            raise
        assert {t: judged[t] for t in before} == before  # judged before the kill: not judged again
        # the montage's run, after the service let go: every verdict taken over, none judged or sent again
        wait_until(lambda: journal.judging(MONTAGE) is None, 60, "the service to release the montage")
        # what the restarted service judged, as Prometheus reads it: the tiles by scope share, each latency
        assert any(f"metrics at http://{metrics}/metrics" in line for line in second.lines)
        samples = scrape(f"http://{metrics}/metrics")
        assert samples[("em_tiles_judged_total", (("scope", "scope"), ("verdict", "passed")))] == 12 - at_kill
        assert samples[("em_live_qc_latency_seconds_count", ())] == 12 - at_kill
        assert 0 < samples[("em_live_qc_latency_seconds_sum", ())] < 60 * (12 - at_kill)
    finally:
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(60) == 0, "".join(second.lines)
    buffer = DataStore(settings.buffer)
    final, staging = processed_tile_paths(buffer, MONTAGE)
    claim = JudgingClaim(journal, MONTAGE, "run test")
    assert claim.take()
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
    ) as cluster:
        with Client(cluster) as client:
            source = JournalTileSource(journal, pixel_size_nm=4.0)
            result = run_montage(
                MONTAGE,
                source,
                client,
                processed_url=staging,
                announce_url=final,
                config=MontageRunConfig(poll_seconds=0.05),
            )
    claim.release()
    assert all(r.resumed for r in result.tiles.values()) and len(result.tiles) == 12
    assert _judged(journal) == judged
    assert result.qc.status == "GOOD"
    assert len({m["tile_id"] for m in journal.messages("qc.tile", MONTAGE)}) == 12
