"""`em-platform cryo-live` started as an operator starts it, for the test and the bench that drive it: its own
process and session, its settings from the environment only."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.support.environment import clean_env

READY = "cryo-live: processing each"  # the line the service prints once it watches its sessions


def start_cryo_live(
    data_root: Path,
    sessions: Path,
    catalog_url: str,
    metrics_port: int,
    echo: Callable[[str], None] | None = None,
) -> tuple[subprocess.Popen, str]:
    """The service once it says it is ready, and what it printed until then (each line also to ``echo``).

    The caller's platform, Dagster and Dask settings are left out: the service reads only the ones given."""
    env = clean_env("EM_", "DAGSTER_", "DASK_")
    env.update(
        EM_DATA_ROOT=str(data_root),
        EM_CRYO_SESSIONS=str(sessions),
        EM_CATALOG_URL=catalog_url,
        EM_CRYO_LIVE_METRICS=f"127.0.0.1:{metrics_port}",
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "em_platform.cli", "cryo-live"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # as make dev and deploy-local start it: a session of its own
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if echo:
            echo(line)
        if READY in line:
            return proc, "".join(lines)
    raise RuntimeError(f"cryo-live exited ({proc.wait()}) before it was ready:\n{''.join(lines)}")
