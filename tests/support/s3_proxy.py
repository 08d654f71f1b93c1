"""A loopback HTTP proxy in front of an S3 endpoint (moto): it logs every request that reaches the wire and
can answer chosen keys with an S3 error (403 AccessDenied, 404 NoSuchKey) instead of forwarding them.

Counting here, outside the client, sees what the client really sends (a HEAD before a GET would show),
whatever library made the request.
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

S3_ERRORS = {403: ("AccessDenied", "Access Denied"), 404: ("NoSuchKey", "The specified key does not exist.")}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # /bucket/key, unquoted, without the query
    status: int


class S3Proxy:
    def __init__(self, upstream: str):
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port)
        self.log: list[Request] = []
        self.faults: list[tuple[re.Pattern[str], int]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                path = unquote(urlparse(self.path).path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = proxy._fault(path)
                if status:
                    proxy._record(self.command, path, status)
                    code, message = S3_ERRORS[status]
                    xml = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>{message}</Message><Key>{path}</Key></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                proxy._record(self.command, path, resp.status)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header(
                    "Content-Length",
                    str(len(data)) if self.command != "HEAD" else resp.getheader("Content-Length", "0"),
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append(Request(method, path, status))

    def _fault(self, path: str) -> int | None:
        with self._lock:
            return next((status for pattern, status in self.faults if pattern.search(path)), None)

    def fail(self, pattern: str, status: int) -> None:
        """Answer every request whose /bucket/key path matches ``pattern`` with ``status`` (403 or 404)."""
        with self._lock:
            self.faults.append((re.compile(pattern), status))

    def requests(self, under: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.log if r.path.startswith(under)]

    def clear(self) -> None:
        with self._lock:
            self.log.clear()
            self.faults.clear()

    def __enter__(self) -> S3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
