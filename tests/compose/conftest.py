"""docker/compose.yaml up as real containers on this host (podman here, Docker elsewhere), once for every test
in tests/compose/ (`make test-compose`): the images built by `make images`, the stack brought up by `make
compose-up`, exactly as the deployment page says, with an env file of the test's own (a project name,
secrets and host ports of its own, so it never meets an operator's stack) that `COMPOSE_ENV` names, as an
operator with two stacks would. Skipped, saying why, where no container engine runs.

The tests look at the platform's work from the host, as an operator's tools would: Dagster's GraphQL on the
published UI port, the catalog in the stack's PostgreSQL and the objects in its S3 server (both published on
loopback for the tests only: tests/compose/compose.test.yaml), the inbox and the scopes' share on the data
volume's folder, the microscope on the published STOMP port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from em_platform.deploy.images import ImageError, engine, engine_env
from em_platform.deploy.stack import Stack, read_env, write_env_file
from tests.deploy.dagster_api import DagsterApi, wait_until
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
TEST_FILE = Path(__file__).with_name("compose.test.yaml")
# Operator settings that make the test quicker, all of them settings of docker/.env: sensors tick every second
# (the daemon's loop still sets a 5 s floor), an inbox entry counts as arrived half a second after its last
# change, two single-threaded Dask workers on this 2-core machine.
TEST_SETTINGS = {
    "EM_SENSOR_INTERVAL_SECONDS": "1",
    "EM_INBOX_SETTLE_SECONDS": "0.5",
    "DASK_WORKERS": "2",
    "DASK_WORKER_THREADS": "1",
    "DASK_WORKER_MEMORY": "2GiB",
}


@dataclass(frozen=True)
class Machine:
    """Where the host reaches the stack's broker (tests/deploy's helpers read these names)."""

    stomp_host: str
    stomp_port: int
    stomp_user: str
    stomp_password: str
    stomp_tls: str  # the broker's CA: its published port speaks STOMP over TLS only


@dataclass
class HostView:
    """The stack as the host sees it, with the attribute names tests/deploy's fault helpers read."""

    stack: Stack
    settings: dict[str, str]
    data: Path  # the data volume's folder on the host (/data in the containers)
    webserver: str  # through the proxy: TLS and a login
    viewer: str
    catalog_url: str
    platform_env: dict[str, str]
    machine: Machine
    timings: dict[str, float] = field(default_factory=dict)
    cafile: str = ""  # the proxy's CA root, which the stack's TLS certificates chain to

    @property
    def login(self) -> tuple[str, str]:
        """The UI user `make compose-up` made (what an operator logs in with)."""
        return ("admin", read_env(self.stack.env_file)["EM_UI_ADMIN_PASSWORD"])

    def browser_options(self) -> dict:
        """Playwright context options for the proxy: its login (the proxy's CA is not the system's)."""
        user, password = self.login
        return {"http_credentials": {"username": user, "password": password}, "ignore_https_errors": True}

    def get(self, url: str, auth: tuple[str, str] | None = None, timeout: float = 10):
        """GET through the proxy, trusting its CA; ``auth`` defaults to the admin login (None: no login)."""
        import base64
        import ssl
        import urllib.request

        headers = {}
        if auth is not False:
            user, password = auth or self.login
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        req = urllib.request.Request(url, headers=headers)
        return urllib.request.urlopen(
            req, timeout=timeout, context=ssl.create_default_context(cafile=self.cafile)
        )

    @property
    def scheduler(self) -> str:
        return f"tls://127.0.0.1:{self.settings['EM_TEST_DASK_PORT']}"

    def dask_security(self):
        """The cluster's TLS certificate, from its volume (what the runs mount), as a Dask client's security."""
        from distributed.security import Security

        from em_platform.deploy.dask_tls import CA, CERT, KEY

        done = self.stack.engine_cmd(
            "volume", "inspect", "--format", "{{.Mountpoint}}", f"{self.stack.project}-dask-certs", check=True
        )
        certs = Path(done.stdout.strip())
        return Security(
            require_encryption=True,
            tls_ca_file=str(certs / CA),
            tls_client_cert=str(certs / CERT),
            tls_client_key=str(certs / KEY),
        )

    def make(self, target: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        """`make TARGET` as the docs show it, with this stack's env file (COMPOSE_ENV)."""
        env = {**os.environ, "COMPOSE_ENV": str(self.stack.env_file)}
        return subprocess.run(
            ["make", "-s", target], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )

    # -- the stack's containers, from the host -----------------------------------------------------------

    def container(self, service: str, replica: int = 0) -> str:
        return self.stack.container_names(service)[replica]

    def kill(self, service: str, replica: int = 0) -> int:
        """SIGKILL to the service container's main process, as a crash (``podman kill`` would be a stop an
        operator asked for, which restart policies respect); returns the PID."""
        pid = self.stack.state_of(self.container(service, replica))["Pid"]
        os.kill(pid, 9)
        return pid

    def wait_back(self, service: str, replica: int = 0, after_pid: int | None = None, timeout: float = 300):
        """Until the service's container runs again (restarted by its restart policy) and is healthy."""
        name = self.container(service, replica)

        def back():
            st = self.stack.state_of(name)
            if st["Status"] != "running" or st["Pid"] in (0, after_pid):
                return False
            if st["Healthcheck"]:
                return self.stack.engine_cmd("healthcheck", "run", name).returncode == 0
            return True

        return wait_until(back, timeout, f"{service} back after a crash", 1.0)


def _skip(reason: str):
    print(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> HostView:
    try:
        tool = engine()
    except ImageError as exc:
        _skip(f"{exc}; the compose deployment tests skipped")
    if tool == "podman" and not shutil.which("debootstrap"):
        _skip("podman without debootstrap cannot make the Debian base here; the compose tests skipped")
    state = tmp_path_factory.mktemp("compose")
    env_file = state / "stack.env"
    ports = {k: str(free_port()) for k in ("EM_WEB_PORT", "EM_VIEWER_PORT", "EM_BROKER_PORT")}
    ports |= {k: str(free_port()) for k in ("EM_TEST_PG_PORT", "EM_TEST_S3_PORT", "EM_TEST_DASK_PORT")}
    project = f"emtest{uuid.uuid4().hex[:6]}"
    write_env_file(
        env_file,
        tool,
        {
            "COMPOSE_PROJECT_NAME": project,
            **ports,
            "EM_VIEWER_URL": f"https://127.0.0.1:{ports['EM_VIEWER_PORT']}",
            "EM_UI_USERS": str(state / "ui-users"),  # its own logins, not docker/proxy/users
            **TEST_SETTINGS,
        },
    )
    began = time.monotonic()
    view = None
    try:
        images = subprocess.run(
            ["make", "-s", "images"], cwd=REPO, capture_output=True, text=True, timeout=3600
        )
        assert images.returncode == 0, images.stdout[-3000:] + images.stderr[-3000:]
        print(images.stdout[-1500:])
        built = time.monotonic()
        stack = Stack(env_file, state)
        files = [str(f) for f in stack.compose_files()] + [str(TEST_FILE)]
        with env_file.open("a") as f:
            f.write(f"COMPOSE_FILE={os.pathsep.join(files)}\n")
        settings = read_env(env_file)
        view = HostView(
            stack=stack,
            settings=settings,
            data=Path("/nonexistent"),
            webserver=f"https://127.0.0.1:{settings['EM_WEB_PORT']}",
            viewer=settings["EM_VIEWER_URL"],
            catalog_url=(
                f"postgresql+psycopg2://{settings['POSTGRES_USER']}:{settings['POSTGRES_PASSWORD']}"
                f"@127.0.0.1:{settings['EM_TEST_PG_PORT']}/{settings['EM_CATALOG_DB']}"
            ),
            platform_env={},
            machine=Machine(
                "127.0.0.1",
                int(settings["EM_BROKER_PORT"]),
                settings["EM_BROKER_USERNAME"],
                settings["EM_BROKER_PASSWORD"],
                str(state / "broker-ca.pem"),  # written once the stack is up
            ),
        )
        up = view.make("compose-up")
        assert up.returncode == 0, f"make compose-up:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        print(up.stdout)
        view.timings.update(images_s=built - began, up_s=time.monotonic() - built)
        view.data = stack.data_volume_path()
        (state / "proxy-ca.pem").write_text(stack.proxy_ca())
        view.cafile = str(state / "proxy-ca.pem")
        (state / "broker-ca.pem").write_text(stack.broker_ca())
        view.platform_env = {
            "EM_INBOX": str(view.data / "inbox"),
            "EM_DATA_ROOT": f"s3://{settings['EM_S3_BUCKET']}/em",
            "EM_S3_ENDPOINT_URL": f"http://127.0.0.1:{settings['EM_TEST_S3_PORT']}",
            "AWS_ACCESS_KEY_ID": settings["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": settings["AWS_SECRET_ACCESS_KEY"],
        }
        yield view
    finally:
        down = [sys.executable, "-m", "em_platform.deploy", "compose-down", "--volumes"]
        down += ["--env-file", str(env_file), "--state", str(state)]
        gone = subprocess.run(down, cwd=REPO, env=engine_env(), capture_output=True, text=True)
        print(f"\ncompose stack {project}: {time.monotonic() - began:.0f} s in all; {gone.stdout.strip()}")


@pytest.fixture(scope="session")
def dagster_api(stack) -> DagsterApi:
    return DagsterApi(stack.webserver, auth=stack.login, cafile=stack.cafile)


# The modules share one stack and change it in this order: up, the workload, the attacks, faults, down and up.
ORDER = ("test_stack.py", "test_workload.py", "test_trust.py", "test_faults.py", "test_down_and_up.py")


def pytest_terminal_summary(terminalreporter):
    """What each fault cost, and how long the stack took to build and start: printed after the tests and
    kept in test-artifacts/compose/faults.json."""
    from tests.compose.test_faults import RESULTS

    if not RESULTS:
        return
    out = Path(os.environ.get("EM_TEST_ARTIFACTS", REPO / "test-artifacts")) / "compose"
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps([r.doc() for r in RESULTS], indent=1))
    terminalreporter.write_line(
        "faults on the compose containers (recovery from the kill until every item complete):"
    )
    for r in RESULTS:
        terminalreporter.write_line(
            f"  {r.fault:<14} during {r.during:<7} items {r.items}  lost {r.lost}  duplicated {r.duplicated}  "
            f"recovered in {r.recovery_s:5.1f} s  (service back in {r.service_back_s:5.1f} s)"
        )


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = Path(str(item.fspath)).name
        return ORDER.index(name) if name in ORDER else len(ORDER)

    items.sort(key=rank)
