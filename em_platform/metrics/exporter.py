"""A service's metrics at ``http://HOST:PORT/metrics``: the address comes from a setting of the service's own
(``EM_LIVE_QC_METRICS``, ``EM_LISTENER_METRICS``), unset means not served. The process topology binds them to
loopback; containers bind inside their network, where only Prometheus reaches them."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import start_http_server


class MetricsConfigError(ValueError):
    """A metrics address that cannot be served."""


@dataclass(frozen=True)
class MetricsAddress:
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @classmethod
    def parse(cls, text: str, setting: str) -> MetricsAddress:
        """``HOST:PORT`` or ``PORT`` (loopback); an error naming ``setting`` and the form it takes."""
        host, sep, port = text.strip().rpartition(":")
        host = host.strip("[]") if sep else "127.0.0.1"
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise MetricsConfigError(
                f"{setting}={text!r}: give the metrics address as HOST:PORT (e.g. 127.0.0.1:9470) or a port"
            )
        if host not in ("localhost", "0.0.0.0", "::"):
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise MetricsConfigError(
                    f"{setting}={text!r}: {host!r} is not an IP address to bind"
                ) from None
        return cls(host, int(port))


def serve_from(env: Mapping[str, str], setting: str) -> MetricsAddress | None:
    """Serve this process's metrics at the address ``env[setting]`` names; None (and nothing served) when
    it is unset. A port that is taken is an error naming the setting."""
    text = env.get(setting, "").strip()
    if not text:
        return None
    address = MetricsAddress.parse(text, setting)
    try:
        start_http_server(address.port, addr=address.host)
    except OSError as exc:
        raise MetricsConfigError(
            f"{setting}={text!r}: cannot serve metrics there ({exc.strerror or exc}); choose a free port"
        ) from exc
    return address
