"""The production topology as processes on one machine (``make deploy-local``, the deploy tests, the bench).

Every service of the table that ``runs_as="process"`` starts with the same command and environment as in
``docker/compose.yaml``; only the addresses differ (loopback and free ports instead of service names and
fixed ports). The machine provides the rest: its PostgreSQL server (two databases of this topology's own),
its RabbitMQ STOMP plugin (a topic prefix and durable subscription of its own), and s3rver in place of MinIO
(started here, with a bucket of its own; file-backed: its objects, under ``<state>/s3``, survive restarts). The Dagster instance is ``docker/dagster.yaml`` with the
default run launcher instead of the Docker one: runs are processes of the code server, not containers.

Each process gets its own process group; stopping sends SIGTERM to the group (its runs and helpers too),
then SIGKILL after a grace period, by PID (``pids.json`` in the state folder lets ``down`` do the same from
another shell). A process also gets SIGTERM if the runner dies (Linux parent-death signal).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from em_platform.deploy import dask_tls
from em_platform.deploy.db_roles import PASSWORD_SETTINGS, Databases, provision
from em_platform.deploy.monitoring import write_process_config
from em_platform.deploy.services import IMAGE_ENV, S3_USERS, SERVICES, Service, start_order
from em_platform.deploy.templates import Addresses, interpolate, place

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
PASS_THROUGH = (
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
)


class TopologyError(RuntimeError):
    """A service did not come up (the message names it and quotes the end of its log)."""


@dataclass(frozen=True)
class Machine:
    """The machine's own services that stand in for the postgresql and rabbitmq containers."""

    pg_host: str = "127.0.0.1"
    pg_port: int = 5432
    pg_user: str = "postgres"
    stomp_host: str = "127.0.0.1"
    stomp_port: int = 61613
    stomp_user: str = "guest"
    stomp_password: str = "guest"
    pg_password: str = "unused-with-trust-auth"
    stomp_tls: str | None = None  # EM_BROKER_TLS: None for plain STOMP

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Machine:
        """The servers named by libpq's PGHOST/PGPORT/PGUSER/PGPASSWORD and EM_BROKER (host:port),
        EM_BROKER_USERNAME/EM_BROKER_PASSWORD/EM_BROKER_TLS; this machine's defaults where unset."""
        from em_platform.settings import ConfigError, broker_tls

        d = cls()
        broker = env.get("EM_BROKER", f"{d.stomp_host}:{d.stomp_port}")
        host, _, port = broker.rpartition(":")
        if not host or not port.isdigit():
            raise TopologyError(f"EM_BROKER={broker!r}: expected host:port of the STOMP broker")
        try:
            tls = broker_tls(env.get("EM_BROKER_TLS"))
        except ConfigError as exc:
            raise TopologyError(str(exc)) from None
        pg_port = env.get("PGPORT", str(d.pg_port))
        if not pg_port.isdigit():
            raise TopologyError(f"PGPORT={pg_port!r}: expected the PostgreSQL server's port number")
        return cls(
            pg_host=env.get("PGHOST", d.pg_host),
            pg_port=int(pg_port),
            pg_user=env.get("PGUSER", d.pg_user),
            stomp_host=host,
            stomp_port=int(port),
            stomp_user=env.get("EM_BROKER_USERNAME", d.stomp_user),
            stomp_password=env.get("EM_BROKER_PASSWORD", d.stomp_password),
            pg_password=env.get("PGPASSWORD", d.pg_password),
            stomp_tls=tls,
        )


@dataclass(frozen=True)
class Launch:
    """One process of one service: what the runner executes."""

    service: str
    replica: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str

    @property
    def label(self) -> str:
        return self.service if self.replica == 0 else f"{self.service}-{self.replica + 1}"


@dataclass
class _Running:
    launch: Launch
    proc: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.time)


STOP_GRACE_S = 20.0  # SIGTERM to SIGKILL: a run in flight (a child of the code server) is killed after it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_child() -> None:
    """Runs in a supervised service's process between fork and exec (here and in `make dev`): it gets SIGTERM
    when its supervisor dies, and SIGINT and SIGTERM back at their defaults. A supervisor started as a
    background job (`make deploy-local &`, nohup) has SIGINT ignored, and children inherit that; Dagster maps
    SIGTERM onto SIGINT's handler, so the code server ignored SIGTERM too: every stop waited the whole grace
    and SIGKILLed it (20 s, measured)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ProcessTopology:
    """Start, probe, restart and stop the topology's processes. ``name`` prefixes its databases, bucket,
    topics and subscription, so several topologies share the machine's servers without meeting."""

    def __init__(
        self,
        state_dir: Path,
        *,
        name: str = "em_deploy",
        workers: int = 2,
        worker_threads: int = 1,
        settings: Mapping[str, str] | None = None,
        dagster_overrides: Mapping | None = None,
        machine: Machine | None = None,
        drop_on_stop: bool = False,
        ports: Mapping[str, int] | None = None,
    ):
        if not re.fullmatch(r"[a-z][a-z0-9_]{2,40}", name):
            raise ValueError(f"topology name {name!r}: lower-case letters, digits and _ (3-41 characters)")
        self.state = Path(state_dir).resolve()
        self.name = name
        self.machine = machine or Machine()
        self.drop_on_stop = drop_on_stop
        self.dagster_overrides = dict(dagster_overrides or {})
        m = self.machine
        self.settings: dict[str, str] = {
            "POSTGRES_USER": m.pg_user,
            "POSTGRES_PASSWORD": m.pg_password,
            "DAGSTER_DB": f"{name}_dagster",
            "EM_CATALOG_DB": f"{name}_catalog",
            "AWS_ACCESS_KEY_ID": S3RVER_KEY,  # s3rver's one credential pair (it listens on loopback only)
            "AWS_SECRET_ACCESS_KEY": S3RVER_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "EM_S3_BUCKET": name.replace("_", "-"),
            "EM_BROKER_USERNAME": m.stomp_user,
            "EM_BROKER_PASSWORD": m.stomp_password,
            "EM_BROKER_TLS": m.stomp_tls or "",
            "EM_BROKER_TOPIC_PREFIX": f"/topic/{name}.",
            "EM_BROKER_SUBSCRIPTION": f"{name}_journal",
            "DASK_WORKERS": str(workers),
            "DASK_WORKER_THREADS": str(worker_threads),
            # each service's own database role (db_roles), named after the topology: no service is the
            # machine's superuser (their passwords matter where the server asks for them)
            "EM_DB_ROLE_PREFIX": name,
            **{setting: secrets.token_urlsafe(18) for setting in PASSWORD_SETTINGS.values()},
            # s3rver has one key pair and no policies: every store user is it here (compose's MinIO has users)
            **{
                f"EM_S3_{u.upper()}_{part}_KEY": S3RVER_KEY for u in S3_USERS for part in ("ACCESS", "SECRET")
            },
            **(settings or {}),
        }
        fixed = dict(ports or {})  # stable ports (`up` takes them from settings); free ones otherwise
        ports = {s.name: fixed.get(s.name) or free_port() for s in SERVICES if s.port is not None}
        ports.update({s.metrics_at: free_port() for s in SERVICES if s.metrics_port})
        ports.update(postgresql=m.pg_port, rabbitmq=m.stomp_port)
        hosts = {s.name: "127.0.0.1" for s in SERVICES} | {s.metrics_at: "127.0.0.1" for s in SERVICES}
        hosts.update(postgresql=m.pg_host, rabbitmq=m.stomp_host)
        self.addresses = Addresses(
            bind="127.0.0.1",
            hosts=hosts,
            ports=ports,
            data=str(self.state / "data"),
            etc=str(self.state / "etc"),
            var=str(self.state / "var"),
        )
        self.dagster_home = self.state / "dagster_home"
        self._running: dict[str, list[_Running]] = {}
        self._created: list[str] = []
        self._started = False  # only a started topology writes its state (`plan` must not touch it)
        self._lock = threading.RLock()  # the supervisor and the fault/restart calls change _running
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._restarts: dict[tuple[str, int], list[float]] = {}
        self._due: dict[tuple[str, int], float] = {}
        self._killed: dict[tuple[str, int], int] = {}
        atexit.register(self.stop)

    # -- what runs ------------------------------------------------------------------------------------

    def env_of(self, svc: Service) -> dict[str, str]:
        """The service's compose environment, filled in for this topology (plus its image's ENV), and the
        Dask cluster's TLS: every process is a client or a member of it."""
        env = {k: v for k, v in IMAGE_ENV.get(svc.image, {}).items()}
        if "DAGSTER_HOME" in env:
            env["DAGSTER_HOME"] = str(self.dagster_home)
        for key, template in svc.env.items():
            env[key] = interpolate(place(template, self.addresses, svc.name), self.settings)
        return {**env, **self.dask_tls_env}

    @property
    def dask_tls_env(self) -> dict[str, str]:
        """Dask's TLS settings with this topology's certificates (``<state>/dask-certs``): the scheduler takes
        no connection without them, though it listens on loopback (any local user reaches that)."""
        return {
            k: v.replace(dask_tls.CERTS, str(self.state / "dask-certs")) for k, v in dask_tls.TLS_ENV.items()
        }

    def dask_security(self):
        """A Dask client's security for this topology's cluster."""
        return dask_tls.security(self.dask_tls_env)

    @property
    def platform_env(self) -> dict[str, str]:
        """What em_platform's own commands (scope-sim, a CLI backfill) need to act in this topology: every
        setting and secret the platform reads, as the daemon hands them to each run."""
        return self.env_of(_service("daemon"))

    def plan(self) -> list[Launch]:
        """Every process to run, in start order, with its argv, environment and working folder."""
        out = []
        for svc in start_order():
            if svc.runs_as != "process":
                continue
            argv = tuple(interpolate(place(a, self.addresses, svc.name), self.settings) for a in svc.command)
            argv = (_executable(argv[0]), *argv[1:])
            argv += process_only_args(svc.name, self.addresses.bind)
            env = self.env_of(svc)
            if svc.name == "user-code":
                # as processes, Dagster's default launcher starts each run from the code server, so the code
                # server holds what the daemon hands each run container in compose: every secret a run uses,
                # its database role included (the runs', not the sensors' own)
                env = {**env, **self.platform_env}
            cwd = str(self.dagster_home) if svc.working_dir else str(REPO)
            replicas = int(interpolate(svc.replicas, self.settings)) if svc.replicas else 1
            out += [Launch(svc.name, i, argv, env, cwd) for i in range(replicas)]
        return out

    def url(self, name: str) -> str:
        scheme = {"dask-scheduler": "tls", "user-code": "grpc"}.get(name, "http")
        return f"{scheme}://{self.addresses.addr(name)}"

    @property
    def webserver(self) -> str:
        return self.url("webserver")

    @property
    def scheduler(self) -> str:
        return self.url("dask-scheduler")

    @property
    def catalog_url(self) -> str:
        return self.platform_env["EM_CATALOG_URL"]

    @property
    def dagster_db(self) -> str:
        return self.settings["DAGSTER_DB"]

    @property
    def object_store_dir(self) -> Path:
        """Where the object store keeps its buckets (one folder each, objects as files)."""
        return self.state / "s3"

    def pids(self) -> dict[str, list[int]]:
        return {k: [r.proc.pid for r in v] for k, v in self._running.items()}

    def log_of(self, label: str) -> Path:
        return self.state / "logs" / f"{label}.log"

    # -- start ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 300.0, *, supervise: bool = True) -> ProcessTopology:
        """Bring every service up in dependency order; independent ones start together. Then, with
        ``supervise``, a thread restarts any process that dies (compose's restart policy), with backoff."""
        self._started = True
        for sub in (
            "logs",
            "data/inbox",
            "data/buffer",
            "data/downloads",
            "data/simulations",
            "data/cryo_sessions",
            "data/scope",
            "compute_logs",
        ):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        dask_tls.make_certificates(self.state / "dask-certs", ("localhost", "127.0.0.1"))
        self._write_instance()
        write_process_config(
            self.state / "etc",
            SERVICES,
            self.addresses.addr,
            webhook=self.settings.get("EM_ALERT_WEBHOOK") or None,
        )
        ready: set[str] = set()
        pending = [s for s in start_order()]
        plan = {(p.service, p.replica): p for p in self.plan()}
        deadline = time.monotonic() + timeout
        try:
            while pending or any(self._probing(ready)):
                for svc in list(pending):
                    if all(d in ready for d in svc.depends_on):
                        pending.remove(svc)
                        self._bring_up(svc, plan)
                        if svc.runs_as != "process" and svc.name != "minio":
                            ready.add(svc.name)
                for name in self._probing(ready):
                    if self._is_ready(_service(name)):
                        ready.add(name)
                if time.monotonic() > deadline:
                    waiting = [s.name for s in pending] + list(self._probing(ready))
                    raise TopologyError(f"not up within {timeout:.0f} s: {', '.join(waiting)}{self._tails()}")
                time.sleep(0.2)
            self.wait_for_workers()
            if supervise:
                self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
                self._supervisor.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _probing(self, ready: set[str]) -> list[str]:
        return [n for n in self._running if n not in ready]

    def _bring_up(self, svc: Service, plan: Mapping[tuple[str, int], Launch]) -> None:
        if svc.name == "postgresql":
            self._create_databases()
        elif svc.name == "rabbitmq":
            self._check_broker()
        elif svc.name == "minio":  # s3rver stands in for MinIO: file-backed, like MinIO's volume
            port = self.addresses.ports["minio"]
            (self.object_store_dir).mkdir(parents=True, exist_ok=True)
            argv = (
                s3rver(),
                "-d",
                str(self.object_store_dir),
                "-a",
                "127.0.0.1",
                "-p",
                str(port),
                "--silent",
            )
            self._spawn(Launch("minio", 0, argv, _base_env(), str(self.state)))
        elif svc.name == "minio-init":
            self._create_bucket()
        else:
            for (name, _), launch in plan.items():
                if name == svc.name:
                    self._spawn(launch)

    def _spawn(self, launch: Launch) -> _Running:
        log = self.log_of(launch.label)
        with open(log, "ab") as out:
            out.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(launch.argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                launch.argv,
                env={**_base_env(), **launch.env},
                cwd=launch.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=service_child,
            )
        running = _Running(launch, proc, log)
        replicas = self._running.setdefault(launch.service, [])
        if launch.replica < len(replicas):
            replicas[launch.replica] = running
        else:
            replicas.append(running)
        self._write_pids()
        return running

    def _is_ready(self, svc: Service) -> bool:
        for r in self._running.get(svc.name, []):
            if r.proc.poll() is not None:
                raise TopologyError(f"{r.launch.label} exited with {r.proc.returncode}{self._tails([r])}")
        if svc.name == "minio":
            return _http_ok(f"{self.url('minio')}/")
        probe = svc.probe
        if probe is None:
            return True
        addr = self.addresses
        if probe.kind == "tcp":
            return _tcp_ok(addr.hosts[svc.name], addr.ports[svc.name])
        if probe.kind == "http":
            return _http_ok(f"http://{addr.addr(svc.name)}{probe.path}")
        if probe.kind == "grpc":
            return _grpc_loaded(addr.hosts[svc.name], addr.ports[svc.name])
        if probe.kind == "daemon":
            return self._daemon_alive(since=min(r.started for r in self._running[svc.name]))
        if probe.kind == "log":
            return all(probe.pattern in _since_last_start(r.log) for r in self._running[svc.name])
        raise TopologyError(f"{svc.name}: the runner cannot check a {probe.kind!r} probe")

    def wait_for_workers(self, timeout: float = 120.0) -> None:
        """The scheduler knows every worker (compose has nothing to wait on; the tests need both there)."""
        from distributed import Client

        n = len(self._running.get("dask-worker", []))
        with Client(self.scheduler, timeout="30s", security=self.dask_security()) as client:
            client.wait_for_workers(n, timeout=timeout)

    # -- faults and restarts --------------------------------------------------------------------------

    def kill(self, service: str, replica: int = 0, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to one service process's group (a crash when SIGKILL); returns its PID."""
        with self._lock:
            r = self._running[service][replica]
            signal_group(r.proc.pid, sig)
            r.proc.wait(timeout=60)
            self._killed[(service, replica)] = r.proc.pid
            return r.proc.pid

    def restart(self, service: str, replica: int = 0, *, wait: bool = True, timeout: float = 180.0) -> None:
        """Stop one process cleanly (SIGTERM, then SIGKILL after a grace) and start it again."""
        with self._lock:
            r = self._running[service][replica]
            _stop_group(r.proc)
            self._spawn(r.launch)
        if wait:
            self.wait_ready(service, timeout)

    def start_again(self, service: str, replica: int = 0, timeout: float = 180.0) -> None:
        """Start a process that was killed (as compose's restart policy would)."""
        with self._lock:
            r = self._running[service][replica]
            if r.proc.poll() is None:
                raise TopologyError(f"{r.launch.label} is still running (pid {r.proc.pid})")
            self._spawn(r.launch)
        self.wait_ready(service, timeout)

    def wait_back(self, service: str, replica: int = 0, timeout: float = 180.0) -> None:
        """Until the supervisor has replaced the process ``kill`` ended and the service answers again."""
        gone = self._killed.get((service, replica))
        deadline = time.monotonic() + timeout
        while self._running[service][replica].proc.pid == gone or (
            self._running[service][replica].proc.poll() is not None
        ):
            if time.monotonic() > deadline:
                raise TopologyError(
                    f"{service}[{replica}] not restarted within {timeout:.0f} s{self._tails()}"
                )
            time.sleep(0.1)
        self.wait_ready(service, max(1.0, deadline - time.monotonic()))

    def restarts(self) -> dict[str, int]:
        """How often the supervisor restarted each process (``deploy status`` shows it)."""
        return {f"{n}[{i}]": len(t) for (n, i), t in self._restarts.items()}

    def _backoff(self, key: tuple[str, int]) -> float:
        """1 s after a first death, doubling with each restart in the last 10 minutes, at most 60 s."""
        recent = [t for t in self._restarts.get(key, []) if t > time.monotonic() - 600]
        return min(60.0, 2.0 ** len(recent))

    def _supervise(self) -> None:
        while not self._stopping.wait(0.25):
            with self._lock:
                if self._stopping.is_set():
                    return
                for name, replicas in list(self._running.items()):
                    for i, r in enumerate(replicas):
                        if r.proc.poll() is None:
                            continue
                        key = (name, i)
                        due = self._due.setdefault(key, time.monotonic() + self._backoff(key))
                        if time.monotonic() < due:
                            continue
                        del self._due[key]
                        self._restarts.setdefault(key, []).append(time.monotonic())
                        with open(r.log, "ab") as out:
                            out.write(f"\n==== exited with {r.proc.returncode}: restarting\n".encode())
                        self._spawn(r.launch)

    def wait_ready(self, service: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._is_ready(_service(service)):
            if time.monotonic() > deadline:
                raise TopologyError(f"{service} not ready within {timeout:.0f} s{self._tails()}")
            time.sleep(0.2)
        if service == "dask-worker":
            self.wait_for_workers(timeout)

    # -- stop -----------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process (reverse start order) by PID; then drop this topology's databases and queue
        if it was made for one use (tests)."""
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=10)
        procs = [r.proc for name in reversed(list(self._running)) for r in self._running[name]]
        for proc in procs:  # all at once: the code server alone takes ~10 s to wind down
            if proc.poll() is None:
                signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S  # one grace for all, not one each
        for proc in procs:
            _stop_group(proc, grace=max(0.0, deadline - time.monotonic()))
        self._running.clear()
        self._write_pids()
        if self.drop_on_stop:
            self._drop()
        atexit.unregister(self.stop)

    # -- the machine's services -----------------------------------------------------------------------

    def _admin(self):
        import psycopg2

        m = self.machine
        try:
            conn = psycopg2.connect(
                host=m.pg_host, port=m.pg_port, user=m.pg_user, dbname="postgres", connect_timeout=5
            )
        except psycopg2.OperationalError as exc:
            raise TopologyError(
                f"PostgreSQL at {m.pg_host}:{m.pg_port} (user {m.pg_user}) is not reachable ({exc}); "
                "the process topology uses the machine's server in place of the postgresql container"
            ) from exc
        conn.autocommit = True
        return conn

    def _create_databases(self) -> None:
        """The two databases and each service's role, as db-init makes them in compose (db_roles)."""
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                for db in (self.settings["DAGSTER_DB"], self.settings["EM_CATALOG_DB"]):
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                    if cur.fetchone() is None:
                        self._created.append(db)
        finally:
            conn.close()
        passwords = {role: self.settings[setting] for role, setting in PASSWORD_SETTINGS.items()}
        provision(self._admin_url(), self.databases, passwords)

    def _admin_url(self) -> str:
        import sqlalchemy as sa

        m = self.machine
        return sa.URL.create(
            "postgresql+psycopg2", m.pg_user, m.pg_password, m.pg_host, m.pg_port, "postgres"
        ).render_as_string(hide_password=False)

    @property
    def databases(self) -> Databases:
        return Databases(self.settings["DAGSTER_DB"], self.settings["EM_CATALOG_DB"], self.name)

    def _check_broker(self) -> None:
        m = self.machine
        if not _tcp_ok(m.stomp_host, m.stomp_port):
            raise TopologyError(
                f"no STOMP broker at {m.stomp_host}:{m.stomp_port}: start RabbitMQ and enable its STOMP plugin "
                "(`make services`); the process topology uses it in place of the rabbitmq container"
            )

    def _create_bucket(self) -> None:
        import s3fs

        env = self.platform_env
        fs = s3fs.S3FileSystem(
            key=env["AWS_ACCESS_KEY_ID"],
            secret=env["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"endpoint_url": env["EM_S3_ENDPOINT_URL"]},
        )
        if not fs.exists(self.settings["EM_S3_BUCKET"]):
            fs.mkdir(self.settings["EM_S3_BUCKET"])

    def _drop(self) -> None:
        from em_platform.tem.listener import delete_subscription

        m = self.machine
        with contextlib.suppress(Exception):
            delete_subscription(
                m.stomp_host,
                m.stomp_port,
                self.settings["EM_BROKER_SUBSCRIPTION"],
                topic_prefix=self.settings["EM_BROKER_TOPIC_PREFIX"],
                username=m.stomp_user,
                password=m.stomp_password,
                tls=m.stomp_tls,
            )
        if not self._created:
            return
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                for db in self._created:
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,)
                    )
                    cur.execute(f'DROP DATABASE IF EXISTS "{db}"')
                for role in self.databases.roles():  # they own nothing once their databases are gone
                    cur.execute(f'DROP ROLE IF EXISTS "{role}"')
        finally:
            conn.close()
        self._created.clear()

    def _daemon_alive(self, since: float) -> bool:
        """The daemon's sensor and run-queue heartbeats are newer than its start (what liveness-check reads)."""
        import psycopg2

        m = self.machine
        try:
            conn = psycopg2.connect(
                host=m.pg_host, port=m.pg_port, user=m.pg_user, dbname=self.dagster_db, connect_timeout=5
            )
        except psycopg2.OperationalError:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT daemon_type, timestamp FROM daemon_heartbeats")
                beats = {
                    t: ts.timestamp() if hasattr(ts, "timestamp") else float(ts) for t, ts in cur.fetchall()
                }
        except psycopg2.Error:
            return False
        finally:
            conn.close()
        need = ("SENSOR", "QUEUED_RUN_COORDINATOR")
        return all(beats.get(t, 0.0) >= since - 1.0 for t in need)

    # -- files ----------------------------------------------------------------------------------------

    def _write_instance(self) -> None:
        """docker/dagster.yaml with the default run launcher and local compute logs, plus any overrides."""
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load((DOCKER / "dagster.yaml").read_text())
        config.pop("run_launcher")
        config["compute_logs"]["config"]["base_dir"] = str(self.state / "compute_logs")
        config = _merge(config, self.dagster_overrides)
        (self.dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        shutil.copy(DOCKER / "workspace.yaml", self.dagster_home / "workspace.yaml")

    def _write_pids(self) -> None:
        """pids.json (the runner first: `down` stops it, then what is left) and services.json (`status`)."""
        if not self._started or not self.state.exists():
            return
        pids = self.pids()
        recorded = {"runner": [os.getpid()], **pids} if pids else {}
        # what identifies each process beyond its PID (which the system reuses): its start time
        started = {str(pid): process_start(pid) for group in recorded.values() for pid in group}
        (self.state / "pids.json").write_text(json.dumps({**recorded, STARTED: started} if recorded else {}))
        where = {
            name: {
                "address": self.addresses.addr(name) if name in self.addresses.ports else None,
                "pids": pids.get(name, []),
            }
            for name in pids
        }
        (self.state / "services.json").write_text(json.dumps(where, indent=1))

    def _tails(self, runs: list[_Running] | None = None, lines: int = 15) -> str:
        runs = runs if runs is not None else [r for rs in self._running.values() for r in rs]
        parts = []
        for r in runs:
            text = r.log.read_text(errors="replace").splitlines()[-lines:] if r.log.exists() else []
            parts.append(f"\n--- {r.launch.label} (pid {r.proc.pid}, {r.log}):\n" + "\n".join(text))
        return "".join(parts)


def process_only_args(service: str, bind: str) -> tuple[str, ...]:
    """Arguments a process gets beyond its compose command: a Dask worker's comm port and nanny listen on
    ``bind`` (in compose the internal network keeps them in; on one machine only loopback does)."""
    return ("--host", bind) if service == "dask-worker" else ()


STABLE_PORTS = {  # service: (setting, default) of the ports `up` listens on, the same on every start
    "webserver": ("EM_WEB_PORT", 3000),
    "user-code": ("EM_CODE_SERVER_PORT", 4000),
    "dask-scheduler": ("EM_DASK_SCHEDULER_PORT", 8786),
    "minio": ("EM_S3_PORT", 9000),
    "viewer": ("EM_VIEWER_PORT", 3030),  # the links in the images' metadata name it: keep it stable
}


def stable_ports(env: Mapping[str, str] = os.environ, *, check_free: bool = True) -> dict[str, int]:
    """The ports of STABLE_PORTS from settings; a port another process holds is an error naming its setting."""
    out = {}
    for service, (setting, default) in STABLE_PORTS.items():
        value = env.get(setting, str(default))
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise TopologyError(f"{setting}={value!r}: expected a port number")
        if check_free and _tcp_ok("127.0.0.1", int(value)):
            raise TopologyError(
                f"port {value} ({service}, {setting}) is taken on 127.0.0.1: stop what listens there "
                f"(`make deploy-down` if it is an earlier topology) or set {setting} to another port"
            )
        out[service] = int(value)
    return out


STARTED = "started"  # pids.json: PID -> the process's start time (/proc/PID/stat field 22)


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot: with the PID, what names one process (a PID
    the system gave to another process since has another start time). None when there is no such process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def stop_from_pid_file(state_dir: Path) -> list[int]:
    """Stop the processes a runner in another shell recorded (``down``): each PID only while it is still the
    process recorded (same start time), whatever command line or interpreter path started it."""
    path = Path(state_dir) / "pids.json"
    if not path.exists():
        return []
    recorded = json.loads(path.read_text())
    started = recorded.pop(STARTED, {})

    def ours(pid: int) -> bool:
        return str(pid) in started and process_start(pid) == started[str(pid)]

    for pid in recorded.pop("runner", []):  # the runner first: it stops its services itself, and must not
        if ours(pid):  # restart them (its group may be the user's shell: the PID only)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S + 10
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.2)  # poll interval while it stops its services
    stopped = []
    for pids in recorded.values():
        for pid in pids:
            if ours(pid):  # what the runner did not stop (it was killed, or hung)
                signal_group(pid, signal.SIGTERM)
                stopped.append(pid)
    deadline = time.monotonic() + STOP_GRACE_S
    while any(_running(pid) for pid in stopped) and time.monotonic() < deadline:
        time.sleep(0.2)  # poll interval while they wind down
    for pid in stopped:  # what ignored SIGTERM (a code server with a run in flight)
        signal_group(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return stopped


def status(state_dir: Path) -> list[tuple[str, str | None, list[int], bool]]:
    """(service, address, PIDs, all alive) of the topology a runner recorded in ``state_dir``."""
    path = Path(state_dir) / "services.json"
    pids = Path(state_dir) / "pids.json"
    if not path.exists() or not pids.exists() or not json.loads(pids.read_text()):
        return []
    return [
        (name, where["address"], where["pids"], bool(where["pids"]) and all(map(_running, where["pids"])))
        for name, where in json.loads(path.read_text()).items()
    ]


# -- helpers ------------------------------------------------------------------------------------------


def _service(name: str) -> Service:
    from em_platform.deploy.services import service

    return service(name)


# the servers the machine provides under Debian's names (the official images' differ)
DEBIAN_NAMES = {"alertmanager": "prometheus-alertmanager"}
DEBIAN_PACKAGES = {"prometheus": "prometheus", "alertmanager": "prometheus-alertmanager"}


def _executable(name: str) -> str:
    """Commands come from this Python environment (as they come from the image's), else the machine's."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name) or shutil.which(DEBIAN_NAMES.get(name, name))
    if found is None and name in DEBIAN_PACKAGES:
        raise TopologyError(
            f"no {name} on this machine: the topology's monitoring runs Debian's "
            f"{DEBIAN_PACKAGES[name]} (as root: make ops-engine, or apt-get install {DEBIAN_PACKAGES[name]})"
        )
    return found or name


S3RVER_KEY = "S3RVER"


def s3rver() -> str:
    """The s3rver executable scripts/install_s3rver.sh put into this venv."""
    exe = Path(sys.prefix) / "s3rver" / "node_modules" / ".bin" / "s3rver"
    if not os.access(exe, os.X_OK):
        raise TopologyError(
            f"no s3rver at {exe}: the object store of the process topology. Install it with "
            f"`bash scripts/install_s3rver.sh {Path(sys.prefix)}` (needs node and npm; Debian: apt-get install npm)"
        )
    return str(exe)


def _base_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return env


def _since_last_start(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return text[text.rfind("\n==== ") :]


def _merge(base: dict, extra: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _tcp_ok(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return 200 <= resp.status < 300
    except OSError:
        return False


def _grpc_loaded(host: str, port: int) -> bool:
    """The code server answers and has loaded the code (its health check alone passes while loading)."""
    if not _tcp_ok(host, port):
        return False
    from dagster._grpc.client import DagsterGrpcClient

    try:
        client = DagsterGrpcClient(host=host, port=port)
        if client.health_check_query() != "SERVING":
            return False
        client.list_repositories()
        return True
    except Exception:
        return False


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its parent to reap it is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def signal_group(pid: int, sig: int) -> None:
    """``sig`` to process group ``pid``; a group already gone (or not ours) is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    signal_group(proc.pid, signal.SIGKILL)  # stragglers of the group (a run the server started)
