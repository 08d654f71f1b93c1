"""`em-platform demo` on a fresh DAGSTER_HOME: everything ingests, and a second run changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and "catalog.sqlite" not in p.name
    }


@pytest.mark.slow
def test_demo_twice(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(home), "EM_DATA_ROOT": str(tmp_path / "data")}
    env.pop("EM_INBOX", None), env.pop("EM_CATALOG_URL", None)
    cmd = [sys.executable, "-m", "em_platform.cli", "demo"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "runs this time: 7 ingested, 0 failed" in first.stdout
    assert first.stdout.count(" complete ") == 8  # 7 samples + the demo montage
    assert "montages this time: 1 processed, 0 failed" in first.stdout
    assert "stitched: 36 matches, 0 rejected" in first.stdout  # 5 x 5 grid, the blank tile matches nothing
    assert (tmp_path / "data" / "acquisition" / "demo-montage-5x5" / "montage.ome.zarr" / "zarr.json").is_file()
    before = _tree(tmp_path / "data")
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 new sample(s)" in second.stdout and "(nothing new)" in second.stdout
    assert _tree(tmp_path / "data") == before
