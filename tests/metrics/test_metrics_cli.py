"""`em-platform metrics` as an operator starts it: the facility's gauges and the runs served until SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.environment import clean_env
from tests.support.metrics import scrape
from tests.support.ports import free_port

EM_PLATFORM = Path(sys.executable).parent / "em-platform"


def test_the_exporter_serves_the_stores_and_the_runs_and_stops_on_sigterm(tmp_path):
    if not EM_PLATFORM.exists():
        pytest.skip(f"{EM_PLATFORM} not installed (make .venv/.installed)")
    (tmp_path / "home").mkdir()
    port = free_port()
    env = clean_env("EM_", "DAGSTER_")
    env.update(EM_DATA_ROOT=str(tmp_path / "data"), DAGSTER_HOME=str(tmp_path / "home"), EM_METRICS=str(port))
    proc = subprocess.Popen(
        [str(EM_PLATFORM), "metrics"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/metrics" in line, line + proc.stderr.read()
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        for store in ("journal", "catalog", "buffer"):
            assert samples[("em_store_up", (("store", store),))] == 1
        assert (
            samples[("em_journal_backlog", ())] == 0 and samples[("em_montage_upload_lag_seconds", ())] == 0
        )
        assert ("process_resident_memory_bytes", ()) in samples
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "metrics: stopped" in out


def test_a_bad_address_is_refused_naming_the_setting(tmp_path):
    if not EM_PLATFORM.exists():
        pytest.skip(f"{EM_PLATFORM} not installed (make .venv/.installed)")
    env = clean_env("EM_", "DAGSTER_")
    env.update(EM_DATA_ROOT=str(tmp_path / "data"), EM_METRICS="scope-pc:9472")
    done = subprocess.run([str(EM_PLATFORM), "metrics"], env=env, capture_output=True, text=True, timeout=60)
    assert (
        done.returncode == 2
        and "EM_METRICS='scope-pc:9472'" in done.stderr
        and "not an IP address" in done.stderr
    )
