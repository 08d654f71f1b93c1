"""The production Dagster instance: runs that stop themselves (so the web UI needs no Docker socket) and a
daemon reported dead within a minute and a half.

The open-source Docker run launcher terminates a run by stopping its container, from the webserver's
process: the webserver would need the host's Docker socket, which is root on the host for anyone who
reaches the UI. Here the UI only marks the run CANCELING; every run process watches its own status (the
cancellation thread Dagster ships and gates behind ``should_start_background_run_thread``) and interrupts
itself within ``run_monitoring.cancellation_thread_poll_interval_seconds``. The daemon, which has the socket
to launch containers, keeps the container stop for a run that does not react, after
``cancel_timeout_seconds`` through run monitoring.

Run containers join the stack they belong to: its network and its data and compute-log volumes are named
after compose's project (``EM_STACK_NAME``, which compose gives the daemon), so two stacks on one host (a
facility's and a test's) never share a network or a volume. Each run's container is removed when it ends
(``auto_remove`` in docker/dagster.yaml); its logs stay in the event log and the compute-log volume.

Dagster reports a daemon healthy until 30 minutes after its last heartbeat; an operator looking at the UI
after a crash is told all is well. Here the tolerance is one minute beyond the 30 s heartbeat interval.

Dagster's PostgreSQL storages open a new connection for every query outside the webserver (SQLAlchemy's
``NullPool``): an idle daemon opened 18 a second (363 in 20 s, strace), each a PostgreSQL backend started
and torn down, about 4.7 ms of the machine's CPU (a tenth of a core, idle, beside the live QC); a run writes
its events the same way. Here every process keeps a small pool, checked before each use (``pool_pre_ping``),
so a PostgreSQL restart costs a reconnect, not an error; bursts beyond it still get connections of their own.

Imports Dagster only: the Dagster image installs this package without its dependencies.
"""

from __future__ import annotations

import json
import os

from dagster import DagsterInstance
from dagster_docker import DockerRunLauncher

DOCKER_SOCKET = "/var/run/docker.sock"
POOLED_CONNECTIONS = 2  # kept open by each Dagster process, per storage (runs, events, schedules)
POOL_RECYCLE_SECONDS = 3600
HEARTBEAT_TOLERANCE_SECONDS = 60
STACK_ENV = "EM_STACK_NAME"  # em_platform.deploy.services.STACK_ENV (this module imports Dagster only)
DEFAULT_STACK = "em-platform"


class FacilityInstance(DagsterInstance):
    """A Dagster instance whose run processes watch for their own cancellation, whose daemon health follows
    the heartbeats, and whose PostgreSQL storages keep their connections (:func:`pool_connections`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for storage in (self._run_storage, self._event_storage, self._schedule_storage):
            pool_connections(storage)

    @classmethod
    def config_schema(cls) -> dict:  # what a custom instance class must declare: no settings of its own
        return {}

    @staticmethod
    def config_defaults(base_dir: str):
        from dagster._core.instance.ref import InstanceRef

        return InstanceRef.config_defaults(base_dir)

    @property
    def should_start_background_run_thread(self) -> bool:
        return True

    def get_daemon_statuses(self, daemon_types=None):
        from dagster._daemon.controller import get_daemon_statuses

        return get_daemon_statuses(
            self,
            daemon_types=daemon_types or self.get_required_daemon_types(),
            ignore_errors=True,
            heartbeat_tolerance_seconds=HEARTBEAT_TOLERANCE_SECONDS,
        )


def pool_connections(storage) -> None:
    """A PostgreSQL storage's connection per query replaced by a pool of :data:`POOLED_CONNECTIONS` (see the
    module's docstring); other storages (SQLite) and engines pooled already (the webserver's) are left."""
    import sqlalchemy.pool

    engine, url = getattr(storage, "_engine", None), getattr(storage, "postgres_url", None)
    if engine is None or url is None or not isinstance(engine.pool, sqlalchemy.pool.NullPool):
        return
    from dagster_postgres.utils import create_pg_engine

    storage._engine = create_pg_engine(
        url,
        getattr(storage, "_token_provider", None),
        isolation_level="AUTOCOMMIT",
        pool_size=POOLED_CONNECTIONS,
        max_overflow=-1,  # no limit: a burst opens connections as before, and closes those beyond the pool
        pool_pre_ping=True,
        pool_recycle=POOL_RECYCLE_SECONDS,
    )
    engine.dispose()


def stack_mounts(stack: str) -> tuple[list[str], list[str]]:
    """(networks, volumes) of a run container in stack ``stack`` (docker/compose.yaml's names)."""
    return (
        [stack],
        [
            f"{stack}-data:/data",
            f"{stack}-compute-logs:/opt/dagster/compute_logs",
            f"{stack}-dask-certs:/opt/dask-certs:ro",  # the cluster's TLS certificate (em_platform.deploy.dask_tls)
        ],
    )


class RunRefused(Exception):
    """A run asks for more than the deployment launches; the message names what, and the run fails with it."""


def run_refusal(origin, image: str | None) -> str | None:
    """Why the run of code ``origin`` (its stored repository origin) may not be launched by this deployment,
    or None. Anyone who can write Dagster's run storage can store an origin; the daemon holds the engine's
    socket, so what an origin asks of the engine (another image, ``container_kwargs`` such as privileged or
    a host path, another entry point) would be root on the host. Only the deployment's image with the
    deployment's own options is launched."""
    asked = origin.container_context or {}
    if asked:
        shown = json.dumps(asked, sort_keys=True, default=str)
        return (
            f"the run asks for container settings of its own ({shown[:300]}); this deployment launches runs "
            "only with its own network, volumes and options (docker/dagster.yaml)"
        )
    if image is None:
        return "this deployment names no run image (DAGSTER_CURRENT_IMAGE for the daemon): no run is launched"
    if origin.container_image not in (None, image):
        return f"the run asks for image {origin.container_image!r}; this deployment launches only {image!r}"
    if origin.entry_point not in (None, ["dagster"], ("dagster",)):
        return f"the run asks for entry point {list(origin.entry_point)!r}; runs start with `dagster` only"
    return None


class SelfCancellingDockerRunLauncher(DockerRunLauncher):
    """Launches runs as containers of their stack, of the deployment's image with the deployment's options
    only (:func:`run_refusal`); terminates them by status where there is no Docker socket."""

    def get_container_context(self, dagster_run):
        """The launcher's configuration and the stack's network and volumes: never a run's stored context
        (a run that has one is refused at launch)."""
        from dagster_docker.container_context import DockerContainerContext

        networks, volumes = stack_mounts(os.environ.get(STACK_ENV) or DEFAULT_STACK)
        return DockerContainerContext(
            registry=self.registry,
            env_vars=self.env_vars,
            networks=networks,
            container_kwargs={**self.container_kwargs, "volumes": volumes},
        )

    def _get_docker_image(self, job_code_origin):
        refusal = run_refusal(job_code_origin.repository_origin, self.image)
        if refusal is not None:
            raise RunRefused(f"run not launched: {refusal}")
        return self.image

    def _get_container(self, run):
        """The run's container, only if it is the one launched for this run (its label): a run's tag naming
        another container (the database's, say) must not let terminate or run monitoring touch it."""
        container = super()._get_container(run)
        if container is not None and (container.labels or {}).get("dagster/run_id") != run.run_id:
            return None
        return container

    def terminate(self, run_id: str) -> bool:
        if os.path.exists(DOCKER_SOCKET):
            return super().terminate(run_id)
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished:
            return False
        self._instance.report_run_canceling(
            run, message="Cancelling: the run's own process stops it (this service has no Docker socket)"
        )
        return True
