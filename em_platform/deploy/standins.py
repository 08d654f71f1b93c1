"""Stand-ins for the official server images compose names, for a host that cannot pull them.

``docker/compose.yaml`` names the official images (``postgres:16``, ``rabbitmq:3.13``, MinIO, busybox); a
facility's Docker host pulls them. Where no registry is reachable (this project's machines), ``make images``
builds an image of the same server from Debian's packages (or the S3 server ``make deploy-local`` runs)
with the same environment contract, and ``make compose-up`` layers ``docker/compose.standin.yaml`` over the
compose file: it changes the image of those services and, where the stand-in cannot run the official
image's own probe or command (MinIO's ``mc``), their healthcheck or command, nothing else. The production
file stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
STANDIN_FILE = REPO / "docker" / "compose.standin.yaml"
# the Debian base made here from Debian's packages (em_platform.deploy.images), which the stand-ins build on
DEBIAN_SUITE = "bookworm"
DEBIAN_BASE = f"localhost/em-platform-debian:{DEBIAN_SUITE}"


class Override(list):
    """A list that replaces the compose file's, not one appended to it (compose's ``!override`` tag; podman-compose
    appends a healthcheck's ``test`` to the one it overrides otherwise)."""


@dataclass(frozen=True)
class StandIn:
    service: str
    official: str  # the image docker/compose.yaml names
    image: str  # what runs instead
    build: str = ""  # its Dockerfile (empty: an image built anyway)
    contract: str = ""  # what it keeps of the official image
    override: dict[str, Any] = field(default_factory=dict)  # other compose keys it needs


# Any HTTP answer from the S3 port: the server is up (MinIO's probe is its own `mc ready local`).
_S3_PROBE = (
    "require('http').get('http://localhost:9000/', () => process.exit(0)).on('error', () => process.exit(1))"
)
# minio-init's users, for the stand-in to know (it has no admin API): key:secret:rw|ro each
_S3_USERS = " ".join(
    f"${{EM_S3_{u}_ACCESS_KEY}}:${{EM_S3_{u}_SECRET_KEY}}:{mode}"
    for u, mode in (("RUNS", "rw"), ("VIEWER", "ro"))
)
# `mc mb --ignore-existing em/$EM_S3_BUCKET` through the S3 API, from the user-code image (s3fs).
_MAKE_BUCKET = (
    "import os, s3fs; "
    "fs = s3fs.S3FileSystem(key=os.environ['MINIO_ROOT_USER'], secret=os.environ['MINIO_ROOT_PASSWORD'], "
    "client_kwargs={'endpoint_url': 'http://minio:9000'}); "
    "bucket = os.environ['EM_S3_BUCKET']; "
    "fs.exists(bucket) or fs.mkdir(bucket); "
    "print('Bucket created successfully `em/' + bucket + '`.')"
)

STANDINS: tuple[StandIn, ...] = (
    StandIn(
        "secrets-check",
        "busybox:1.36",
        DEBIAN_BASE,
        contract="a POSIX sh for the secrets check",
    ),
    StandIn(
        "postgresql",
        "postgres:16",
        "localhost/em-standin-postgres:15",
        "docker/standin/postgres/Dockerfile",
        "PostgreSQL 15 (Debian): POSTGRES_USER/PASSWORD/DB, /docker-entrypoint-initdb.d, pg_isready",
    ),
    StandIn(
        "rabbitmq",
        "rabbitmq:3.13",
        "localhost/em-standin-rabbitmq:3.10",
        "docker/standin/rabbitmq/Dockerfile",
        "RabbitMQ 3.10 (Debian): RABBITMQ_DEFAULT_USER/PASS, /etc/rabbitmq/enabled_plugins, rabbitmq-diagnostics",
    ),
    StandIn(
        "minio",
        "minio/minio:latest",
        "localhost/em-standin-s3:3.7.1",
        "docker/standin/s3/Dockerfile",
        "s3rver 3.7.1: `server DIR --address :PORT`, MINIO_ROOT_USER/PASSWORD and the store's users "
        "(EM_S3_USERS: the viewer's key read only); it checks access key ids, not V4 signatures",
        {
            "healthcheck": {"test": Override(["CMD", "node", "-e", _S3_PROBE])},
            "environment": {"EM_S3_USERS": _S3_USERS},
        },
    ),
    StandIn(
        "proxy",
        "caddy:2",
        "localhost/em-standin-caddy:2.6",
        "docker/standin/caddy/Dockerfile",
        "Caddy 2.6 (Debian): `caddy run --config`, its CA and certificates in /data, wget for the healthcheck",
    ),
    StandIn(
        "prometheus",
        "prom/prometheus:v2.53.0",
        "localhost/em-standin-prometheus:2.42",
        "docker/standin/prometheus/Dockerfile",
        "Prometheus 2.42 (Debian): `prometheus` on PATH, its data in /prometheus, wget for the healthcheck",
    ),
    StandIn(
        "alertmanager",
        "prom/alertmanager:v0.27.0",
        "localhost/em-standin-alertmanager:0.25",
        "docker/standin/alertmanager/Dockerfile",
        "Alertmanager 0.25 (Debian): `alertmanager` on PATH, its data in /alertmanager, wget for the healthcheck",
    ),
    StandIn(
        "minio-init",
        "minio/mc:latest",
        "${EM_IMAGE:-em-platform:latest}",
        contract="creates the bucket, as `mc mb --ignore-existing` does",
        override={"entrypoint": ["python", "-c"], "command": [_MAKE_BUCKET]},
    ),
)

HEADER = """\
# GENERATED from em_platform/deploy/standins.py by `python -m em_platform.deploy compose`; do not edit.
# Only for a host that cannot pull the official images: `make compose-up` layers this over compose.yaml
# (`-f compose.yaml -f compose.standin.yaml`); the images are built by `make images` from Debian's packages.
"""


def render_standins() -> dict[str, Any]:
    services = {}
    for s in STANDINS:
        entry: dict[str, Any] = {"image": s.image}
        entry.update(s.override)
        services[s.service] = entry
    return {"services": services}


def standin_yaml() -> str:
    from em_platform.deploy.compose import _Dumper

    class Dumper(_Dumper):
        pass

    Dumper.add_representer(
        Override, lambda d, data: d.represent_sequence("!override", list(data), flow_style=True)
    )
    return HEADER + yaml.dump(render_standins(), Dumper=Dumper, sort_keys=False, width=200)


def load_standins(text: str) -> dict[str, Any]:
    """The stand-in file as compose reads it (``!override`` lists are plain lists here)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node))
    return yaml.load(text, Loader=Loader)
