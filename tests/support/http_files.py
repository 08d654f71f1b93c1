"""A loopback HTTP file server with Range, HEAD, ETag/Last-Modified, JSON routes and injectable faults.

It serves a folder the way a public archive does, and lets a test (or the benchmark) make it misbehave:
fail the next requests of a path with a status, drop the connection after N body bytes, ignore Range,
or limit bandwidth. Every request is logged (method, path, Range header, status) so a test can assert
that a finished file was not fetched again.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse


def start_loopback(handler: type[BaseHTTPRequestHandler], owner: object) -> ThreadingHTTPServer:
    """``handler`` served on 127.0.0.1 at a free port, its ``server_owner`` being ``owner``, in a thread."""

    class Handler(handler):
        server_owner = owner

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    # a short poll so shutdown() returns at once (the default 0.5 s adds up over the tests)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd


def stop_loopback(httpd: ThreadingHTTPServer | None) -> None:
    if httpd:
        httpd.shutdown()
        httpd.server_close()


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    status: int


@dataclass
class _Faults:
    statuses: list[int | None] = field(default_factory=list)  # answer the next requests so (None: normally)
    drop_after: list[int | None] = field(default_factory=list)  # close the next GETs after so many bytes
    ignore_range: bool = False


class HttpFileServer:
    """``with HttpFileServer(root) as srv: srv.url_for("a.tif")``."""

    def __init__(
        self, root: Path, *, bytes_per_s: float | None = None, total_bytes_per_s: float | None = None
    ):
        self.root = Path(root)
        self.bytes_per_s = bytes_per_s  # a link limited per connection, as archives limit each transfer
        self.total_bytes_per_s = total_bytes_per_s  # a link limited in total: all connections share it
        self._link_free_at = 0.0  # when the shared link can send the next byte (monotonic clock)
        self._holds: dict[str, tuple[int, threading.Event]] = {}
        self.log: list[Logged] = []
        self._faults: dict[str, _Faults] = {}
        self._json: dict[str, Any] = {}
        self._html: dict[str, str] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> HttpFileServer:
        self._httpd = start_loopback(_Handler, self)
        return self

    def __exit__(self, *exc) -> None:
        stop_loopback(self._httpd)

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url_for(self, path: str) -> str:
        return f"{self.url}/{quote(path.lstrip('/'))}"

    # -- what a test controls ----------------------------------------------------------------------

    def _f(self, path: str) -> _Faults:
        return self._faults.setdefault("/" + path.lstrip("/"), _Faults())

    def fail_next(self, path: str, n: int, status: int = 503, *, skip: int = 0) -> None:
        """Answer ``n`` requests of ``path`` with ``status``, after letting ``skip`` through."""
        with self._lock:
            self._f(path).statuses.extend([None] * skip + [status] * n)

    def drop_next(self, path: str, after_bytes: int, n: int = 1, *, skip: int = 0) -> None:
        """Cut ``n`` GETs of ``path`` after ``after_bytes`` body bytes, after letting ``skip`` GETs through."""
        with self._lock:
            self._f(path).drop_after.extend([None] * skip + [after_bytes] * n)

    def ignore_range(self, path: str, on: bool = True) -> None:
        with self._lock:
            self._f(path).ignore_range = on

    def hold_from(self, path: str, offset: int) -> threading.Event:
        """GETs of ``path`` stop before byte ``offset`` of the file until the returned event is set."""
        event = threading.Event()
        with self._lock:
            self._holds[path] = (offset, event)
        return event

    def _shared_link(self, n: int) -> float:
        """Seconds to wait before sending ``n`` more bytes over the link all connections share."""
        with self._lock:
            now = time.monotonic()
            self._link_free_at = max(self._link_free_at, now) + n / self.total_bytes_per_s
            return self._link_free_at - n / self.total_bytes_per_s - now

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def add_json(self, path: str, doc: Any | Callable[[], Any]) -> None:
        """Answer GET ``path`` with JSON (a callable is called per request)."""
        self._json["/" + path.lstrip("/")] = doc

    def add_html(self, path: str, html: str) -> None:
        self._html["/" + path.lstrip("/")] = html

    def requests_for(self, path: str, method: str = "GET") -> list[Logged]:
        p = "/" + path.lstrip("/")
        with self._lock:
            return [r for r in self.log if r.path == p and r.method == method]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_owner: HttpFileServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _record(self, status: int) -> None:
        owner = self.server_owner
        with owner._lock:
            owner.log.append(
                Logged(self.command, unquote(urlparse(self.path).path), self.headers.get("Range"), status)
            )

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _send_simple(self, status: int, payload: bytes, ctype: str = "text/plain") -> None:
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _serve(self, body: bool) -> None:
        owner = self.server_owner
        path = unquote(urlparse(self.path).path)
        with owner._lock:
            faults = owner._faults.get(path)
            status = faults.statuses.pop(0) if faults and faults.statuses else None
            drop = faults.drop_after.pop(0) if (faults and faults.drop_after and body) else None
            ignore_range = bool(faults and faults.ignore_range)
            hold = owner._holds.get(path) if body else None
        if status is not None:
            self._send_simple(status, f"injected {status}\n".encode())
            return
        if path in owner._json:
            doc = owner._json[path]
            self._send_simple(200, json.dumps(doc() if callable(doc) else doc).encode(), "application/json")
            return
        if path in owner._html:
            self._send_simple(200, owner._html[path].encode(), "text/html")
            return
        file = (owner.root / path.lstrip("/")).resolve()
        if not file.is_relative_to(owner.root.resolve()) or not file.is_file():
            self._send_simple(404, b"not found\n")
            return
        st = file.stat()
        size = st.st_size
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng and not ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m.group(1)) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self._record(416)
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            status = 206
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"' + hashlib.md5(f"{size}-{st.st_mtime_ns}".encode()).hexdigest() + '"')
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if drop is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if not body:
            return
        remaining = end - start + 1
        sent = 0
        t0 = time.monotonic()
        with open(file, "rb") as f:
            f.seek(start)
            while remaining > 0:
                n = min(256 * 1024, remaining)
                if drop is not None:
                    n = min(n, drop - sent)
                    if n <= 0:
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                if hold is not None and start + sent + n > hold[0] and not hold[1].is_set():
                    n = hold[0] - (start + sent)
                    if n <= 0:
                        self.wfile.flush()
                        hold[1].wait(60)  # the test releases the rest of the file
                        continue
                if owner.total_bytes_per_s:
                    wait = owner._shared_link(n)
                    if wait > 0:
                        time.sleep(wait)  # bandwidth of the simulated link, not synchronisation
                chunk = f.read(n)
                self.wfile.write(chunk)
                sent += len(chunk)
                remaining -= len(chunk)
                if owner.bytes_per_s:
                    ahead = sent / owner.bytes_per_s - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)  # bandwidth limit of the simulated link, not synchronisation


def apache_index(names_sizes: list[tuple[str, int]]) -> str:
    """An Apache-style directory listing page (what https://ftp.ebi.ac.uk serves for a folder)."""
    rows = "\n".join(
        f'<tr><td><a href="{quote(n)}">{n}</a></td><td align="right">2024-01-01 00:00  </td>'
        f'<td align="right">{s}</td></tr>'
        for n, s in names_sizes
    )
    return (
        "<!DOCTYPE HTML><html><head><title>Index of /</title></head><body><h1>Index of /</h1><table>"
        '<tr><th><a href="?C=N;O=D">Name</a></th><th>Last modified</th><th>Size</th></tr>'
        '<tr><td><a href="../">Parent Directory</a></td></tr>\n' + rows + "</table></body></html>"
    )


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
