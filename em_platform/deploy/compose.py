"""``docker/compose.yaml``, generated from the service table (``python -m em_platform.deploy compose``).

Compared with Dagster's ``deploy_docker`` example (postgres + user code + webserver + daemon on one network,
``DAGSTER_CURRENT_IMAGE`` naming the image runs are launched from, the docker socket mounted into webserver
and daemon), the webserver gets no Docker socket (runs cancel themselves), and this adds the Dask cluster,
MinIO, RabbitMQ and the listener; secrets come only from ``docker/.env`` (the example writes them into the file); every service has a healthcheck so ``depends_on``
waits for readiness, not just a started container; the code server is ``dagster code-server start``
(the example's ``dagster api grpc`` cannot reload code); one user-code image serves code, runs, Dask and the
listener, so the Dask workers unpickle exactly the code the runs send them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from em_platform.deploy.services import (
    DAGSTER_IMAGE,
    EM_IMAGE,
    NETWORKS,
    SERVICES,
    STACK_NAME,
    Probe,
    Service,
)
from em_platform.deploy.templates import Addresses, place

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
NETWORK = (
    "em-platform"  # the data network: the run launcher puts run containers on it (named after the stack)...
)
DATA_VOLUME_NAME = f"{STACK_NAME}-data"  # ... and mounts these named volumes into them
COMPUTE_LOGS_VOLUME_NAME = f"{STACK_NAME}-compute-logs"
DASK_CERTS_VOLUME_NAME = f"{STACK_NAME}-dask-certs"

IMAGES = {
    EM_IMAGE: ("${EM_IMAGE:-em-platform:latest}", "docker/Dockerfile"),
    DAGSTER_IMAGE: ("${EM_DAGSTER_IMAGE:-em-platform-dagster:latest}", "docker/Dockerfile.dagster"),
}
HEADER = """\
# GENERATED from em_platform/deploy/services.py by `python -m em_platform.deploy compose`; do not edit.
# The production deployment: `cp docker/.env.example docker/.env`, set the secrets, then
#   docker compose -f docker/compose.yaml up -d --build        (UI on http://HOST:${EM_WEB_PORT:-3000})
# The same services run as processes on one machine with `make deploy-local` (README "Deploy").
"""


def compose_addresses() -> Addresses:
    """On the compose network each service answers under its own name at its container port."""
    names = [s.name for s in SERVICES]
    metrics = {s.metrics_at: s for s in SERVICES if s.metrics_port}  # a second port of the same container
    return Addresses(
        bind="0.0.0.0",
        hosts={n: n for n in names} | {at: s.name for at, s in metrics.items()},
        ports={s.name: s.port for s in SERVICES if s.port is not None}
        | {s.metrics_at: s.metrics_port for s in SERVICES if s.metrics_port},
        data="/data",
        web="https",
    )


def healthcheck(probe: Probe, port: int | None) -> dict[str, Any]:
    if probe.test:  # the image's own way (a server image without Python), whatever the runner checks
        test = list(probe.test)
    elif probe.kind == "command":
        test = list(probe.test)
    elif probe.kind == "tcp":
        test = ["CMD", "python", "-c", f"import socket; socket.create_connection(('localhost', {port}), 4)"]
    elif probe.kind == "http":
        url = f"http://localhost:{port}{probe.path}"
        test = ["CMD", "python", "-c", f"import urllib.request; urllib.request.urlopen('{url}', timeout=4)"]
    elif probe.kind == "grpc":
        test = ["CMD", "dagster", "api", "grpc-health-check", "-p", str(port)]
    elif probe.kind == "daemon":
        test = ["CMD", "dagster-daemon", "liveness-check"]
    else:
        raise ValueError(f"unknown probe kind {probe.kind!r}")
    return {
        "test": test,
        "interval": probe.interval,
        "timeout": probe.timeout,
        "retries": probe.retries,
        "start_period": probe.start_period,
    }


def compose_service(svc: Service, where: Addresses) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if svc.image in IMAGES:
        image, dockerfile = IMAGES[svc.image]
        out["build"] = {"context": "..", "dockerfile": dockerfile}
        out["image"] = image
    else:
        out["image"] = svc.image
    if svc.entrypoint:
        out["entrypoint"] = list(svc.entrypoint)
    if svc.command:
        out["command"] = [place(a, where, svc.name) for a in svc.command]
    env = {**svc.env, **svc.compose_only_env}
    if env:
        out["environment"] = {k: place(v, where, svc.name) for k, v in env.items()}
    if svc.working_dir:
        out["working_dir"] = svc.working_dir
    if svc.hostname:
        out["hostname"] = svc.hostname
    if svc.ports:
        out["ports"] = list(svc.ports)
    if svc.volumes:
        out["volumes"] = list(svc.volumes)
    if svc.replicas:
        out["deploy"] = {"mode": "replicated", "replicas": svc.replicas}  # podman-compose reads mode
    if svc.cpu_shares:
        out["cpu_shares"] = svc.cpu_shares
    if svc.depends_on:
        out["depends_on"] = {name: {"condition": cond} for name, cond in svc.depends_on.items()}
    if svc.probe and svc.probe.kind != "log":
        out["healthcheck"] = healthcheck(svc.probe, svc.port)
    out["restart"] = svc.restart
    out["networks"] = [_network_key(n) for n in svc.networks]
    return out


def _network_key(name: str) -> str:
    """The compose key of network ``name`` (services.NETWORKS); "data" keeps its first name, em-platform."""
    return NETWORK if name == "data" else name


def render_compose() -> dict[str, Any]:
    where = compose_addresses()
    named = {
        "em-data": DATA_VOLUME_NAME,
        "dagster-compute-logs": COMPUTE_LOGS_VOLUME_NAME,
        "dask-certs": DASK_CERTS_VOLUME_NAME,
    }
    volumes: dict[str, Any] = {}
    for svc in SERVICES:
        for vol in svc.volumes:
            source = vol.split(":", 1)[0]
            if not source.startswith(("/", ".", "$")):  # a named volume, not a host path
                volumes[source] = {"name": named[source]} if source in named else {}
    return {  # no top-level `name` (Compose v1 rejects it): COMPOSE_PROJECT_NAME in docker/.env names the project
        "services": {s.name: compose_service(s, where) for s in SERVICES},
        "networks": {_network_key(n): {"name": STACK_NAME + suffix} for n, suffix in NETWORKS.items()},
        "volumes": volumes,
    }


class _Dumper(yaml.SafeDumper):
    """Block style, except lists of plain values (commands, healthcheck tests) on one line each."""


def _list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(x, str | int | float) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _list)


def compose_yaml() -> str:
    body = yaml.dump(render_compose(), Dumper=_Dumper, sort_keys=False, width=200, default_flow_style=False)
    return HEADER + body


def compose_prometheus() -> str:
    """docker/prometheus/prometheus.yml: every service of the table with metrics, at its compose address."""
    from em_platform.deploy.monitoring import compose_prometheus_yaml

    return compose_prometheus_yaml(SERVICES, compose_addresses().addr)
