"""The production topology, defined once: ``docker/compose.yaml`` is generated from this table and the
process runner (:mod:`em_platform.deploy.processes`) starts the same services from it.

Commands and environment values are templates, filled in per topology:

``{bind}`` / ``{port}``
    the address and port this service listens on (``0.0.0.0`` and a fixed port in a container;
    ``127.0.0.1`` and a free port as a process);
``{addr:NAME}`` / ``{host:NAME}`` / ``{port:NAME}``
    where service NAME answers (``NAME:PORT`` on the compose network; ``127.0.0.1:P`` as processes);
``{data}``
    the shared data folder (the ``/data`` volume; a folder as processes);
``{web}``
    how browsers reach the UI and the viewer: ``https`` through compose's proxy, ``http`` on loopback;
``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}``
    an operator's setting: compose interpolates it from ``docker/.env``; the runner from its settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from em_platform.deploy.dask_tls import CERTS, TLS_ENV
from em_platform.quiet_dask import QUIET_DASK_ENV

EM_IMAGE = "em-platform"  # the user-code image: code server, launched runs, Dask, listener
DAGSTER_IMAGE = "dagster"  # webserver + daemon (no user code: they talk to the code server over gRPC)
LOCATION_NAME = "em_platform"


@dataclass(frozen=True)
class Probe:
    """How to tell that a service is up: compose renders it as a healthcheck, the runner checks it itself.

    ``kind``: ``tcp`` (the port accepts), ``http`` (GET ``path`` answers 2xx), ``grpc`` (Dagster's code-server
    health check; the runner also waits for the code to load), ``daemon`` (``dagster-daemon liveness-check``;
    the runner reads the same heartbeats), ``command`` (``test``, compose only: the runner checks the machine's
    equivalent its own way), ``log`` (the runner waits for ``pattern`` in the service's output; compose has no
    equivalent and nothing depends on such a service).
    """

    kind: str
    path: str = ""
    pattern: str = ""
    test: tuple[str, ...] = ()
    interval: str = "10s"
    timeout: str = "5s"
    retries: int = 12
    start_period: str = "20s"


@dataclass(frozen=True)
class Service:
    """One service of the topology (a compose service; one process, or ``replicas`` of them)."""

    name: str
    image: str  # EM_IMAGE, DAGSTER_IMAGE, or an infrastructure image (postgres:16, ...)
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    port: int | None = None  # container port; the process runner picks a free one instead
    # published on the host (compose only), each on loopback unless the operator names an interface
    ports: tuple[str, ...] = ()
    replicas: str = ""  # "${DASK_WORKERS:-2}": compose deploy.replicas; the runner starts that many
    # the container's CPU weight against the others (compose cpu_shares; 1024 is everyone's default). A
    # container is a cgroup, where neither a thread's nice nor a session's autogroup counts: batch work
    # yields to live tiles there only by a lower weight
    cpu_shares: str = ""
    depends_on: Mapping[str, str] = field(default_factory=dict)  # name -> compose condition
    probe: Probe | None = None
    volumes: tuple[str, ...] = ()
    working_dir: str = ""
    restart: str = "unless-stopped"
    # "process": the runner starts `command`; "equivalent": the runner provides the machine's counterpart
    # (PostgreSQL server, RabbitMQ STOMP, s3rver, file-backed, a bucket) instead of this container
    runs_as: str = "process"
    compose_only_env: Mapping[str, str] = field(default_factory=dict)  # meaningful only with Docker
    entrypoint: tuple[str, ...] = ()  # replaces the image's entrypoint (compose only)
    hostname: str = ""  # a fixed host name in its container (compose only)
    note: str = ""


def _pg_env(password: bool = False) -> dict[str, str]:
    """Dagster's instance storage (docker/dagster.yaml reads these); its password only with ``password``."""
    env = {
        "DAGSTER_POSTGRES_HOST": "{host:postgresql}",
        "DAGSTER_POSTGRES_PORT": "{port:postgresql}",
        "DAGSTER_POSTGRES_USER": "${POSTGRES_USER:-dagster}",
        "DAGSTER_POSTGRES_DB": "${DAGSTER_DB:-dagster}",
    }
    if password:
        env["DAGSTER_POSTGRES_PASSWORD"] = "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in docker/.env}"
    return env


# The secrets of the platform's settings, by what each unlocks. A service gets only the groups it uses
# (SERVICES below); the daemon gets them all, since each run's container gets its environment from it.
SECRET_GROUPS: dict[str, dict[str, str]] = {
    "catalog": {  # the catalog and acquisition journal; libpq reads the password from PGPASSWORD
        "PGPASSWORD": "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in docker/.env}",
    },
    "dagster": {  # Dagster's run, event and schedule storage (docker/dagster.yaml reads these)
        "DAGSTER_POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in docker/.env}",
    },
    "s3": {  # the storage root
        "AWS_ACCESS_KEY_ID": "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID in docker/.env}",
        "AWS_SECRET_ACCESS_KEY": "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY in docker/.env}",
    },
    "broker": {"EM_BROKER_PASSWORD": "${EM_BROKER_PASSWORD:?set EM_BROKER_PASSWORD in docker/.env}"},
    "neuprint": {"NEUPRINT_TOKEN": "${NEUPRINT_TOKEN:-}"},  # FlyEM ingests' metadata
}


def platform_env(secrets: tuple[str, ...] = tuple(SECRET_GROUPS)) -> dict[str, str]:
    """What em_platform reads (settings.py), with the secret groups ``secrets`` (default: all of them)."""
    env = {
        "EM_DEPLOYMENT": "docker",
        "EM_DATA_ROOT": "s3://${EM_S3_BUCKET:-em-data}/em",
        "EM_S3_ENDPOINT_URL": "${EM_S3_ENDPOINT_URL:-http://{addr:minio}}",
        "AWS_DEFAULT_REGION": "${AWS_DEFAULT_REGION:-us-east-1}",
        "EM_CATALOG_URL": "postgresql+psycopg2://${POSTGRES_USER:-dagster}@{addr:postgresql}/${EM_CATALOG_DB:-em_catalog}",
        "EM_INBOX": "{data}/inbox",
        "EM_BUFFER": "{data}/buffer",
        "EM_DOWNLOADS": "{data}/downloads",
        "EM_SIMULATIONS": "{data}/simulations",
        "EM_CRYO_SESSIONS": "{data}/cryo_sessions",  # where the microscope PC writes movies and mdocs
        "EM_SCOPE_SHARES": "{data}/scope",  # where the scopes' tiles land; tile.raw paths elsewhere are refused
        "EM_INBOX_SETTLE_SECONDS": "${EM_INBOX_SETTLE_SECONDS:-5}",
        "EM_SENSOR_INTERVAL_SECONDS": "${EM_SENSOR_INTERVAL_SECONDS:-}",
        "EM_BROKER": "{addr:rabbitmq}",
        "EM_BROKER_TOPIC_PREFIX": "${EM_BROKER_TOPIC_PREFIX:-/topic/}",
        "EM_BROKER_USERNAME": "${EM_BROKER_USERNAME:-em}",
        # plain STOMP on the compose network; TLS is the published port's (docker/rabbitmq/30-tls.conf)
        "EM_BROKER_TLS": "",
        "EM_SCOPE_PIXEL_SIZE_NM": "${EM_SCOPE_PIXEL_SIZE_NM:-}",
        # where users' browsers reach the viewer (its published port; in compose the proxy's, over TLS):
        # every image's Neuroglancer link
        "EM_VIEWER_URL": "${EM_VIEWER_URL:-{web}://127.0.0.1:{port:viewer}}",
        # no scheme: Dask's default one, tcp on loopback, tls in compose (em_platform.deploy.dask_tls)
        "DASK_SCHEDULER_ADDRESS": "{addr:dask-scheduler}",
        **_pg_env(),
    }
    unknown = set(secrets) - set(SECRET_GROUPS)
    if unknown:
        raise KeyError(f"no secret group {sorted(unknown)} (groups: {', '.join(SECRET_GROUPS)})")
    for group in secrets:
        env.update(SECRET_GROUPS[group])
    return env


def _workspace_env() -> dict[str, str]:
    """docker/workspace.yaml finds the code server through these."""
    return {"DAGSTER_CODE_SERVER_HOST": "{host:user-code}", "DAGSTER_CODE_SERVER_PORT": "{port:user-code}"}


DATA_VOLUME = "em-data:/data"
DASK_CERTS_VOLUME = f"dask-certs:{CERTS}:ro"
# Compose's project name names the stack's network and its shared volumes (NAME, NAME-data,
# NAME-compute-logs), so that two stacks on one host do not meet; the daemon passes it to the run launcher.
STACK_NAME = "${COMPOSE_PROJECT_NAME:-em-platform}"
STACK_ENV = "EM_STACK_NAME"
DAGSTER_HOME = "/opt/dagster/dagster_home"
# ENV lines of docker/Dockerfile and docker/Dockerfile.dagster (a test checks them); the runner sets the same
IMAGE_ENV = {
    EM_IMAGE: {"DAGSTER_HOME": DAGSTER_HOME, "PYTHONUNBUFFERED": "1"},
    DAGSTER_IMAGE: {"DAGSTER_HOME": DAGSTER_HOME, "PYTHONUNBUFFERED": "1"},
}
HEALTHY, STARTED, COMPLETED = "service_healthy", "service_started", "service_completed_successfully"

# The secrets every store and the broker are created with; docker/.env.example holds placeholders for them.
SECRETS = ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "EM_BROKER_PASSWORD", "EM_SCOPE_BROKER_PASSWORD")
_PLACEHOLDER_CHECK = (
    "for name in " + " ".join(SECRETS) + '; do eval v=\\"\\$$$$name\\"; '
    'case "$$v" in ""|change-me*|changeme*|password|secret|admin) '
    'echo "docker/.env: $$name is empty or a placeholder ($$v): set a real secret before starting" >&2; '
    "exit 1;; esac; done; echo secrets set"
)

SERVICES: tuple[Service, ...] = (
    Service(
        "secrets-check",
        image="busybox:1.36",
        entrypoint=("sh", "-c"),
        command=(_PLACEHOLDER_CHECK,),
        env={name: f"${{{name}:-}}" for name in SECRETS},
        restart="no",
        runs_as="equivalent",
        note="refuses to start the stores and the broker with docker/.env.example's placeholder secrets",
    ),
    Service(
        "postgresql",
        image="postgres:16",
        command=(),
        env={
            "POSTGRES_USER": "${POSTGRES_USER:-dagster}",
            "POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in docker/.env}",
            "POSTGRES_DB": "${DAGSTER_DB:-dagster}",
            "EM_CATALOG_DB": "${EM_CATALOG_DB:-em_catalog}",
        },
        port=5432,
        probe=Probe("command", test=("CMD-SHELL", "pg_isready -U $${POSTGRES_USER} -d $${POSTGRES_DB}")),
        volumes=("postgres-data:/var/lib/postgresql/data", "./postgres:/docker-entrypoint-initdb.d:ro"),
        depends_on={"secrets-check": COMPLETED},
        runs_as="equivalent",
        note="Dagster's run/event/schedule storage and, in a database of its own, the catalog + journal",
    ),
    Service(
        "broker-init",
        image=EM_IMAGE,
        command=(
            "python",
            "-m",
            "em_platform.deploy.broker_users",
            "/definitions/definitions.json",
            "--tls",
            "/tls",
        ),
        env={
            "EM_PUBLIC_HOST": "${EM_PUBLIC_HOST:-127.0.0.1}",  # a name of the TLS certificate the scope checks
            "EM_BROKER_USERNAME": "${EM_BROKER_USERNAME:-em}",
            "EM_BROKER_PASSWORD": "${EM_BROKER_PASSWORD:?set EM_BROKER_PASSWORD in docker/.env}",
            "EM_SCOPE_BROKER_USERNAME": "${EM_SCOPE_BROKER_USERNAME:-scope}",
            "EM_SCOPE_BROKER_PASSWORD": "${EM_SCOPE_BROKER_PASSWORD:?set EM_SCOPE_BROKER_PASSWORD in docker/.env}",
            "EM_BROKER_TOPIC_PREFIX": "${EM_BROKER_TOPIC_PREFIX:-/topic/}",
        },
        volumes=("broker-definitions:/definitions", "broker-tls:/tls"),
        depends_on={"secrets-check": COMPLETED},
        restart="no",
        runs_as="equivalent",
        note="the broker's users (RabbitMQ definitions): the platform's, and the microscope's, which may "
        "publish only its own topics and read only the platform's answers; and, at the first start, the "
        "certificate of its published STOMP port (TLS)",
    ),
    Service(
        "rabbitmq",
        image="rabbitmq:3.13",
        command=(),
        env={
            "RABBITMQ_DEFAULT_USER": "${EM_BROKER_USERNAME:-em}",
            "RABBITMQ_DEFAULT_PASS": "${EM_BROKER_PASSWORD:?set EM_BROKER_PASSWORD in docker/.env}",
        },
        port=61613,  # plain STOMP, on the compose network only: the listener, live QC and the runs
        # the microscope PC reaches STOMP over TLS only (docker/rabbitmq/30-tls.conf), after a login
        ports=("${EM_BROKER_BIND:-127.0.0.1}:${EM_BROKER_PORT:-61614}:61614",),
        probe=Probe("command", test=("CMD", "rabbitmq-diagnostics", "-q", "check_port_listener", "61614")),
        volumes=(
            "rabbitmq-data:/var/lib/rabbitmq",
            "./rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins:ro",
            "./rabbitmq/20-definitions.conf:/etc/rabbitmq/conf.d/20-definitions.conf:ro",
            "./rabbitmq/30-tls.conf:/etc/rabbitmq/conf.d/30-tls.conf:ro",
            "broker-definitions:/etc/rabbitmq/definitions:ro",
            "broker-tls:/etc/rabbitmq/tls:ro",
        ),
        depends_on={"broker-init": COMPLETED},
        # RabbitMQ keeps its data under its node name, rabbit@HOSTNAME: a recreated container must keep it
        hostname="rabbitmq",
        runs_as="equivalent",
        note="the microscope's STOMP broker (RabbitMQ with its STOMP plugin)",
    ),
    Service(
        "minio",
        image="minio/minio:latest",
        command=("server", "/data", "--address", ":9000"),
        env={
            "MINIO_ROOT_USER": "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID in docker/.env}",
            "MINIO_ROOT_PASSWORD": "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY in docker/.env}",
        },
        port=9000,
        probe=Probe("command", test=("CMD", "mc", "ready", "local")),
        volumes=("minio-data:/data",),
        depends_on={"secrets-check": COMPLETED},
        runs_as="equivalent",
        note="S3 storage root (EM_DATA_ROOT); drop it and set EM_S3_ENDPOINT_URL for a real S3",
    ),
    Service(
        "minio-init",
        image="minio/mc:latest",
        entrypoint=("sh", "-c"),
        command=(
            'mc alias set em "http://{addr:minio}" "$${MINIO_ROOT_USER}" "$${MINIO_ROOT_PASSWORD}" '
            '&& mc mb --ignore-existing "em/$${EM_S3_BUCKET}"',
        ),
        env={
            "MINIO_ROOT_USER": "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID in docker/.env}",
            "MINIO_ROOT_PASSWORD": "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY in docker/.env}",
            "EM_S3_BUCKET": "${EM_S3_BUCKET:-em-data}",
        },
        depends_on={"minio": HEALTHY},
        restart="no",
        runs_as="equivalent",
        note="creates the bucket once",
    ),
    Service(
        "dask-certs",
        image=EM_IMAGE,
        command=("python", "-m", "em_platform.deploy.dask_tls", CERTS),
        volumes=(f"dask-certs:{CERTS}",),
        restart="no",
        runs_as="equivalent",
        note="Dask's TLS certificates, made at the first start (on loopback, `make deploy-local` needs none)",
    ),
    Service(
        "dask-scheduler",
        image=EM_IMAGE,
        # --no-dashboard still serves the HTTP routes (health, metrics) on *:8787 unless told where
        command=(
            "dask",
            "scheduler",
            "--host",
            "{bind}",
            "--port",
            "{port}",
            "--no-dashboard",
            "--dashboard-address",
            "{bind}:0",
        ),
        env=QUIET_DASK_ENV,
        compose_only_env=TLS_ENV,  # it runs what clients send: TLS with the cluster's certificate only
        port=8786,
        probe=Probe("tcp"),
        volumes=(DASK_CERTS_VOLUME,),
        depends_on={"dask-certs": COMPLETED},
        note="the pixel work's scheduler (DASK_SCHEDULER_ADDRESS)",
    ),
    Service(
        "dask-worker",
        image=EM_IMAGE,
        command=(
            "dask",
            "worker",
            "{addr:dask-scheduler}",
            "--nthreads",
            "${DASK_WORKER_THREADS:-2}",
            "--memory-limit",
            "${DASK_WORKER_MEMORY:-4GiB}",
            "--no-dashboard",
            "--dashboard-address",
            "{bind}:0",
            "--preload",
            "em_platform.deploy.batch_niceness",  # nice 10, its session at autogroup 19: live tiles first
        ),
        env={**platform_env(("s3",)), **QUIET_DASK_ENV},  # its tasks read and write the storage root
        compose_only_env=TLS_ENV,
        replicas="${DASK_WORKERS:-2}",
        cpu_shares="${DASK_WORKER_CPU_SHARES:-128}",  # 1/8 of a live-QC container's weight while both want CPU
        depends_on={"dask-scheduler": HEALTHY},
        volumes=(DATA_VOLUME, DASK_CERTS_VOLUME),
        note="scale with DASK_WORKERS; they read the inbox/tiles and write the buffer and S3",
    ),
    Service(
        "user-code",
        image=EM_IMAGE,
        command=(
            "dagster",
            "code-server",
            "start",
            "-h",
            "{bind}",
            "-p",
            "{port}",
            "-m",
            "em_platform.definitions",
            "--location-name",
            LOCATION_NAME,
        ),
        env=platform_env(("catalog", "dagster")),  # sensors read the catalog and journal
        compose_only_env={"DAGSTER_CURRENT_IMAGE": "${EM_IMAGE:-em-platform:latest}"},
        port=4000,
        depends_on={"postgresql": HEALTHY, "minio-init": COMPLETED, "dask-scheduler": HEALTHY},
        # a Dagster CLI that imports Dagster first: 3 s here when quiet, over 5 s on a loaded 2-core host
        probe=Probe("grpc", timeout="30s", start_period="60s"),
        volumes=(DATA_VOLUME,),
        note="the code location over gRPC; its sensors scan the inbox; DockerRunLauncher runs its image",
    ),
    Service(
        "webserver",
        image=DAGSTER_IMAGE,
        command=("dagster-webserver", "-h", "{bind}", "-p", "{port}", "-w", "workspace.yaml"),
        env={**_pg_env(password=True), **_workspace_env()},
        port=3000,
        depends_on={"postgresql": HEALTHY, "user-code": HEALTHY},
        probe=Probe("http", path="/server_info"),
        volumes=("dagster-compute-logs:/opt/dagster/compute_logs",),
        working_dir=DAGSTER_HOME,
        note="the web UI; no Docker socket: its Terminate marks a run CANCELING and the run stops itself",
    ),
    Service(
        "daemon",
        image=DAGSTER_IMAGE,
        command=("dagster-daemon", "run", "-w", "workspace.yaml"),
        # the run launcher copies these names from the daemon's environment into each run container
        env={**platform_env(), **_workspace_env()},
        # the run launcher puts run containers on this stack's network with its data and compute-log volumes
        compose_only_env={STACK_ENV: STACK_NAME, **TLS_ENV},  # TLS_ENV: for the runs it launches
        depends_on={"postgresql": HEALTHY, "user-code": HEALTHY},
        probe=Probe("daemon", timeout="30s", start_period="60s"),  # a Dagster CLI too (above)
        volumes=(
            # the engine's API: Docker's socket, or podman's (`podman system service`; make compose-up)
            "${DOCKER_SOCKET:-/var/run/docker.sock}:/var/run/docker.sock",
            "dagster-compute-logs:/opt/dagster/compute_logs",
        ),
        working_dir=DAGSTER_HOME,
        restart="on-failure",
        note="sensors, schedules, the run queue, backfills, run monitoring; launches runs as containers",
    ),
    Service(
        "listener",
        image=EM_IMAGE,
        command=(
            "em-platform",
            "listen",
            "--broker",
            "{addr:rabbitmq}",
            "--subscription",
            "${EM_BROKER_SUBSCRIPTION:-em_platform_journal}",
            "--topic-prefix",
            "${EM_BROKER_TOPIC_PREFIX:-/topic/}",
        ),
        env=platform_env(("catalog", "broker")),  # the broker in, the journal out
        depends_on={"postgresql": HEALTHY, "rabbitmq": HEALTHY},
        probe=Probe("log", pattern="subscribed to "),
        note="journals the microscope's tile.raw / montage.* messages (durable subscription)",
    ),
    Service(
        "live-qc",
        image=EM_IMAGE,
        command=("em-platform", "live-qc"),
        env=platform_env(("catalog", "broker")),  # the journal in, verdicts out
        depends_on={"postgresql": HEALTHY, "rabbitmq": HEALTHY, "dask-scheduler": HEALTHY},
        probe=Probe("log", pattern="watching the journal"),
        volumes=(DATA_VOLUME,),  # the buffer its processed tiles are staged in, shared with the runs
        restart="on-failure",
        note="judges live montages' tiles as they land (warm: no run start); the montage runs record it",
    ),
    Service(
        "viewer",
        image=EM_IMAGE,
        command=("em-platform", "viewer", "--host", "{bind}", "--port", "{port}"),
        # it reads images, nothing else; it answers the names browsers reach it by through the proxy
        env={**platform_env(("s3",)), "EM_VIEWER_HOSTS": "${EM_PUBLIC_HOST:-127.0.0.1}"},
        port=3030,
        depends_on={"minio-init": COMPLETED},
        probe=Probe("http", path="/v/em/"),
        note="Neuroglancer and the data root's OME-Zarr images, read only (every image's link opens here)",
    ),
    Service(
        "proxy",
        image="caddy:2",
        command=("caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"),
        env={"EM_PUBLIC_HOST": "${EM_PUBLIC_HOST:-127.0.0.1}"},  # its certificates' name, and the sites'
        ports=(
            "${EM_WEB_BIND:-127.0.0.1}:${EM_WEB_PORT:-3000}:3000",  # the UI, over TLS, after a login
            "${EM_VIEWER_BIND:-127.0.0.1}:${EM_VIEWER_PORT:-3030}:3030",  # the viewer: EM_VIEWER_URL
        ),
        volumes=(
            "./proxy/Caddyfile:/etc/caddy/Caddyfile:ro",
            "${EM_UI_USERS:-./proxy/users}:/etc/caddy/users:ro",
            "proxy-data:/data",  # its CA and certificates
        ),
        depends_on={"webserver": HEALTHY, "viewer": HEALTHY},
        probe=Probe(
            "command", test=("CMD", "wget", "-q", "-O", "/dev/null", "http://localhost:2019/config/")
        ),
        runs_as="equivalent",
        note="the one door to the UI and the viewer: TLS and a login (Caddy); `make deploy-local` serves "
        "them on loopback only",
    ),
)


def service(name: str) -> Service:
    for s in SERVICES:
        if s.name == name:
            return s
    raise KeyError(f"no service {name!r} in the topology (services: {', '.join(s.name for s in SERVICES)})")


def start_order() -> list[Service]:
    """Services in an order that respects ``depends_on`` (the table's order among independent ones)."""
    done: list[Service] = []
    pending = list(SERVICES)
    while pending:
        ready = [s for s in pending if all(d in {x.name for x in done} for d in s.depends_on)]
        if not ready:
            raise ValueError(f"depends_on has a cycle among {[s.name for s in pending]}")
        done.append(ready[0])
        pending.remove(ready[0])
    return done
