"""``make compose-up`` / ``compose-down`` / ``compose-status``: docker/compose.yaml up as containers on this host.

With Docker this is ``docker compose up -d --wait``. With podman (no Docker engine; this project's machines),
three things Docker does itself are done here, each with podman's own tools:

- **the Docker API** the daemon's ``DockerRunLauncher`` launches runs through: ``podman system service``
  serves it on a socket (``DOCKER_SOCKET`` in the env file, mounted into the daemon only), started here when
  nothing answers there and stopped by ``down``;
- **readiness**: podman-compose (the compose client for podman) starts services in dependency order but,
  with podman before 4.6, does not wait for ``service_healthy``, and podman runs healthchecks from systemd
  timers, which a host without systemd lacks. So services start in waves, and before a wave every
  dependency it names is waited for as compose would: its healthcheck run (``podman healthcheck run``) until
  it passes, a one-shot service until it exited 0;
- **images compose cannot pull**: the official server images' stand-ins (:mod:`em_platform.deploy.standins`)
  are layered in with ``docker/compose.standin.yaml`` when they are what this host has.

``down`` removes every container of the stack, the run containers included (a run cut short is failed and
retried by run monitoring at the next ``up``), and keeps the named volumes: the next ``up`` finds every
record and object.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from em_platform.deploy.compose import COMPOSE_FILE
from em_platform.deploy.images import DOCKER, REPO, engine, engine_env, image_exists
from em_platform.deploy.services import ACCESS_KEYS, COMPLETED, HEALTHY, SECRETS, SERVICES, Service
from em_platform.deploy.standins import STANDIN_FILE, STANDINS
from em_platform.deploy.templates import interpolate
from em_platform.storage.private import write_private

ENV_EXAMPLE = DOCKER / ".env.example"
DEFAULT_ENV_FILE = DOCKER / ".env"
PODMAN_SOCKET = "/run/podman/podman.sock"  # podman's own place for root's API socket
HEALTH_POLL_S = 2.0
# the host ports the stack publishes (docker/compose.yaml), by the setting that chooses each
PUBLISHED_PORTS = {"EM_WEB_PORT": "proxy", "EM_VIEWER_PORT": "proxy", "EM_BROKER_PORT": "rabbitmq"}
ADMIN = "admin"  # the UI user make compose-up makes; its password is EM_UI_ADMIN_PASSWORD in the env file
ENV_EXAMPLE_DEFAULTS = {"EM_WEB_PORT": "3000", "EM_VIEWER_PORT": "3030", "EM_BROKER_PORT": "61614"}


class StackError(RuntimeError):
    """The stack did not come up or go down; the message names the service and quotes its log."""


# -- settings ---------------------------------------------------------------------------------------------


def read_env(path: Path) -> dict[str, str]:
    """A compose env file: KEY=VALUE lines (comments and blank lines skipped; no quoting)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def write_env_file(path: Path, tool: str, overrides: dict[str, str] | None = None) -> list[str]:
    """docker/.env from the example with a new random secret for each secret, the engine's API socket, and
    a free host port where the example's is taken; returns what it changed, for the operator to read."""
    settings = {
        **{name: secrets.token_urlsafe(24) for name in SECRETS},
        **{name: f"em-{secrets.token_hex(4)}" for name in ACCESS_KEYS},
    }
    notes = [f"{', '.join(sorted(settings))}: new random values"]
    if tool == "podman":
        settings["DOCKER_SOCKET"] = PODMAN_SOCKET
        notes.append(f"DOCKER_SOCKET={PODMAN_SOCKET} (podman's Docker API, started by make compose-up)")
    example = read_env(ENV_EXAMPLE)
    for key in PUBLISHED_PORTS:
        port = int(example[key])
        if not _port_free(port):
            settings[key] = str(_free_port_from(port + 10))
            notes.append(f"{key}={settings[key]} ({port} is taken on this host)")
    if "EM_VIEWER_PORT" in settings:
        settings["EM_VIEWER_URL"] = f"https://127.0.0.1:{settings['EM_VIEWER_PORT']}"
    settings["EM_UI_ADMIN_PASSWORD"] = secrets.token_urlsafe(18)
    notes.append(f"the UI's login: {ADMIN} with EM_UI_ADMIN_PASSWORD")
    settings.update(overrides or {})
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=", line)
        if m and m.group(1) in settings:
            line = f"{m.group(1)}={settings.pop(m.group(1))}"
        lines.append(line)
    lines += [f"{k}={v}" for k, v in settings.items()]  # settings the example leaves to their defaults
    write_private(path, "\n".join(lines) + "\n")  # secrets: never readable by others, not for a moment
    return notes


def ui_users_file(settings: dict[str, str]) -> Path:
    """The proxy's users file (EM_UI_USERS, relative to docker/)."""
    return (DOCKER / (settings.get("EM_UI_USERS") or "./proxy/users")).resolve()


def set_ui_user(path: Path, name: str, password: str) -> bool:
    """Add user ``name`` to the door's users file, or change its password; True when it was new. The file
    holds bcrypt hashes only, readable by its owner only (a hash can still be guessed at offline)."""
    import bcrypt

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", name):
        raise StackError(f"UI user name {name!r}: letters, digits and . _ @ - (at most 64)")
    if len(password) < 12:
        raise StackError(f"the password of UI user {name!r} must have at least 12 characters")
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(12)).decode()
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.split(maxsplit=1)[:1] != [name]]
    path.parent.mkdir(parents=True, exist_ok=True)
    # rewritten in place, not renamed over: the door's container has this very file (its inode) mounted
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # a file an earlier release left readable by others, too
        f.truncate()
        f.write("\n".join([*kept, f"{name} {hashed}"]) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return len(kept) == len(lines)


def ensure_ui_users(env_file: Path) -> str | None:
    """The proxy's users file, made with the user admin when there is none (its password the env file's
    EM_UI_ADMIN_PASSWORD, written there new when absent); returns a note for the operator, or None."""
    settings = read_env(env_file)
    path = ui_users_file(settings)
    if path.exists() and path.read_text().strip():
        return None
    password = settings.get("EM_UI_ADMIN_PASSWORD") or ""
    if not password:
        password = secrets.token_urlsafe(18)
        with env_file.open("a") as f:
            f.write(f"EM_UI_ADMIN_PASSWORD={password}\n")
    set_ui_user(path, ADMIN, password)
    return f"wrote {path}: the UI's login is {ADMIN}, its password EM_UI_ADMIN_PASSWORD in {env_file}"


def _free_port_from(port: int) -> int:
    while not _port_free(port):
        port += 1
    return port


# -- the stack --------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """One compose project on this host: its env file, its name, and the engine that runs it."""

    env_file: Path = DEFAULT_ENV_FILE
    state: Path = REPO / "var" / "compose"
    tool: str = ""

    def __post_init__(self) -> None:
        self.tool = self.tool or engine()
        self.env_file = Path(self.env_file).resolve()
        self.state = Path(self.state).resolve()

    @property
    def settings(self) -> dict[str, str]:
        return read_env(self.env_file)

    @property
    def project(self) -> str:
        return self.settings.get("COMPOSE_PROJECT_NAME") or "em-platform"

    def setting(self, name: str, default: str) -> str:
        return self.settings.get(name) or default

    # -- commands ------------------------------------------------------------------------------------

    def uses_standins(self) -> bool:
        """The official server images are not here and their stand-ins are (``make images`` decided)."""
        official = all(image_exists(self.tool, s.official) for s in STANDINS)
        standins = all(image_exists(self.tool, s.image) for s in STANDINS if s.build)
        return not official and standins

    def compose_files(self) -> list[Path]:
        """``COMPOSE_FILE`` of the env file (compose's own setting: files separated by ':', relative to
        docker/) where it is set; otherwise compose.yaml, with the stand-ins where they are what this host has."""
        listed = self.settings.get("COMPOSE_FILE", "")
        if listed:
            return [(DOCKER / f).resolve() for f in listed.split(os.pathsep) if f]
        return [COMPOSE_FILE, *([STANDIN_FILE] if self.uses_standins() else [])]

    def compose_argv(self) -> list[str]:
        files = [arg for f in self.compose_files() for arg in ("-f", str(f))]
        if self.tool == "docker":
            return ["docker", "compose", "-p", self.project, "--env-file", str(self.env_file), *files]
        return [
            sys.executable,
            "-m",
            "podman_compose",
            "-p",
            self.project,
            "--env-file",
            str(self.env_file),
            *files,
        ]

    def compose(self, *args: str, check: bool = True, quiet: bool = True) -> subprocess.CompletedProcess:
        argv = [*self.compose_argv(), *args]
        done = subprocess.run(argv, env=engine_env(), capture_output=quiet, text=True, cwd=DOCKER)
        if check and done.returncode != 0:
            raise StackError(
                f"`{' '.join(args)}` failed (exit {done.returncode}):\n{(done.stderr or '')[-3000:]}"
            )
        return done

    def engine_cmd(
        self, *args: str, check: bool = False, timeout: float | None = 120
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [self.tool, *args], env=engine_env(), capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise StackError(f"`{self.tool} {' '.join(args)}` failed: {done.stderr.strip()[-2000:]}")
        return done

    # -- what runs ------------------------------------------------------------------------------------

    def containers(self, service: str | None = None, all_states: bool = True) -> list[dict]:
        """The stack's containers (compose's labels), as the engine lists them."""
        args = ["ps", "--format", "json", "--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        if all_states:
            args.append("-a")
        done = self.engine_cmd(*args, check=True)
        return _json_rows(done.stdout)

    def run_containers(self) -> list[dict]:
        """Containers the run launcher started on this stack's network (Dagster labels each with its run)."""
        done = self.engine_cmd(
            "ps",
            "-a",
            "--format",
            "json",
            "--filter",
            "label=dagster/run_id",
            "--filter",
            f"network={self.project}",
            check=True,
        )
        return _json_rows(done.stdout)

    def container_names(self, service: str) -> list[str]:
        return sorted(_name(c) for c in self.containers(service))

    # -- the engine's API (podman) -------------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        return self.setting("DOCKER_SOCKET", "/var/run/docker.sock")

    def api_answers(self) -> bool:
        return _socket_get(self.socket_path, "/_ping") == "OK"

    def ensure_api(self) -> None:
        """Serve the Docker API on DOCKER_SOCKET with ``podman system service`` unless something answers there."""
        if self.tool != "podman" or self.api_answers():
            return
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a socket file left by a service that died
        self.state.mkdir(parents=True, exist_ok=True)
        log = open(self.state / "podman-api.log", "ab")
        proc = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket_path}"],
            env=engine_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.api_pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + 30
        while not self.api_answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(
                    f"podman's API did not come up on {self.socket_path}; see {self.state / 'podman-api.log'}"
                )
            time.sleep(0.2)

    @property
    def api_pid_file(self) -> Path:
        """Beside the socket: the API serves every stack on the host, whichever started it."""
        return Path(f"{self.socket_path}.em-platform.pid")

    def stop_api(self) -> bool:
        """Stop the API service a ``make compose-up`` started (one started by someone else is theirs to stop)."""
        pid_file = self.api_pid_file
        if not pid_file.exists():
            return False
        pid = int(pid_file.read_text())
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"system\x00service" in cmdline and self.socket_path.encode() in cmdline:
                os.killpg(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
        pid_file.unlink()
        return True

    # -- up ------------------------------------------------------------------------------------------

    def waves(self) -> list[list[Service]]:
        """Services in waves: each wave's dependencies are all in earlier waves."""
        done: set[str] = set()
        waves = []
        pending = list(SERVICES)
        while pending:
            wave = [s for s in pending if set(s.depends_on) <= done]
            if not wave:
                raise StackError(f"depends_on has a cycle among {[s.name for s in pending]}")
            waves.append(wave)
            done |= {s.name for s in wave}
            pending = [s for s in pending if s.name not in done]
        return waves

    def up(self, timeout: float = 600) -> float:
        """Bring the stack up; returns the seconds it took."""
        began = time.monotonic()
        if not self.env_file.exists():
            raise StackError(
                f"{self.env_file} does not exist: `make compose-up` writes one, or copy docker/.env.example"
            )
        self._check_settings()
        self._check_ports()
        self.ensure_api()
        if self.tool == "docker":
            self.compose("up", "-d", "--wait", "--wait-timeout", str(int(timeout)), quiet=False)
            return time.monotonic() - began
        deadline = began + timeout
        for wave in self.waves():
            waited = {d: c for s in wave for d, c in s.depends_on.items()}
            for dep, condition in waited.items():
                self.wait_for(dep, condition, deadline)
            names = [s.name for s in wave]
            stale = [n for n in names if self.image_changed(n)]
            print(f"starting {', '.join(names)}", flush=True)
            if stale:  # docker compose recreates a container whose image was rebuilt; podman-compose does not
                print(f"  recreating {', '.join(stale)}: its image was rebuilt", flush=True)
                self.compose("up", "-d", "--no-deps", "--no-build", "--force-recreate", *stale)
            self.compose("up", "-d", "--no-deps", "--no-build", *[n for n in names if n not in stale])
        for svc in SERVICES:  # what nothing depends on is waited for too: up means everything answers
            if svc.probe and svc.probe.kind != "log":
                self.wait_for(svc.name, HEALTHY, deadline)
        return time.monotonic() - began

    def _check_settings(self) -> None:
        """The env file's settings against compose.yaml's ``${VAR:?...}``: a missing one is named before anything starts."""
        try:
            interpolate(COMPOSE_FILE.read_text(), {**self.settings, **_set_in_env()})
        except KeyError as exc:
            raise StackError(f"{self.env_file}: {exc}") from None

    def _check_ports(self) -> None:
        """A host port the stack publishes that something else holds is named before anything starts."""
        own = {  # host ports this stack's containers hold now (compose recreates them as it needs)
            int(p.get("host_port") or p.get("PublicPort") or 0)
            for c in self.containers(all_states=False)
            for p in (c.get("Ports") or [])
            if isinstance(p, dict)
        }
        for setting in PUBLISHED_PORTS:
            port = self.settings.get(setting) or ENV_EXAMPLE_DEFAULTS.get(setting, "")
            if port.isdigit() and int(port) not in own and not _port_free(int(port)):
                raise StackError(
                    f"{setting}={port}: the port is taken on this host (by another service); "
                    f"set a free one in {self.env_file}"
                )

    def wait_for(self, service: str, condition: str, deadline: float) -> None:
        """Wait until ``service`` meets a compose ``depends_on`` condition (every replica of it)."""
        names = self.container_names(service)
        if not names:
            raise StackError(f"{service}: no container (it was never created)")
        deadline = min(deadline, time.monotonic() + _patience(service))
        for name in names:
            while True:
                state = self.state_of(name)
                if condition == COMPLETED:
                    if state["Status"] == "exited":
                        if state["ExitCode"] != 0:
                            raise StackError(f"{service} exited {state['ExitCode']}:\n{self.logs(name)}")
                        break
                elif state["Status"] == "running":
                    if condition != HEALTHY or not state.get("Healthcheck"):
                        break
                    if self.engine_cmd("healthcheck", "run", name).returncode == 0:
                        break
                elif state["Status"] == "exited" and condition == HEALTHY and state["Restart"] == "no":
                    raise StackError(
                        f"{service} exited {state['ExitCode']} before it was healthy:\n{self.logs(name)}"
                    )
                if time.monotonic() > deadline:
                    raise StackError(
                        f"{service} is not {condition.removeprefix('service_')} in time (state {state['Status']}):\n"
                        f"{self.logs(name)}"
                    )
                time.sleep(HEALTH_POLL_S)

    def image_changed(self, service: str) -> bool:
        """A container of ``service`` runs an older build of its image than the tag names now."""
        for c in self.containers(service):
            current = self.engine_cmd("image", "inspect", "--format", "{{.Id}}", c.get("Image", ""))
            if current.returncode == 0 and not current.stdout.strip().startswith(c.get("ImageID", "")[:12]):
                return True
        return False

    def state_of(self, name: str) -> dict:
        done = self.engine_cmd("inspect", "--type", "container", name, check=True)
        [info] = json.loads(done.stdout)
        st = info["State"]
        return {
            "Status": st.get("Status", "").lower(),
            "ExitCode": st.get("ExitCode", 0),
            "Healthcheck": bool((info.get("Config") or {}).get("Healthcheck")),
            "Health": ((st.get("Health") or st.get("Healthcheck") or {}).get("Status") or ""),
            "Restart": ((info.get("HostConfig") or {}).get("RestartPolicy") or {}).get("Name") or "no",
            "Pid": st.get("Pid", 0),
        }

    def logs(self, name: str, lines: int = 30) -> str:
        done = self.engine_cmd("logs", "--tail", str(lines), name)
        return (done.stdout + done.stderr).strip()

    # -- down ----------------------------------------------------------------------------------------

    def down(self, volumes: bool = False) -> list[str]:
        """Remove every container of the stack (runs included); keep the volumes unless ``volumes``."""
        removed = []
        runs = [_name(c) for c in self.run_containers()]
        if runs:  # on the stack's network: compose cannot remove the network while they are on it
            self.engine_cmd("rm", "-f", "-t", "10", *runs, check=True)
            removed += runs
        before = [_name(c) for c in self.containers()]
        args = ["down", "--remove-orphans"] + (["--volumes"] if volumes else [])
        self.compose(*args, check=False)
        left = [_name(c) for c in self.containers()]
        if left:  # compose stopped what it knows of; a container it does not (a changed file) goes too
            self.engine_cmd("rm", "-f", *left, check=True)
        if self.tool == "podman":
            if self.engine_cmd("network", "exists", self.project).returncode == 0:
                self.engine_cmd("network", "rm", self.project)
            if volumes:
                for vol in _json_rows(self.engine_cmd("volume", "ls", "--format", "json").stdout):
                    if vol.get("Name", "").startswith(f"{self.project}"):
                        self.engine_cmd("volume", "rm", "-f", vol["Name"])
            if not self.other_stacks_running():  # the API serves every stack on this host
                self.stop_api()
        return removed + before

    def other_stacks_running(self) -> list[str]:
        """Compose projects other than this one with a running container on this host."""
        done = self.engine_cmd(
            "ps", "--format", "json", "--filter", "label=com.docker.compose.project", check=True
        )
        projects = {
            (c.get("Labels") or {}).get("com.docker.compose.project") for c in _json_rows(done.stdout)
        }
        return sorted(p for p in projects if p and p != self.project)

    # -- status --------------------------------------------------------------------------------------

    def status(self) -> list[tuple[str, str, str]]:
        """(container, state, health) of every container of the stack and of its runs; health checked now."""
        rows = []
        for c in self.containers() + self.run_containers():
            name = _name(c)
            st = self.state_of(name)
            health = "-"
            if st["Healthcheck"] and st["Status"] == "running":
                health = (
                    "healthy" if self.engine_cmd("healthcheck", "run", name).returncode == 0 else "unhealthy"
                )
            rows.append((name, st["Status"], health))
        return rows

    def proxy_ca(self) -> str:
        """The proxy's CA certificate (PEM), which browsers and clients are told to trust: constrained to the
        names the proxy serves (em_platform/deploy/proxy_tls.py)."""
        [name] = self.container_names("proxy")
        return self.engine_cmd("exec", name, "cat", "/certs/ca.pem", check=True).stdout

    def broker_ca(self) -> str:
        """The CA certificate (PEM) of the broker's STOMP TLS port, which the microscope PCs trust."""
        [name] = self.container_names("rabbitmq")
        return self.engine_cmd("exec", name, "cat", "/etc/rabbitmq/tls/ca.pem", check=True).stdout

    def data_volume_path(self) -> Path:
        """Where the stack's data volume (the inbox, the scopes' share, the buffer) is on this host."""
        done = self.engine_cmd(
            "volume", "inspect", "--format", "{{.Mountpoint}}", f"{self.project}-data", check=True
        )
        return Path(done.stdout.strip())

    def banner(self) -> str:
        s = self.settings
        web = f"https://127.0.0.1:{s.get('EM_WEB_PORT') or 3000}"
        lines = [
            f"em_platform stack `{self.project}` up ({self.tool}; `make compose-status`, `make compose-down`):",
            f"  Dagster UI        {web} (log in as {ADMIN}: EM_UI_ADMIN_PASSWORD in {self.env_file})",
            f"  image viewer      {s.get('EM_VIEWER_URL') or 'https://127.0.0.1:3030'}",
            "  TLS               the proxy's own CA, for its names only: `python -m em_platform.deploy compose-ca` "
            "prints it",
            f"  STOMP broker      127.0.0.1:{s.get('EM_BROKER_PORT') or 61614} over TLS (EM_BROKER_TLS: the CA "
            "`python -m em_platform.deploy compose-ca --broker` prints), the microscope as "
            f"{s.get('EM_SCOPE_BROKER_USERNAME') or 'scope'} (topics {s.get('EM_BROKER_TOPIC_PREFIX') or '/topic/'})",
        ]
        with contextlib.suppress(StackError, subprocess.SubprocessError):
            data = self.data_volume_path()
            lines += [
                f"  inbox             {data}/inbox (the data volume, /data in the containers)",
                f"  scope share       {data}/scope (/data/scope in the containers: EM_SCOPE_SHARES)",
            ]
        return "\n".join(lines)


def _seconds(duration: str) -> float:
    """A compose duration (``10s``, ``1m30s``, ``500ms``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


def _patience(service: str) -> float:
    """How long compose waits before calling a service unhealthy: its start period plus every retry."""
    from em_platform.deploy.services import service as find

    probe = find(service).probe
    if probe is None or probe.kind == "log":
        return 120.0
    return _seconds(probe.start_period) + probe.retries * (_seconds(probe.interval) + _seconds(probe.timeout))


def _set_in_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if re.match(r"^[A-Z][A-Z0-9_]*$", k)}


def _json_rows(text: str) -> list[dict]:
    text = text.strip()
    if not text:
        return []
    data = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()]
    return data or []


def _name(container: dict) -> str:
    names = container.get("Names") or container.get("Name") or ""
    return names[0] if isinstance(names, list) else names.lstrip("/")


def _socket_get(path: str, url: str) -> str:
    """GET ``url`` from the HTTP server on unix socket ``path``; the body, or "" when nothing answers."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(f"GET {url} HTTP/1.0\r\nHost: d\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
    except OSError:
        return ""


def web_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def main(command: str, argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m em_platform.deploy {command}")
    parser.add_argument(
        "--env-file", type=Path, default=DEFAULT_ENV_FILE, help="compose settings (default docker/.env)"
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=REPO / "var" / "compose",
        help="where the podman API service logs (default var/compose)",
    )
    if command == "compose-down":
        parser.add_argument(
            "--volumes", action="store_true", help="also delete the stack's volumes: every record and object"
        )
    if command == "compose-ca":
        parser.add_argument(
            "--broker", action="store_true", help="the broker's CA (for the microscope PCs), not the proxy's"
        )
    if command == "ui-user":
        parser.add_argument("name", help="the user's login name")
        parser.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    args = parser.parse_args(argv)
    try:
        if command == "compose-up" and not args.env_file.exists():
            tool = engine()
            notes = write_env_file(args.env_file, tool)
            print(f"wrote {args.env_file}: " + "; ".join(notes))
        stack = Stack(args.env_file, args.state)
        if command == "compose-up":
            if note := ensure_ui_users(stack.env_file):
                print(note)
            took = stack.up()
            print(stack.banner())
            print(f"up in {took:.0f} s", flush=True)
        elif command == "compose-down":
            gone = stack.down(volumes=args.volumes)
            print(
                f"stack `{stack.project}` down: {len(gone)} container(s) removed"
                + (", volumes deleted" if args.volumes else ", volumes kept")
            )
        elif command == "ui-user":
            if args.password_stdin:
                password = sys.stdin.readline().rstrip("\n")
            else:
                password = getpass.getpass(f"password of {args.name} (12 characters at least): ")
            new = set_ui_user(ui_users_file(stack.settings), args.name, password)
            print(
                f"UI user {args.name} {'added' if new else 'given a new password'}; the door reads it at once"
            )
        elif command == "compose-ca":
            print(stack.broker_ca() if args.broker else stack.proxy_ca(), end="")
        else:
            rows = stack.status()
            if not rows:
                print(f"stack `{stack.project}`: no containers")
                return 1
            for name, state, health in rows:
                print(f"{name:<44} {state:<10} {health}")
            return 0 if all(st == "running" or st == "exited" for _, st, _ in rows) else 3
    except (StackError, subprocess.SubprocessError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 1
    return 0
