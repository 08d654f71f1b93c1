"""Filling in the service table's templates for one topology (see :mod:`em_platform.deploy.services`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_PLACE = re.compile(r"\{(bind|port|data|web|etc|var)\}|\{(addr|host|port):([a-z0-9-]+)\}")
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


class MissingSetting(KeyError):
    """A ``${VAR:?message}`` setting is not set; the message says what to set."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Addresses:
    """Where each service answers in one topology, and where the shared data folder is."""

    bind: str
    hosts: Mapping[str, str]
    ports: Mapping[str, int]
    data: str
    web: str = "http"  # how browsers reach the UI and the viewer: "https" behind compose's proxy
    # the monitoring's configuration files (docker/prometheus as compose mounts it; the runner writes its own)
    etc: str = "/etc/em"
    # a service's own state: in compose its volume at /<service> (""; the Prometheus images' own folders);
    # as processes <var>/<service>
    var: str = ""

    def addr(self, name: str) -> str:
        return f"{self.hosts[name]}:{self.ports[name]}"


def place(template: str, where: Addresses, own: str) -> str:
    """Replace the topology placeholders ({bind}, {port}, {addr:NAME}, ...); ``${...}`` is left alone."""

    def sub(m: re.Match) -> str:
        own_key, kind, name = m.groups()
        if own_key == "bind":
            return where.bind
        if own_key == "port":
            return str(where.ports[own])
        if own_key == "data":
            return where.data
        if own_key == "web":
            return where.web
        if own_key == "etc":
            return where.etc
        if own_key == "var":
            return f"{where.var}/{own}"
        if kind == "addr":
            return where.addr(name)
        return where.hosts[name] if kind == "host" else str(where.ports[name])

    return _PLACE.sub(sub, template)


def interpolate(text: str, settings: Mapping[str, str]) -> str:
    """Compose's variable interpolation (``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?m}``, ``${V?m}``, ``$$``)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.groups()
        value = settings.get(name)
        if op is None:
            return value or ""
        empty_counts = op.startswith(":")
        if value is None or (empty_counts and value == ""):  # missing: the default, or the error
            if op.endswith("-"):
                return arg
            raise MissingSetting(f"{name}: {arg or 'must be set'}")
        return value

    return _VAR.sub(sub, text)


def variables(text: str) -> set[str]:
    """The operator settings a template refers to."""
    return {m.group(1) for m in _VAR.finditer(text) if m.group(1)}
