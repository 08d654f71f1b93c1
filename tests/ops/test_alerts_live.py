"""The operations suite (make test-ops): a real Prometheus scrapes the platform's services, evaluates the
alert rules of docker/prometheus/alerts.yml unchanged, and a real Alertmanager pages a webhook receiver; each
fault is injected, its alert must reach the pager, and clear when the fault is repaired.

Faults, all at once: the live-QC service killed (ServiceDown), the only Dask worker killed (NoDaskWorker), a
scope that stops in the middle of a montage (ScopeSilent: two minutes of silence, then the rule's minute) and
the buffer's disk filled (BufferDiskLow, after its five minutes). The operators' page is checked in a browser
while the scope is silent."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import tifffile

from em_platform.settings import load_settings
from em_platform.tem.journal import Journal
from tests.support.browser import new_page, open_browser, screenshot
from tests.support.doc_pictures import keep_doc_picture
from tests.support.environment import clean_env
from tests.support.monitoring import Monitoring, missing
from tests.support.ports import free_port

EM_PLATFORM = Path(sys.executable).parent / "em-platform"
DASK = Path(sys.executable).parent / "dask"
TILES = 6
CONSOLE_SECTIONS = ["Alerts firing", "Scopes", "Live QC", "Storage", "Runs, last hour", "Services"]


class Process:
    """A service in its own process (a group of its own), up once it printed ``ready``."""

    def __init__(self, argv: list[str], env: dict[str, str], ready: str):
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        up = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if ready in line:
                    up.set()

        threading.Thread(target=read, daemon=True).start()
        if not up.wait(120):
            self.stop()
            raise AssertionError(f"{argv[:2]} did not start: {''.join(self.lines)[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to its group (a Dask worker's nanny and its worker alike)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def small_filesystem(folder: Path, mib: int):
    """A tmpfs of ``mib`` MiB at ``folder``: a buffer disk an operator can fill (needs root)."""
    folder.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)], capture_output=True
    )
    if done.returncode:
        pytest.skip(
            f"cannot mount a small filesystem for the buffer ({done.stderr.decode().strip()}): needs root"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_each_fault_pages_the_operator_and_clears_when_repaired(tmp_path):
    """All four at once, each repaired once it paged: the live-QC service killed (ServiceDown), the only Dask
    worker killed (NoDaskWorker), a scope silent in the middle of a montage (ScopeSilent) and the buffer's
    disk filled (BufferDiskLow), each after its rule's own time."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    if not EM_PLATFORM.exists():
        pytest.skip(f"{EM_PLATFORM} not installed (make .venv/.installed)")
    with small_filesystem(tmp_path / "buffer", 16) as buffer:
        _faults(tmp_path, buffer)


def _faults(tmp_path: Path, buffer: Path) -> None:
    share = tmp_path / "scope"
    share.mkdir()
    env = clean_env("EM_", "DAGSTER_", "DASK_")
    env.update(
        EM_DATA_ROOT=str(tmp_path / "data"),
        EM_SCOPE_SHARES=str(share),
        EM_SCOPE_PIXEL_SIZE_NM="4",
        EM_BUFFER=str(buffer),
    )
    live_at, exporter_at = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    scheduler, dask_http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    live = ([str(EM_PLATFORM), "live-qc"], {**env, "EM_LIVE_QC_METRICS": live_at}, "watching the journal")
    worker = (
        [str(DASK), "worker", f"tcp://{scheduler}", "--nthreads", "1", "--no-dashboard"],
        env,
        "Registered to",
    )
    running: dict[str, Process] = {}
    monitoring = None
    try:
        running["live-qc"] = Process(*live)
        running["metrics"] = Process(
            [str(EM_PLATFORM), "metrics"], {**env, "EM_METRICS": exporter_at}, "metrics: the facility"
        )
        host, port = scheduler.split(":")
        running["scheduler"] = Process(
            [str(DASK), "scheduler", "--host", host, "--port", port, "--dashboard-address", dask_http],
            env,
            "Scheduler at",
        )
        running["worker"] = Process(*worker)
        targets = {"live-qc": [live_at], "metrics": [exporter_at], "dask-scheduler": [dask_http]}
        monitoring = Monitoring(tmp_path / "monitoring", targets)
        monitoring.wait_until_up(set(targets))
        pager = monitoring.pager

        # the scope starts a montage, sends a row of tiles and falls silent
        journal = Journal(load_settings(env).catalog_url, tile_shares=[str(share)])
        (share / "m-ops").mkdir()
        journal.record("montage.status", {"montage_id": "m-ops", "state": "started", "total_tiles": 12})
        rng = np.random.default_rng(0)
        for column in range(TILES):
            tile = share / "m-ops" / f"t{column}.tif"
            tifffile.imwrite(tile, rng.integers(0, 4000, (256, 256), dtype=np.uint16))
            payload = {"tile_id": f"m-ops-t{column}", "montage_id": "m-ops", "row": 0, "column": column}
            journal.record("tile.raw", payload | {"path": str(tile)})
        silent_since = time.time()
        # the buffer's disk filled past 90 %; the live-QC service and the only Dask worker killed
        filler = buffer / "left-over.bin"
        filler.write_bytes(b"\0" * (buffer_free(buffer) - 512 * 1024))
        filled = time.time()
        running["live-qc"].kill()
        running["worker"].kill()
        killed = time.time()

        down = pager.wait_for("ServiceDown", "firing", 180, job="live-qc", instance=live_at)
        assert down["labels"]["severity"] == "page" and down["annotations"]["runbook"].endswith(
            "#servicedown"
        )
        assert _at(down["startsAt"]) >= killed + 55  # `for: 1m`, not the first missed scrape
        running["live-qc"] = Process(*live)
        pager.wait_for("ServiceDown", "resolved", 120, job="live-qc")

        workerless = pager.wait_for("NoDaskWorker", "firing", 240, job="dask-scheduler")
        assert _at(workerless["startsAt"]) >= killed + 115  # `for: 2m`
        running["worker"] = Process(*worker)
        pager.wait_for("NoDaskWorker", "resolved", 120, job="dask-scheduler")

        # the silent scope: paged after its two minutes and the rule's minute, cleared once the montage ends
        silent = pager.wait_for("ScopeSilent", "firing", 300, scope="scope")
        assert _at(silent["startsAt"]) >= silent_since + 170
        _the_console_shows_it(monitoring.console)
        journal.record("montage.status", {"montage_id": "m-ops", "state": "completed", "total_tiles": TILES})
        pager.wait_for("ScopeSilent", "resolved", 120, scope="scope")

        full = pager.wait_for("BufferDiskLow", "firing", 420)
        assert _at(full["startsAt"]) >= filled + 290  # `for: 5m`
        filler.unlink()
        pager.wait_for("BufferDiskLow", "resolved", 120)

        # nothing else paged: the exporter stayed up, no montage waits for its upload
        fired = {a["labels"]["alertname"] for a in pager.alerts}
        assert fired == {"ServiceDown", "NoDaskWorker", "ScopeSilent", "BufferDiskLow"}, fired
        assert {
            a["labels"].get("job") for a in pager.alerts if a["labels"]["alertname"] == "ServiceDown"
        } == {"live-qc"}
        journal.dispose()
    finally:
        if monitoring is not None:
            monitoring.stop()
        for p in running.values():
            p.stop()


def buffer_free(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _the_console_shows_it(url: str) -> None:
    """The operator's page in a browser: the alert firing, the silent scope's open montage and its tiles."""
    with open_browser() as browser:
        page = new_page(browser, viewport={"width": 1280, "height": 900})
        page.goto(url, wait_until="load")
        text = page.inner_text("body")
        for section in CONSOLE_SECTIONS:
            assert section in text, text
        firing = [
            [cell.strip() for cell in row.split("\t")] for row in page.locator("tr.firing").all_inner_texts()
        ]
        assert [row[:3] for row in firing] == [["ScopeSilent", "page", "scope scope"]], firing
        scope_row = page.locator("tr", has_text="ago").first.inner_text()  # scope, open, last tile ... ago
        assert scope_row.split()[:2] == ["scope", "1"], scope_row
        assert "live-qc" in text and "metrics" in text and "down" not in text
        picture = screenshot(page, "operations-console", full_page=True)
    keep_doc_picture("operations-console", picture, CONSOLE_SECTIONS)


def _at(stamp: str) -> float:
    """Alertmanager's RFC 3339 time (nanoseconds, Z) as Unix seconds."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{frac or 0}")
