"""Deployment settings from the environment, checked once, with errors that say which variable to fix."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from em_platform.edge import MONTAGE_MAX_GRID, STAGE_MAX_NM, MontageBounds

DEPLOYMENTS = ("local", "docker")
COMPUTE = ("local", "slurm")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the environment variable."""


DEFAULT_VIEWER_URL = "http://127.0.0.1:3030"

BROKER_MAX_MESSAGE_BYTES = 16 << 20
"""The largest message body the listener takes from the broker (``EM_BROKER_MAX_MESSAGE_BYTES``): 16 MiB. The
largest message a scope sends is the ``montage.complete`` of the largest montage ``EM_MONTAGE_MAX_GRID`` allows
(256 × 256 tiles: about 10 MB in pigeon's JSON with 64-character tile ids); every other consumed message is under
1 KiB. ``docker/rabbitmq/40-limits.conf`` gives the broker's ``max_message_size`` the same value."""
_LEAST_MESSAGE_BYTES = 1 << 16  # below it even a small montage's montage.complete would be refused


@dataclass(frozen=True)
class Settings:
    deployment: str
    data_root: str
    inbox: str
    catalog_url: str
    dask_scheduler_address: str | None
    s3_endpoint_url: str | None
    inbox_settle_seconds: float
    # HOST:PORT of the STOMP broker the microscope talks to; None = the embedded simulator
    broker: str | None = None
    # the scope's calibrated pixel size; with it, tiles are matched around their stage positions
    scope_pixel_size_nm: float | None = None
    # local folder where a montage's processed tiles and fused image wait until they are uploaded
    buffer: str = ""
    # local folder where public-dataset downloads wait (resumable) until their ingest completes
    downloads: str = ""
    # STOMP destination prefix of the microscope's topics (pigeon's topic_prefix) and the broker login;
    # the password is read from EM_BROKER_PASSWORD where it is used, never kept here (settings are printed)
    broker_topic_prefix: str = "/topic/"
    broker_username: str | None = None
    # STOMP over TLS to the broker: None (plain), "system" (the system's CAs) or the broker's CA certificate
    broker_tls: str | None = None
    # where the Dask workers run: "local" (in the run, or DASK_SCHEDULER_ADDRESS's cluster) or "slurm" (batch
    # jobs through dask-jobqueue, EM_SLURM_*: em_platform/cluster/slurm.py)
    compute: str = "local"
    # the Dagster instance (run history, schedules, sensors) every entry point shares: $DAGSTER_HOME
    dagster_home: str = ""
    # local folder of cryo-ET simulation specs (YAML/JSON) that the simulation sensor watches
    simulations: str = ""
    # local folder of cryo sessions (SerialEM/Tomo5 mdocs, stacks, movies) that the cryo sensor watches
    cryo_sessions: str = ""
    # the folders raw tiles may be read from (the scopes' shares): a tile.raw path elsewhere is refused
    scope_shares: tuple[str, ...] = ()
    # where users' browsers reach `em-platform viewer` (Neuroglancer + the data root's images); every
    # OME-Zarr's "neuroglancer" link starts with it
    viewer_url: str = DEFAULT_VIEWER_URL
    # host names `em-platform viewer` answers to besides loopback: EM_VIEWER_URL's host and EM_VIEWER_HOSTS
    # (e.g. a reverse proxy's public name); a request with any other Host is refused (DNS rebinding)
    viewer_hosts: tuple[str, ...] = ()
    # the largest montage accepted from the microscope: rows and columns each, in tiles, and how far from
    # the stage origin a tile may be (nm); a message past them is refused and dead-lettered (edge.MontageBounds)
    montage_max_grid: int = MONTAGE_MAX_GRID
    stage_max_nm: int = STAGE_MAX_NM
    # the largest message body the listener takes from the broker; a larger one is dead-lettered, not parsed
    broker_max_message_bytes: int = BROKER_MAX_MESSAGE_BYTES

    @property
    def storage_options(self) -> dict:
        from em_platform.storage import storage_options_for

        return storage_options_for(self.data_root, self.s3_endpoint_url)


def project_dir() -> Path | None:
    """The source checkout em_platform runs from (its pyproject.toml beside the package), else None.

    In a checkout every entry point (make, the ``em-platform`` CLI, ``dagster`` commands) defaults to the
    checkout's ``var/``, so they all see one data root and one Dagster home; an installed copy uses ``~/.em_platform``.
    """
    root = Path(__file__).resolve().parents[1]
    try:
        text = (root / "pyproject.toml").read_text()
    except OSError:
        return None
    return root if 'name = "em-platform"' in text else None


def _default_home_folder(name: str) -> str:
    root = project_dir()
    return str(root / "var" / name) if root else str(Path.home() / ".em_platform" / name)


def default_data_root() -> str:
    return _default_home_folder("data")


def default_dagster_home() -> str:
    return _default_home_folder("dagster_home")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read EM_* settings; the local deployment fills in embedded defaults, docker requires them."""
    env = os.environ if env is None else env
    deployment = env.get("EM_DEPLOYMENT", "local").strip().lower() or "local"
    if deployment not in DEPLOYMENTS:
        raise ConfigError(f"EM_DEPLOYMENT={deployment!r} is not one of {', '.join(DEPLOYMENTS)}")
    local = deployment == "local"

    def need(name: str, default: str | None) -> str:
        value = env.get(name, "").strip()
        if value:
            return value
        if local and default is not None:
            return default
        raise ConfigError(f"{name} must be set for the {deployment!r} deployment")

    data_root = need("EM_DATA_ROOT", default_data_root())
    remote = "://" in data_root and not data_root.startswith("file://")
    if data_root.startswith("file://"):
        data_root = data_root[len("file://") :]
    if not remote:
        data_root = str(Path(data_root).expanduser().resolve())
    inbox = env.get("EM_INBOX", "").strip() or (None if remote else str(Path(data_root) / "inbox"))
    if not inbox:
        raise ConfigError("EM_INBOX must be set to a local folder when EM_DATA_ROOT is object storage")
    catalog_default = None if remote else f"sqlite:///{Path(data_root) / 'catalog.sqlite'}"
    catalog_url = env.get("EM_CATALOG_URL", "").strip() or catalog_default
    if not catalog_url:
        raise ConfigError(
            "EM_CATALOG_URL must be set when EM_DATA_ROOT is object storage (a SQLite file cannot live there)"
        )
    if deployment == "docker" and catalog_url.startswith("sqlite"):
        raise ConfigError("EM_CATALOG_URL must be a PostgreSQL URL for the 'docker' deployment, not SQLite")
    buffer = _local_folder(env, "EM_BUFFER", "buffer", data_root, remote, "the acquisition buffer")
    downloads = _local_folder(env, "EM_DOWNLOADS", "downloads", data_root, remote, "the download cache")
    simulations = _local_folder(
        env, "EM_SIMULATIONS", "simulations", data_root, remote, "the simulation specs"
    )
    cryo_sessions = _local_folder(
        env, "EM_CRYO_SESSIONS", "cryo_sessions", data_root, remote, "the cryo sessions"
    )
    settle = env.get("EM_INBOX_SETTLE_SECONDS", "5").strip() or "5"
    try:
        settle_s = float(settle)
        if settle_s < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"EM_INBOX_SETTLE_SECONDS={settle!r} must be a number of seconds ≥ 0") from None
    dask_addr = env.get("DASK_SCHEDULER_ADDRESS", "").strip() or None
    if deployment == "docker" and not dask_addr:
        raise ConfigError(
            "DASK_SCHEDULER_ADDRESS must be set for the 'docker' deployment (e.g. tcp://dask-scheduler:8786)"
        )
    compute = env.get("EM_COMPUTE", "").strip().lower() or "local"
    if compute not in COMPUTE:
        raise ConfigError(f"EM_COMPUTE={compute!r} is not one of {', '.join(COMPUTE)}")
    if compute == "slurm":
        if dask_addr:
            raise ConfigError(
                "EM_COMPUTE=slurm starts its own scheduler for the SLURM worker jobs: unset DASK_SCHEDULER_ADDRESS"
            )
        from em_platform.cluster.slurm import SlurmSettingError, SlurmSettings

        try:
            SlurmSettings.from_env(env)  # a wrong EM_SLURM_* stops the code location from loading, named
        except SlurmSettingError as exc:
            raise ConfigError(str(exc)) from None
    try:
        bounds = MontageBounds.from_env(env)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Settings(
        deployment=deployment,
        data_root=data_root,
        inbox=str(Path(inbox).expanduser().resolve()),
        catalog_url=catalog_url,
        dask_scheduler_address=dask_addr,
        s3_endpoint_url=env.get("EM_S3_ENDPOINT_URL", "").strip() or None,
        inbox_settle_seconds=settle_s,
        broker=_broker(env.get("EM_BROKER", "").strip() or None),
        scope_pixel_size_nm=_pixel_size(env.get("EM_SCOPE_PIXEL_SIZE_NM", "").strip() or None),
        buffer=buffer,
        downloads=downloads,
        broker_topic_prefix=_topic_prefix(env.get("EM_BROKER_TOPIC_PREFIX")),
        broker_username=env.get("EM_BROKER_USERNAME", "").strip() or None,
        broker_tls=broker_tls(env.get("EM_BROKER_TLS")),
        compute=compute,
        dagster_home=str(
            Path(env.get("DAGSTER_HOME", "").strip() or default_dagster_home()).expanduser().resolve()
        ),
        simulations=simulations,
        cryo_sessions=cryo_sessions,
        scope_shares=_scope_shares(env, data_root, remote),
        viewer_url=_viewer_url(env.get("EM_VIEWER_URL", "").strip() or DEFAULT_VIEWER_URL),
        viewer_hosts=_viewer_hosts(env),
        montage_max_grid=bounds.max_grid,
        stage_max_nm=bounds.max_stage_nm,
        broker_max_message_bytes=broker_max_message_bytes(env),
    )


def _viewer_url(value: str) -> str:
    """EM_VIEWER_URL: an http(s) URL with a host (what a browser opens), no query or fragment."""
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(
            f"EM_VIEWER_URL={value!r} must be the http(s) address browsers reach `em-platform viewer` at, "
            f"e.g. {DEFAULT_VIEWER_URL}"
        )
    return value.rstrip("/")


def _viewer_hosts(env: Mapping[str, str]) -> tuple[str, ...]:
    """EM_VIEWER_URL's host, then EM_VIEWER_HOSTS: further host names, separated by ','."""
    from urllib.parse import urlsplit

    from em_platform.web_guard.rules import host_name

    url_host = urlsplit(env.get("EM_VIEWER_URL", "").strip() or DEFAULT_VIEWER_URL).hostname
    names = [url_host] if url_host else []
    for entry in filter(None, (e.strip() for e in env.get("EM_VIEWER_HOSTS", "").split(","))):
        name = host_name(entry)
        if name is None:
            raise ConfigError(
                f"EM_VIEWER_HOSTS entry {entry!r} must be a host name or address browsers use for the viewer "
                "(e.g. viewer.facility.example), without scheme or path; separate several with ','"
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


def _scope_shares(env: Mapping[str, str], data_root: str, remote: bool) -> tuple[str, ...]:
    """EM_SCOPE_SHARES: folders separated by ':' (os.pathsep); default the embedded simulator's tile folder."""
    raw = env.get("EM_SCOPE_SHARES", "").strip()
    if not raw:
        return (_local_folder({}, "EM_SCOPE_SHARES", "scope", data_root, remote, "the scope share"),)
    shares = []
    for part in filter(None, (p.strip() for p in raw.split(os.pathsep))):
        if "://" in part or not Path(part).expanduser().is_absolute():
            raise ConfigError(
                f"EM_SCOPE_SHARES entry {part!r} must be an absolute local folder (the scope's tile share as "
                f"mounted here); separate several with {os.pathsep!r}"
            )
        shares.append(str(Path(part).expanduser().resolve()))
    return tuple(shares)


def _local_folder(
    env: Mapping[str, str], name: str, subdir: str, data_root: str, remote: bool, what: str
) -> str:
    """A local working folder: ``$name``, else ``<data root>/<subdir>`` (when the root is object storage:
    the checkout's ``var/<subdir>``, or ``~/.em_platform/<subdir>`` for an installed copy)."""
    value = env.get(name, "").strip() or (
        str(Path(data_root) / subdir) if not remote else _default_home_folder(subdir)
    )
    if "://" in value and not value.startswith("file://"):
        raise ConfigError(f"{name}={value!r} must be a local folder ({what}), not a URL")
    return str(Path(value.removeprefix("file://")).expanduser().resolve())


def _pixel_size(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        size = float(value)
        if not 0 < size < 1e6:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"EM_SCOPE_PIXEL_SIZE_NM={value!r} must be the scope's pixel size in nm, a number > 0 (e.g. 4.0)"
        ) from None
    return size


def _broker(spec: str | None) -> str | None:
    if spec is None:
        return None
    host, _, port = spec.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"EM_BROKER={spec!r} must be HOST:PORT of the STOMP broker, e.g. 127.0.0.1:61613")
    return spec


def broker_tls(value: str | None) -> str | None:
    """``EM_BROKER_TLS``: empty for plain STOMP, ``system`` for TLS checked against the system's CAs, or the
    path of the CA certificate (PEM) the broker's certificate must chain to; ConfigError otherwise."""
    value = (value or "").strip()
    if not value or value == "system":
        return value or None
    if not Path(value).is_file():
        raise ConfigError(
            f"EM_BROKER_TLS={value!r} names no file: give the path of the broker's CA certificate (PEM; for "
            "the compose deployment `python -m em_platform.deploy compose-ca --broker` prints it), `system` "
            "to trust the system's CAs, or leave it empty for plain STOMP"
        )
    return value


def broker_max_message_bytes(env: Mapping[str, str] | None = None) -> int:
    """``EM_BROKER_MAX_MESSAGE_BYTES`` (unset: :data:`BROKER_MAX_MESSAGE_BYTES`); ConfigError naming it."""
    env = os.environ if env is None else env
    raw = env.get("EM_BROKER_MAX_MESSAGE_BYTES", "").strip()
    if not raw:
        return BROKER_MAX_MESSAGE_BYTES
    if not raw.isdigit() or int(raw) < _LEAST_MESSAGE_BYTES:
        raise ConfigError(
            f"EM_BROKER_MAX_MESSAGE_BYTES={raw!r} must be a whole number of bytes ≥ {_LEAST_MESSAGE_BYTES} (the "
            f"largest message body the listener takes; default {BROKER_MAX_MESSAGE_BYTES}); raise the broker's "
            "max_message_size with it"
        )
    return int(raw)


def sensor_interval_seconds(default: int, env: Mapping[str, str] | None = None) -> int:
    """A sensor's minimum interval: ``EM_SENSOR_INTERVAL_SECONDS`` when set (a deployment's choice, e.g. a
    test topology that should react within seconds), else the sensor's own ``default``."""
    env = os.environ if env is None else env
    value = env.get("EM_SENSOR_INTERVAL_SECONDS", "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"EM_SENSOR_INTERVAL_SECONDS={value!r} must be a whole number of seconds ≥ 1")
    return int(value)


# The environment variable behind each setting, for display (`em-platform settings`).
ENV_NAMES = {
    "deployment": "EM_DEPLOYMENT",
    "data_root": "EM_DATA_ROOT",
    "inbox": "EM_INBOX",
    "catalog_url": "EM_CATALOG_URL",
    "dask_scheduler_address": "DASK_SCHEDULER_ADDRESS",
    "s3_endpoint_url": "EM_S3_ENDPOINT_URL",
    "inbox_settle_seconds": "EM_INBOX_SETTLE_SECONDS",
    "broker": "EM_BROKER",
    "scope_pixel_size_nm": "EM_SCOPE_PIXEL_SIZE_NM",
    "buffer": "EM_BUFFER",
    "downloads": "EM_DOWNLOADS",
    "simulations": "EM_SIMULATIONS",
    "cryo_sessions": "EM_CRYO_SESSIONS",
    "scope_shares": "EM_SCOPE_SHARES",
    "dagster_home": "DAGSTER_HOME",
    "broker_topic_prefix": "EM_BROKER_TOPIC_PREFIX",
    "broker_username": "EM_BROKER_USERNAME",
    "broker_tls": "EM_BROKER_TLS",
    "compute": "EM_COMPUTE",
    "viewer_url": "EM_VIEWER_URL",
    "viewer_hosts": "EM_VIEWER_HOSTS",
    "montage_max_grid": "EM_MONTAGE_MAX_GRID",
    "stage_max_nm": "EM_STAGE_MAX_NM",
    "broker_max_message_bytes": "EM_BROKER_MAX_MESSAGE_BYTES",
}


def ensure_dagster_home(folder: str | Path) -> Path:
    """Create the Dagster home if needed, with the checkout's dagster.yaml (the embedded default instance)."""
    home = Path(folder)
    home.mkdir(parents=True, exist_ok=True)
    root = project_dir()
    target = home / "dagster.yaml"
    source = root / "dagster.yaml" if root is not None else None
    if source is not None and source.is_file() and not target.exists():
        target.write_text(source.read_text())
    return home


def _topic_prefix(value: str | None) -> str:
    """EM_BROKER_TOPIC_PREFIX: unset means RabbitMQ's ``/topic/``; set but empty is an empty prefix (Artemis)."""
    return "/topic/" if value is None else value.strip()
