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
``{etc}`` / ``{var}``
    the monitoring's configuration (``docker/prometheus`` mounted at ``/etc/em``; the runner writes its own) and
    a service's own state (its volume at ``/<service>``; a folder of the runner's state);
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

    ``test``: compose's healthcheck command (``command``; for another kind, the image's own way of checking
    what the runner checks its way, as in a server image without Python).
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
    # the compose networks it joins (NETWORKS): a service reaches only the services that share one with it
    networks: tuple[str, ...] = ("data",)
    # where Prometheus scrapes it ("/metrics"); "" for none (em_platform/deploy/monitoring.py); at
    # ``metrics_port`` when that is not its own port (Dask's scheduler: its HTTP server's), which topologies
    # address as the service ``<name>-metrics``
    metrics: str = ""
    metrics_port: int | None = None
    note: str = ""

    @property
    def metrics_at(self) -> str:
        """The name its metrics answer under in a topology's addresses."""
        return f"{self.name}-metrics" if self.metrics_port else self.name


# Who may reach whom in compose: each service joins only the networks of the services it talks to
# (Service.networks), so a listener's or a run's container cannot even open a connection to the code server,
# the webserver or the door. "data" keeps the stack's name: the run launcher puts run containers on it.
NETWORKS = {
    "data": "",  # the stores, the broker, Dask, the listener, live QC, the viewer and every run
    "control": "-control",  # Dagster: webserver, daemon, code server, and PostgreSQL for their storage
    "web": "-web",  # the TLS proxy and what it serves: the webserver and the viewer
    "door": "-door",  # the proxy and its login service alone (the door trusts X-Forwarded-For)
    "monitoring": "-monitoring",  # the proxy and Prometheus alone: its UI behind the login, at /prometheus/
}


def _secret(name: str) -> str:
    return f"${{{name}:?set {name} in docker/.env}}"


# Each service's own PostgreSQL role (em_platform/deploy/db_roles.py): the roles' names, and the password
# setting of each. The superuser (POSTGRES_USER) is the postgresql and db-init containers' only.
DB_ROLE_PREFIX = "${EM_DB_ROLE_PREFIX:-em}"


def db_role(name: str) -> str:
    return f"{DB_ROLE_PREFIX}_{name}"


def db_password(name: str) -> str:
    return _secret(f"EM_DB_{name.upper()}_PASSWORD")


# The object store's users (MinIO's, made by minio-init): runs and Dask workers read and write, the viewer
# only reads. The store's root key is MinIO's and minio-init's alone.
S3_USERS = {"runs": "read and write", "viewer": "read only"}


def _s3_user_env(user: str) -> dict[str, str]:
    """A store user's key pair, under the setting names minio-init makes the user from."""
    return {
        f"EM_S3_{user.upper()}_ACCESS_KEY": _secret(f"EM_S3_{user.upper()}_ACCESS_KEY"),
        f"EM_S3_{user.upper()}_SECRET_KEY": _secret(f"EM_S3_{user.upper()}_SECRET_KEY"),
    }


def s3_keys(user: str) -> dict[str, str]:
    """What a client of the store reads (botocore): the user's key pair."""
    keys = _s3_user_env(user)
    return {
        "AWS_ACCESS_KEY_ID": keys[f"EM_S3_{user.upper()}_ACCESS_KEY"],
        "AWS_SECRET_ACCESS_KEY": keys[f"EM_S3_{user.upper()}_SECRET_KEY"],
    }


def _pg_env(password: bool = False) -> dict[str, str]:
    """Dagster's instance storage (docker/dagster.yaml reads these), as its own role; its password only with
    ``password``."""
    env = {
        "DAGSTER_POSTGRES_HOST": "{host:postgresql}",
        "DAGSTER_POSTGRES_PORT": "{port:postgresql}",
        "DAGSTER_POSTGRES_USER": db_role("dagster"),
        "DAGSTER_POSTGRES_DB": "${DAGSTER_DB:-dagster}",
    }
    if password:
        env["DAGSTER_POSTGRES_PASSWORD"] = db_password("dagster")
    return env


# The secret groups of the platform's settings, by what each unlocks. A service gets only the groups it uses
# (SERVICES below), each with its own credentials; the daemon gets the runs' (each run container gets its
# environment from it).
SECRET_GROUPS = ("catalog", "dagster", "s3", "broker", "neuprint")


def platform_env(
    secrets: tuple[str, ...] = SECRET_GROUPS, *, db: str = "runs", s3: str = "runs"
) -> dict[str, str]:
    """What em_platform reads (settings.py), with the secret groups ``secrets`` (default: all of them): the
    catalog as database role ``db``, the object store as user ``s3``."""
    env = {
        "EM_DEPLOYMENT": "docker",
        "EM_DATA_ROOT": "s3://${EM_S3_BUCKET:-em-data}/em",
        "EM_S3_ENDPOINT_URL": "${EM_S3_ENDPOINT_URL:-http://{addr:minio}}",
        "AWS_DEFAULT_REGION": "${AWS_DEFAULT_REGION:-us-east-1}",
        "EM_CATALOG_URL": f"postgresql+psycopg2://{db_role(db)}@{{addr:postgresql}}/${{EM_CATALOG_DB:-em_catalog}}",
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
        # how long what grows is kept (em_platform/retention/policy.py); empty: the defaults
        "EM_RETAIN_JOURNAL_DAYS": "${EM_RETAIN_JOURNAL_DAYS:-}",
        "EM_RETAIN_RUNS_DAYS": "${EM_RETAIN_RUNS_DAYS:-}",
        "EM_RETAIN_DEAD_LETTERS_DAYS": "${EM_RETAIN_DEAD_LETTERS_DAYS:-}",
        "EM_RETAIN_BUFFER_DAYS": "${EM_RETAIN_BUFFER_DAYS:-}",
        "EM_RETAIN_CRYO_INTERMEDIATES_DAYS": "${EM_RETAIN_CRYO_INTERMEDIATES_DAYS:-}",
        "EM_RETAIN_TILE_RECORDS_DAYS": "${EM_RETAIN_TILE_RECORDS_DAYS:-}",
        # the days in which storage_consistency audits every complete record once (em_platform/catalog/storage_audits.py)
        "EM_CONSISTENCY_CYCLE_DAYS": "${EM_CONSISTENCY_CYCLE_DAYS:-}",
        **_pg_env(),
    }
    unknown = set(secrets) - set(SECRET_GROUPS)
    if unknown:
        raise KeyError(f"no secret group {sorted(unknown)} (groups: {', '.join(SECRET_GROUPS)})")
    groups = {
        "catalog": {"PGPASSWORD": db_password(db)},  # libpq reads the catalog role's password from it
        "dagster": {"DAGSTER_POSTGRES_PASSWORD": db_password("dagster")},  # docker/dagster.yaml reads it
        "s3": s3_keys(s3),  # the storage root
        "broker": {"EM_BROKER_PASSWORD": _secret("EM_BROKER_PASSWORD")},
        "neuprint": {"NEUPRINT_TOKEN": "${NEUPRINT_TOKEN:-}"},  # FlyEM ingests' metadata
    }
    for group in secrets:
        env.update(groups[group])
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

# The database's login roles: Dagster's, and one per service (em_platform/deploy/db_roles.py grants their rights).
DB_LOGIN_ROLES = ("dagster", "listener", "live_qc", "cryo_live", "code", "runs")
# The secrets every store and the broker are created with; docker/.env.example holds placeholders for them.
SECRETS = (
    "POSTGRES_PASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "EM_BROKER_PASSWORD",
    "EM_SCOPE_BROKER_PASSWORD",
    *(f"EM_DB_{role.upper()}_PASSWORD" for role in DB_LOGIN_ROLES),
    *(f"EM_S3_{user.upper()}_SECRET_KEY" for user in S3_USERS),
)
# The object store's access key ids (names, not secrets); make compose-up writes new ones too.
ACCESS_KEYS = ("AWS_ACCESS_KEY_ID", *(f"EM_S3_{user.upper()}_ACCESS_KEY" for user in S3_USERS))
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
            # the superuser: this container's and db-init's only; every service has a role of its own
            "POSTGRES_USER": "${POSTGRES_USER:-postgres}",
            "POSTGRES_PASSWORD": _secret("POSTGRES_PASSWORD"),
            "POSTGRES_DB": "postgres",
        },
        port=5432,
        probe=Probe("command", test=("CMD-SHELL", "pg_isready -U $${POSTGRES_USER} -d postgres")),
        volumes=("postgres-data:/var/lib/postgresql/data",),
        depends_on={"secrets-check": COMPLETED},
        runs_as="equivalent",
        networks=("control", "data"),
        note="Dagster's run/event/schedule storage and, in a database of its own, the catalog + journal",
    ),
    Service(
        "db-init",
        image=EM_IMAGE,
        command=("python", "-m", "em_platform.deploy.db_roles"),
        env={
            "PGHOST": "{host:postgresql}",
            "PGPORT": "{port:postgresql}",
            "POSTGRES_USER": "${POSTGRES_USER:-postgres}",
            "POSTGRES_PASSWORD": _secret("POSTGRES_PASSWORD"),
            "DAGSTER_DB": "${DAGSTER_DB:-dagster}",
            "EM_CATALOG_DB": "${EM_CATALOG_DB:-em_catalog}",
            "EM_DB_ROLE_PREFIX": "${EM_DB_ROLE_PREFIX:-em}",
            "EM_DB_INIT_PATIENCE_S": "${EM_DB_INIT_PATIENCE_S:-60}",
            **{f"EM_DB_{role.upper()}_PASSWORD": db_password(role) for role in DB_LOGIN_ROLES},
        },
        depends_on={"postgresql": HEALTHY},
        restart="no",
        runs_as="equivalent",
        note="at every start, as the superuser: each service's database role, the two databases owned by "
        "roles of their own, the catalog's tables and each role's rights on them (em_platform/deploy/db_roles.py)",
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
            # the message and frame bounds (the listener's own: EM_BROKER_MAX_MESSAGE_BYTES)
            "./rabbitmq/40-limits.conf:/etc/rabbitmq/conf.d/40-limits.conf:ro",
            "./rabbitmq/41-stomp-frames.conf:/etc/rabbitmq/conf.d/41-stomp-frames.conf:ro",
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
            "MINIO_ROOT_USER": _secret("AWS_ACCESS_KEY_ID"),
            "MINIO_ROOT_PASSWORD": _secret("AWS_SECRET_ACCESS_KEY"),
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
        entrypoint=("sh",),
        command=("/em/minio-init.sh", "http://{addr:minio}"),
        env={
            "MINIO_ROOT_USER": _secret("AWS_ACCESS_KEY_ID"),
            "MINIO_ROOT_PASSWORD": _secret("AWS_SECRET_ACCESS_KEY"),
            "EM_S3_BUCKET": "${EM_S3_BUCKET:-em-data}",
            **{k: v for user in S3_USERS for k, v in _s3_user_env(user).items()},
        },
        volumes=("./minio/minio-init.sh:/em/minio-init.sh:ro",),
        depends_on={"minio": HEALTHY},
        restart="no",
        runs_as="equivalent",
        note="the bucket, and the store's users: runs (read and write, the bucket only) and viewer (read only)",
    ),
    Service(
        "dask-certs",
        image=EM_IMAGE,
        command=("python", "-m", "em_platform.deploy.dask_tls", CERTS),
        volumes=(f"dask-certs:{CERTS}",),
        restart="no",
        runs_as="equivalent",
        note="Dask's TLS certificates, made at the first start",
    ),
    Service(
        "proxy-certs",
        image=EM_IMAGE,
        command=("python", "-m", "em_platform.deploy.proxy_tls", "/certs"),
        env={"EM_PUBLIC_HOST": "${EM_PUBLIC_HOST:-127.0.0.1}"},  # the name browsers open the UI at
        volumes=("proxy-certs:/certs",),
        restart="no",
        runs_as="equivalent",
        note="the proxy's TLS certificate and its CA, constrained to the names it serves, made at the first "
        "start (`python -m em_platform.deploy compose-ca` prints the CA)",
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
            "{bind}:{port:dask-scheduler-metrics}",  # its HTTP routes: health, and /metrics for Prometheus
        ),
        env=QUIET_DASK_ENV,
        compose_only_env=TLS_ENV,  # it runs what clients send: TLS with the cluster's certificate only
        port=8786,
        metrics="/metrics",  # its workers by state: em_dask_workers (docker/prometheus/alerts.yml)
        metrics_port=8787,
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
            "em_platform.deploy.batch_niceness",  # nice 10, SCHED_IDLE tasks, autogroup 19: live first
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
        env=platform_env(("catalog", "dagster"), db="code"),  # sensors read the catalog and journal
        compose_only_env={"DAGSTER_CURRENT_IMAGE": "${EM_IMAGE:-em-platform:latest}"},
        port=4000,
        depends_on={"db-init": COMPLETED, "minio-init": COMPLETED, "dask-scheduler": HEALTHY},
        # a Dagster CLI that imports Dagster first: 3 s here when quiet, over 5 s on a loaded 2-core host
        probe=Probe("grpc", timeout="30s", start_period="60s"),
        volumes=(DATA_VOLUME,),
        networks=("control",),  # its gRPC starts runs: only the webserver and the daemon reach it
        note="the code location over gRPC; its sensors scan the inbox; DockerRunLauncher runs its image",
    ),
    Service(
        "webserver",
        image=DAGSTER_IMAGE,
        # dagster-webserver behind the guard (em_platform/webserver.py): no cross-site control, no framing
        command=(
            "python",
            "-m",
            "em_platform.webserver",
            "-h",
            "{bind}",
            "-p",
            "{port}",
            "-w",
            "workspace.yaml",
        ),
        # the names browsers reach it by through the proxy (any other Host is refused: DNS rebinding)
        env={**_pg_env(password=True), **_workspace_env(), "EM_WEB_HOSTS": "${EM_PUBLIC_HOST:-127.0.0.1}"},
        port=3000,
        depends_on={"db-init": COMPLETED, "user-code": HEALTHY},
        probe=Probe("http", path="/server_info"),
        volumes=("dagster-compute-logs:/opt/dagster/compute_logs",),
        working_dir=DAGSTER_HOME,
        networks=("control", "web"),  # the proxy alone reaches it from outside Dagster
        note="the web UI; no Docker socket: its Terminate marks a run CANCELING and the run stops itself",
    ),
    Service(
        "daemon",
        image=DAGSTER_IMAGE,
        command=("dagster-daemon", "run", "-w", "workspace.yaml"),
        # the run launcher copies these names from the daemon's environment into each run container
        env={**platform_env(), **_workspace_env()},
        # the run launcher puts run containers on this stack's network with its data and compute-log volumes
        compose_only_env={
            STACK_ENV: STACK_NAME,
            **TLS_ENV,  # for the runs it launches
            "DAGSTER_CURRENT_IMAGE": "${EM_IMAGE:-em-platform:latest}",  # the only image it launches runs of
        },
        depends_on={"db-init": COMPLETED, "user-code": HEALTHY},
        probe=Probe("daemon", timeout="30s", start_period="60s"),  # a Dagster CLI too (above)
        volumes=(
            # the engine's API: Docker's socket, or podman's (`podman system service`; make compose-up)
            "${DOCKER_SOCKET:-/var/run/docker.sock}:/var/run/docker.sock",
            "dagster-compute-logs:/opt/dagster/compute_logs",
        ),
        working_dir=DAGSTER_HOME,
        restart="on-failure",
        networks=("control",),
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
        # the broker in, the journal out; its counters for Prometheus
        env={**platform_env(("catalog", "broker"), db="listener"), "EM_LISTENER_METRICS": "{bind}:{port}"},
        port=9471,
        depends_on={"db-init": COMPLETED, "rabbitmq": HEALTHY},
        probe=Probe("log", pattern="subscribed to "),
        metrics="/metrics",
        note="journals the microscope's tile.raw / montage.* messages (durable subscription)",
    ),
    Service(
        "live-qc",
        image=EM_IMAGE,
        command=("em-platform", "live-qc"),
        # the journal in, verdicts out; its counters and latencies for Prometheus
        env={**platform_env(("catalog", "broker"), db="live_qc"), "EM_LIVE_QC_METRICS": "{bind}:{port}"},
        port=9470,
        depends_on={"db-init": COMPLETED, "rabbitmq": HEALTHY, "dask-scheduler": HEALTHY},
        probe=Probe("log", pattern="watching the journal"),
        metrics="/metrics",
        volumes=(DATA_VOLUME,),  # the buffer its processed tiles are staged in, shared with the runs
        restart="on-failure",
        note="judges live montages' tiles as they land (warm: no run start); the montage runs record it",
    ),
    Service(
        "cryo-live",
        image=EM_IMAGE,
        command=("em-platform", "cryo-live"),
        # the session folders in, the results tables and micrographs out; its counters and lag for Prometheus
        env={**platform_env(("catalog",), db="cryo_live"), "EM_CRYO_LIVE_METRICS": "{bind}:{port}"},
        port=9473,
        depends_on={"db-init": COMPLETED},
        probe=Probe("log", pattern="processing each single-particle exposure"),
        metrics="/metrics",
        volumes=(DATA_VOLUME,),  # the session folders and the micrographs it writes
        restart="on-failure",
        note="motion-corrects and CTF-fits each single-particle exposure as it lands, judged against the "
        "session's thresholds (em_platform/cryo/live_sessions.py)",
    ),
    Service(
        "metrics",
        image=EM_IMAGE,
        command=("em-platform", "metrics"),
        # it reads the journal and the catalog (the sensors' role), Dagster's runs, the buffer's filesystem
        env={**platform_env(("catalog", "dagster"), db="code"), "EM_METRICS": "{bind}:{port}"},
        port=9472,
        depends_on={"db-init": COMPLETED},
        probe=Probe("http", path="/metrics"),
        volumes=(DATA_VOLUME,),
        metrics="/metrics",
        note="the facility's gauges for Prometheus: montages being acquired by scope, tiles waiting for a verdict, "
        "uploads waiting, the buffer's disk, the runs that ended (em_platform/metrics_cli.py)",
    ),
    Service(
        "alertmanager",
        image="prom/alertmanager:v0.27.0",
        command=(
            "alertmanager",
            "--config.file={etc}/alertmanager.yml",
            "--storage.path={var}",
            "--web.listen-address={bind}:{port}",
            "--cluster.listen-address=",  # one Alertmanager: no gossip port
        ),
        port=9093,
        probe=Probe(
            "http",
            path="/-/ready",
            test=("CMD", "wget", "-q", "-O", "/dev/null", "http://localhost:9093/-/ready"),
        ),
        volumes=("./prometheus:/etc/em:ro", "alertmanager-data:/alertmanager"),
        entrypoint=("/usr/bin/env",),  # the command names its binary, as the process runner starts it
        metrics="/metrics",
        note="sends Prometheus's alerts to the operators (docker/prometheus/alertmanager.yml: a webhook)",
    ),
    Service(
        "prometheus",
        image="prom/prometheus:v2.53.0",
        command=(
            "prometheus",
            "--config.file={etc}/prometheus.yml",
            "--storage.tsdb.path={var}",
            "--storage.tsdb.retention.time=${EM_METRICS_RETENTION:-30d}",
            "--web.listen-address={bind}:{port}",
            # under /prometheus/, as the proxy serves it beside the UI, behind the same login
            "--web.external-url=/prometheus/",
            "--web.console.templates={etc}/consoles",
            "--web.console.libraries={etc}/consoles",
        ),
        port=9090,
        probe=Probe(
            "http",
            path="/prometheus/-/ready",
            test=("CMD", "wget", "-q", "-O", "/dev/null", "http://localhost:9090/prometheus/-/ready"),
        ),
        volumes=("./prometheus:/etc/em:ro", "prometheus-data:/prometheus"),
        entrypoint=("/usr/bin/env",),
        depends_on={"alertmanager": HEALTHY},
        networks=("data", "monitoring"),  # it scrapes the data network; the proxy serves its UI
        metrics="/prometheus/metrics",
        note="scrapes every service's /metrics, evaluates docker/prometheus/alerts.yml; its console "
        "/consoles/facility.html is the operators' page",
    ),
    Service(
        "viewer",
        image=EM_IMAGE,
        command=("em-platform", "viewer", "--host", "{bind}", "--port", "{port}"),
        # it reads images, nothing else; it answers the names browsers reach it by through the proxy
        env={**platform_env(("s3",), s3="viewer"), "EM_VIEWER_HOSTS": "${EM_PUBLIC_HOST:-127.0.0.1}"},
        port=3030,
        depends_on={"minio-init": COMPLETED},
        probe=Probe("http", path="/v/em/"),
        networks=("data", "web"),
        note="Neuroglancer and the data root's OME-Zarr images, read only (every image's link opens here)",
    ),
    Service(
        "door",
        image=EM_IMAGE,
        command=("em-platform", "door", "--users", "/em/ui-users", "--host", "{bind}", "--port", "{port}"),
        env={
            "EM_WEB_HOSTS": "${EM_PUBLIC_HOST:-127.0.0.1}",
            "EM_VIEWER_HOSTS": "${EM_PUBLIC_HOST:-127.0.0.1}",
            "EM_VIEWER_URL": "${EM_VIEWER_URL:-https://127.0.0.1:3030}",
        },
        port=3100,
        probe=Probe("tcp"),
        volumes=("${EM_UI_USERS:-./proxy/users}:/em/ui-users:ro",),  # read again whenever it changes
        runs_as="equivalent",
        networks=("door",),
        note="the proxy's login (bcrypt, failed logins bounded per client) and request guard (no cross-site "
        "control): em_platform/web_guard/door.py",
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
            "proxy-certs:/certs:ro",  # its certificate, made by proxy-certs
            "proxy-data:/data",
        ),
        depends_on={
            "webserver": HEALTHY,
            "viewer": HEALTHY,
            "door": HEALTHY,
            "proxy-certs": COMPLETED,
        },
        probe=Probe(
            "command", test=("CMD", "wget", "-q", "-O", "/dev/null", "http://localhost:2019/config/")
        ),
        runs_as="equivalent",
        networks=("web", "door", "monitoring"),
        note="the one way in to the UI and the viewer: TLS, the door's login and guard, security headers "
        "(Caddy); `make deploy-local` serves them on loopback only, behind the same guard",
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
