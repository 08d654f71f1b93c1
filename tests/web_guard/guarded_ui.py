"""`make dev`'s Dagster part (``python -m em_platform.webserver dev``: the daemon and the guarded webserver)
on a tiny code location, and the GraphQL to start its sensor and read its state."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.browser import REPO, stop_process
from tests.support.environment import clean_env
from tests.support.ports import free_port

LOCATION = "tests.web_guard.tiny_defs"
SELECTOR = (
    f'{{repositoryLocationName: "{LOCATION}", repositoryName: "__repository__", sensorName: "tiny_sensor"}}'
)
START = f"mutation {{ startSensor(sensorSelector: {SELECTOR}) {{ __typename }} }}"
STATE = f"{{ sensorOrError(sensorSelector: {SELECTOR}) {{ ... on Sensor {{ sensorState {{ status }} }} }} }}"


@dataclass
class GuardedUI:
    url: str
    process: subprocess.Popen
    log: Path

    def post(self, query: str, headers: dict | None = None) -> dict:
        req = urllib.request.Request(
            self.url + "/graphql",
            data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def sensor_status(self) -> str:
        return self.post(STATE)["data"]["sensorOrError"]["sensorState"]["status"]


@contextlib.contextmanager
def guarded_ui(tmp_path: Path, timeout: float = 180) -> Iterator[GuardedUI]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    env = clean_env("DAGSTER_", "EM_")
    env.update(DAGSTER_HOME=str(home), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "em_platform.webserver",
        "dev",
        "-m",
        LOCATION,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    log = tmp_path / "dev.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    ui = GuardedUI(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if ui.sensor_status():
                    break
            except (OSError, KeyError, TypeError):  # not listening yet, or the location still loading
                time.sleep(0.3)  # poll interval while it starts
        yield ui
    finally:
        stop_process(proc)
