"""What a request to the web UI or the viewer must be before it is answered: the rules against cross-site
control (CSRF), DNS rebinding and framing, as plain functions of a request's method, path, query and headers.

A browser attaches a site's login (HTTP basic authentication) and reaches a loopback server from *any* page
it shows, so "the operator is logged in" or "it listens on 127.0.0.1" says nothing about who wrote a request.
What a page of another origin cannot make a browser send is the rule:

- a ``Host`` the server answers to (loopback, the names it is configured with): a page elsewhere can only
  reach it under a name of its own (DNS rebinding), which is refused (421);
- for anything that changes state (a method other than GET/HEAD/OPTIONS, every GraphQL request, a
  WebSocket) ``Origin`` and ``Sec-Fetch-Site`` must say "this origin" when a browser sends them (a
  non-browser client sends neither, and needs no protection from a browser);
- a body of ``Content-Type: application/json`` exactly (a form or ``text/plain``, which a page may send
  cross-site without asking, is refused, however its parameters read: ``text/plain;
  charset=application/json`` is text);
- GraphQL only by POST: a query in a URL (``GET /graphql?query=mutation…``, or a form POST carrying one) is
  refused, so no link, image or form can run a mutation.

Every answer carries :data:`SECURITY_HEADERS`: no page of another origin may frame it (clickjacking), and
no answer is sniffed into another type. Standard library only: the viewer, the door and the webserver
share these rules.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

# The names a browser on this machine uses for it; always answered (DNS rebinding needs a name the attacker
# controls, and no web page elsewhere can make a browser send these).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Fetch metadata a browser sends with every request: only these say the request comes from this origin
# (or from the user typing the address, "none")
SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})
JSON = "application/json"

# On every answer: no framing by any other page, no content sniffing. Strict-Transport-Security belongs to
# the TLS door (docker/proxy/Caddyfile): over plain HTTP a browser ignores it.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
)

_HOST = re.compile(r"(?P<name>[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# ``application/json``, optionally with the one parameter a JSON body may carry
_JSON_TYPE = re.compile(r"application/json\s*(?:;\s*charset\s*=\s*\"?utf-8\"?\s*)?", re.IGNORECASE)
# parameters that carry a GraphQL document or operation in a URL
_GRAPHQL_URL_PARAMETERS = frozenset({"query", "operationName", "variables", "extensions", "id"})


def host_name(value: str | None) -> str | None:
    """The host name of a ``Host`` header or an allow-list entry: lower case, without port, brackets or a
    trailing dot (``[::1]:3030`` → ``::1``); None when ``value`` is no host name."""
    match = _HOST.fullmatch(value.strip()) if value else None
    if match is None:
        return None
    return match["name"].lower().strip("[]").rstrip(".") or None


def _host_port(value: str) -> tuple[str, int | None] | None:
    match = _HOST.fullmatch(value.strip())
    if match is None:
        return None
    name = match["name"].lower().strip("[]").rstrip(".")
    return (name, int(match["port"]) if match["port"] else None) if name else None


@dataclass(frozen=True)
class Refusal:
    """Why a request is not answered: the HTTP status and a reason the client may read (no server detail)."""

    status: int
    reason: str


@dataclass(frozen=True)
class Request:
    """The parts of a request the rules read. ``headers``: (name, value) pairs as received, names in any
    case, repeated names kept (a second ``Host`` or ``Content-Type`` is itself refused)."""

    method: str
    path: str
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    websocket: bool = False

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def value(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None


@dataclass(frozen=True)
class Policy:
    """The rules of one server. ``allowed_hosts``: host names it answers to (loopback is always added);
    ``json_bodies``: every state-changing request must carry a JSON body (the Dagster webserver's REST and
    GraphQL endpoints; the viewer's client posts text it ignores, so not there)."""

    allowed_hosts: frozenset[str]
    json_bodies: bool = True

    @classmethod
    def for_hosts(cls, names: Iterable[str], *, json_bodies: bool = True) -> Policy:
        checked = [host_name(n) for n in names]
        if None in checked:
            raise ValueError(f"allowed hosts {list(names)!r}: each must be a host name or address")
        return cls(frozenset(filter(None, [*LOOPBACK_HOSTS, *checked])), json_bodies)

    def judge(self, request: Request) -> Refusal | None:
        """None when ``request`` may be answered; otherwise the :class:`Refusal`."""
        hosts = request.values("host")
        if len(hosts) != 1 or _host_port(hosts[0]) is None:
            return Refusal(400, "a request needs exactly one Host header")
        if host_name(hosts[0]) not in self.allowed_hosts:
            return Refusal(421, "this server does not answer to that host name")
        graphql = is_graphql(request.path)
        changes_state = request.websocket or request.method not in SAFE_METHODS
        if changes_state or graphql:
            if refusal := cross_site(request, hosts[0]):
                return refusal
        if graphql and not request.websocket:
            if refusal := _graphql(request):
                return refusal
        elif changes_state and not request.websocket and self.json_bodies:
            if not is_json(request.values("content-type")):
                return Refusal(415, f"a request that changes anything must send {JSON}")
        return None


def is_graphql(path: str) -> bool:
    """Dagster's GraphQL endpoint, however the path is spelled (slashes doubled or trailing)."""
    return [p for p in path.split("/") if p][-1:] == ["graphql"]


def is_json(content_types: list[str]) -> bool:
    """One ``Content-Type`` header, and it says JSON (``application/json``, at most ``charset=utf-8``)."""
    return len(content_types) == 1 and _JSON_TYPE.fullmatch(content_types[0].strip()) is not None


def cross_site(request: Request, host: str) -> Refusal | None:
    """A browser's request from another origin (its ``Sec-Fetch-Site`` or ``Origin`` say so); None for a
    request from this origin or from a client that is no browser (neither header)."""
    fetch_sites = request.values("sec-fetch-site")
    if any(site.strip().lower() not in SAME_ORIGIN_FETCH for site in fetch_sites):
        return Refusal(403, "a request from another site may not change anything here")
    origins = request.values("origin")
    if origins and not all(same_origin(o, host) for o in origins):
        return Refusal(403, "a request from another origin may not change anything here")
    return None


def same_origin(origin: str, host: str) -> bool:
    """``Origin`` (``scheme://host[:port]``) names the server that ``Host`` names. ``null`` (a sandboxed or
    file page, a redirect across origins) is never this origin."""
    parts = urllib.parse.urlsplit(origin.strip())
    if parts.scheme not in _DEFAULT_PORTS or not parts.netloc or parts.path or parts.query:
        return False
    ours, theirs = _host_port(host), _host_port(parts.netloc)
    if ours is None or theirs is None:
        return False
    default = _DEFAULT_PORTS[parts.scheme]
    return ours[0] == theirs[0] and (ours[1] or default) == (theirs[1] or default)


def _graphql(request: Request) -> Refusal | None:
    in_url = _GRAPHQL_URL_PARAMETERS & set(urllib.parse.parse_qs(request.query, keep_blank_values=True))
    if request.method in ("GET", "HEAD"):
        if in_url:
            return Refusal(405, f"GraphQL is not served by {request.method}: POST it as {JSON}")
        return None  # the GraphQL explorer's page
    if request.method != "POST":
        return Refusal(405, "GraphQL takes POST with a JSON body")
    if in_url:
        return Refusal(400, f"a GraphQL document goes in the {JSON} body, not in the URL")
    if not is_json(request.values("content-type")):
        return Refusal(415, f"GraphQL takes a JSON body (Content-Type: {JSON})")
    return None
