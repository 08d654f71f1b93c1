"""A real Prometheus and Alertmanager (Debian's) for the operations suite, configured by
:mod:`em_platform.deploy.monitoring`, and the webhook receiver an operator's pager would be: it keeps every
notification Alertmanager sends."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from em_platform.deploy.monitoring import CONSOLES, alertmanager_config, prometheus_config
from tests.support.ports import free_port

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


def missing() -> str | None:
    """Why the suite cannot run here, or None."""
    if PROMETHEUS is None or ALERTMANAGER is None:
        return "Debian's prometheus and prometheus-alertmanager are not installed (as root: make ops-engine)"
    return None


class Pager(ThreadingHTTPServer):
    """Alertmanager's webhook receiver: every alert of every notification, in order."""

    daemon_threads = True

    def __init__(self):
        self.alerts: list[dict] = []
        self.changed = threading.Condition()
        pager = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with pager.changed:
                    pager.alerts.extend(body["alerts"])
                    pager.changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/alerts"

    def wait_for(self, alertname: str, status: str, timeout: float, **labels: str) -> dict:
        """The first notification of ``alertname`` with ``status`` (firing, resolved) and ``labels``."""

        def found():
            return next(
                (
                    a
                    for a in self.alerts
                    if a["labels"].get("alertname") == alertname
                    and a["status"] == status
                    and all(a["labels"].get(k) == v for k, v in labels.items())
                ),
                None,
            )

        with self.changed:
            if not self.changed.wait_for(found, timeout):
                raise AssertionError(
                    f"no {status} {alertname} {labels} within {timeout} s; got {self.alerts}"
                )
            return found()


def prometheus_args(config: Path, data: Path, listen: str) -> list[str]:
    """Debian's ``prometheus`` with ``config``, its data in ``data``, serving its API and the facility's
    console at ``listen`` (``HOST:PORT``)."""
    return [
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address={listen}",
        f"--web.console.templates={CONSOLES}",
        f"--web.console.libraries={CONSOLES}",
    ]


class Monitoring:
    """Prometheus scraping ``targets`` (job -> addresses) with the platform's alert rules, and Alertmanager
    sending to a :class:`Pager`; both stopped by :meth:`stop`."""

    def __init__(self, folder: Path, targets: dict[str, list[str]], interval_s: float = 1.0):
        self.pager = Pager()
        self.prometheus_port, self.alertmanager_port = free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "alertmanager.yml").write_text(
            yaml.safe_dump(alertmanager_config(self.pager.url, group_wait_s=1, group_interval_s=interval_s))
        )
        (folder / "prometheus.yml").write_text(
            yaml.safe_dump(
                prometheus_config(targets, f"127.0.0.1:{self.alertmanager_port}", interval_s=interval_s)
            )
        )
        self.logs = [open(folder / "alertmanager.log", "w"), open(folder / "prometheus.log", "w")]  # noqa: SIM115
        self.procs = [
            subprocess.Popen(
                [
                    ALERTMANAGER,
                    f"--config.file={folder / 'alertmanager.yml'}",
                    f"--storage.path={folder / 'alertmanager'}",
                    f"--web.listen-address=127.0.0.1:{self.alertmanager_port}",
                    "--cluster.listen-address=",  # one Alertmanager: no gossip port
                ],
                stdout=self.logs[0],
                stderr=subprocess.STDOUT,
            ),
            subprocess.Popen(
                [
                    PROMETHEUS,
                    *prometheus_args(
                        folder / "prometheus.yml", folder / "tsdb", f"127.0.0.1:{self.prometheus_port}"
                    ),
                ],
                stdout=self.logs[1],
                stderr=subprocess.STDOUT,
            ),
        ]
        self.folder = folder

    @property
    def console(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}/consoles/facility.html"

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.prometheus_port}/api/v1/{path}", timeout=10
        ) as r:
            return json.loads(r.read())["data"]

    def wait_until_up(self, jobs: set[str], timeout: float = 60.0) -> None:
        """Every target of ``jobs`` scraped and up."""
        deadline = time.monotonic() + timeout
        state: object = "not answering"
        while time.monotonic() < deadline:
            try:
                active = self.api("targets")["activeTargets"]
                state = {t["labels"]["job"]: t["health"] for t in active}
                if {j for j, health in state.items() if health == "up"} >= jobs:
                    return
            except OSError as exc:
                state = exc
            time.sleep(0.2)  # polling Prometheus's view, with a deadline
        raise AssertionError(f"targets not up within {timeout} s: {state}; see {self.folder}")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in self.logs:
            log.close()
        self.pager.shutdown()
