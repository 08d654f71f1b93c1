"""``em-platform door``: the login and the guard's rules for the TLS proxy (Caddy's ``forward_auth``).

The proxy sends each request's headers here before it forwards the request (``GET /check/ui`` for the web
UI, ``/check/viewer`` for the viewer, with ``X-Forwarded-Method``, ``-Uri`` and ``-For``); the answer
decides: 2xx lets the request through, anything else is sent to the browser as it is. So a request reaches
the webserver or the viewer only when

- its client has not failed :attr:`FailedLogins.limit` logins within the window (429 otherwise, without a
  password check),
- it carries a user's login (401 and a login prompt otherwise; a wrong one counts as a failure), and
- the guard's rules hold (:mod:`em_platform.web_guard.rules`: no cross-site control, no GraphQL by GET, the
  site's host names only).

The proxy then strips the ``Authorization`` header: the users' passwords reach this service only. It must be
reachable from the proxy alone (its network in docker/compose.yaml), since it takes the client's address
from ``X-Forwarded-For``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import sys
import urllib.parse
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

from em_platform.web_guard.login import FailedLogins, Users
from em_platform.web_guard.rules import Policy, Request

REALM = "em_platform"
log = logging.getLogger("em_platform.door")


class DoorServer(ThreadingHTTPServer):
    """``sites``: the policy of each site the proxy asks about (``/check/<site>``)."""

    daemon_threads = True

    def __init__(
        self,
        users: Users,
        sites: Mapping[str, Policy],
        host: str = "127.0.0.1",
        port: int = 0,
        failed: FailedLogins | None = None,
    ):
        self.users = users
        self.sites = dict(sites)
        self.failed = failed or FailedLogins()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = cast(tuple[str, int], self.server_address[:2])  # an AF_INET server's
        return f"http://{host}:{port}"


def credentials(header: str | None) -> tuple[str, str] | None:
    """(name, password) of a ``Basic`` ``Authorization`` header; None when there is none or it is malformed."""
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        name, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (name, password) if sep and name else None


class _Handler(BaseHTTPRequestHandler):
    server: DoorServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        # Caddy's rewrite to the check's path keeps the request's own query: the site is the path alone
        site = urllib.parse.urlsplit(self.path).path.removeprefix("/check/")
        policy = self.server.sites.get(site)
        if policy is None:
            return self._answer(HTTPStatus.NOT_FOUND, f"no site {site!r}")
        client = self._client()
        wait = self.server.failed.retry_after(client)
        if wait > 0:
            log.warning("%s: too many failed logins, refused for %.0f s more", client, wait)
            return self._answer(
                HTTPStatus.TOO_MANY_REQUESTS,
                "too many failed logins from this address: try again later",
                {"Retry-After": str(math.ceil(wait))},
            )
        given = credentials(self.headers.get("Authorization"))
        if given is None:
            return self._answer(HTTPStatus.UNAUTHORIZED, "", {"WWW-Authenticate": f'Basic realm="{REALM}"'})
        if not self.server.users.check(*given):
            self.server.failed.failed(client)
            log.warning("%s: failed login as %r", client, given[0][:64])
            return self._answer(HTTPStatus.UNAUTHORIZED, "", {"WWW-Authenticate": f'Basic realm="{REALM}"'})
        uri = urllib.parse.urlsplit(self.headers.get("X-Forwarded-Uri") or "/")
        request = Request(
            method=(self.headers.get("X-Forwarded-Method") or "GET").upper(),
            path=urllib.parse.unquote(uri.path),
            query=uri.query,
            headers=tuple(self.headers.items()),
        )
        refusal = policy.judge(request)
        if refusal is not None:
            log.warning(
                "%s (%s): refused %s %s: %s", client, given[0], request.method, uri.path, refusal.reason
            )
            return self._answer(HTTPStatus(refusal.status), refusal.reason)
        self._answer(HTTPStatus.OK, "")

    def _client(self) -> str:
        """The browser's address: the last ``X-Forwarded-For`` entry, the one the proxy itself added."""
        forwarded = [a.strip() for a in ",".join(self.headers.get_all("X-Forwarded-For") or []).split(",")]
        return forwarded[-1] if forwarded and forwarded[-1] else self.client_address[0]

    def _answer(self, status: HTTPStatus, text: str, headers: Mapping[str, str] | None = None) -> None:
        body = (text + "\n").encode() if text else b""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        pass  # refusals are logged with their reason above; a passed check is routine


def serve(users_file: Path, sites: Mapping[str, Policy], host: str, port: int, out=sys.stdout) -> int:
    """Serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = DoorServer(Users(users_file), sites, host, port)
    print(f"em-platform door: login and guard for {', '.join(sites)} on {server.url}", file=out, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
