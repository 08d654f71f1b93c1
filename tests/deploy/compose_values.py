"""A value of docker/compose.yaml as it must be in a process topology: compose's interpolation of the
operator's settings, then service addresses and ports, loopback for the bind address, the /data volume and
the monitoring's configuration and state folders."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from em_platform.deploy.services import SERVICES
from em_platform.deploy.templates import Addresses, interpolate


def compose_to_process(where: Addresses, settings: Mapping[str, str]) -> Callable[..., str]:
    names = {s.name for s in SERVICES}
    ports = {str(s.port): str(where.ports[s.name]) for s in SERVICES if s.port is not None}
    ports |= {str(s.metrics_port): str(where.ports[s.metrics_at]) for s in SERVICES if s.metrics_port}

    def convert(value: str, command: bool = False) -> str:
        value = interpolate(str(value), settings)
        for svc in SERVICES:
            if svc.port is not None:
                value = value.replace(f"{svc.name}:{svc.port}", where.addr(svc.name))
                # a published port as browsers reach it on the host (EM_VIEWER_URL): the process's port
                value = value.replace(f"127.0.0.1:{svc.port}", f"127.0.0.1:{where.ports[svc.name]}")
        if value in names and not command:  # a host name (`em-platform live-qc` is a command)
            return where.hosts[value]
        if value in ports:
            return ports[value]
        # a service's own listening address: 0.0.0.0:PORT in its container, loopback and its port here
        value = re.sub(r"(^|=)0\.0\.0\.0:(\d+)$", lambda m: f"{m[1]}127.0.0.1:{ports.get(m[2], m[2])}", value)
        value = re.sub(r"^0\.0\.0\.0$", "127.0.0.1", value)
        value = re.sub(r"^https://127\.0\.0\.1:", "http://127.0.0.1:", value)  # compose's is the proxy's TLS
        value = re.sub(r"(?<==)/etc/em(?=/|$)", where.etc, value)  # compose mounts docker/prometheus there
        value = re.sub(
            r"(?<=storage\.tsdb\.path=)/|(?<=storage\.path=)/", where.var + "/", value
        )  # its volume
        return re.sub(r"^/data(?=/|$)", where.data, value)

    return convert
