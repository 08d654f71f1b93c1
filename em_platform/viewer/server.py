"""`em-platform viewer`: Neuroglancer and the data root's images from one HTTP server.

Neuroglancer is the viewer connectomics users already use; its Python package ships the built web client.
This server hands out that client at ``/v/em/`` and the OME-Zarr images under the data root at
``/data/<key>`` (local folder or object storage, through fsspec), so a link the platform writes opens any
montage, dataset or tomogram at full resolution, chunk by chunk, with nothing to install in the browser.

The package's client is built to talk to a Python kernel (``neuroglancer.Viewer``): it loads under
``/v/<token>/`` and keeps an event stream (``/events/<token>``) open for state pushed from Python. A link
carries its whole view in the URL (``#!{...}``), which that client honours, so nothing is kept here: the
event stream stays open and quiet (a comment now and then), and the client's own state reports
(``/state``, ``/action``) are acknowledged and dropped. Links therefore survive restarts of this server.

It serves images and nothing else, to the browsers it is meant for, without being worn out:

- a ``/data`` key must be a file of a published OME-Zarr image, judged on the key as asked and again on the
  path it resolves to (:mod:`em_platform.viewer.images`): never the catalog database, the inbox, the
  downloads, a ``.staging`` image or a file merely named ``*.zarr``. Refusals (403) name the rule, never a
  server path; the log line has the rest;
- it answers only to the host names in its allow-list (loopback, EM_VIEWER_URL's host, EM_VIEWER_HOSTS;
  421 for any other ``Host``), so a web page elsewhere cannot reach it through DNS rebinding; no CORS
  header, so such a page cannot read the images through a user's browser either; nothing posted from
  another origin, and no page of another origin may frame it (the guard's rules,
  :mod:`em_platform.web_guard.rules`);
- read only: GET and HEAD, with single ``Range`` requests (206/416); a file is sent from disk by the
  kernel or from object storage in bounded blocks, and HEAD is answered from its size. The client's
  state reports are bounded (400 without a length, 413 past :data:`_MAX_REPORT_BYTES`, unread);
- bounded: :data:`MAX_CONNECTIONS` threads (more connections wait in the kernel's queue),
  :data:`MAX_EVENT_STREAMS` open tabs (503 beyond), and an idle socket is closed after
  :data:`IDLE_SECONDS`; loopback unless configured.
"""

from __future__ import annotations

import importlib.util
import posixpath
import re
import sys
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

from em_platform.edge import Refused
from em_platform.storage.store import DataStore
from em_platform.viewer.headers import Unsatisfiable, byte_range, content_length
from em_platform.viewer.images import Body, ImageFiles, open_local, requested_key
from em_platform.web_guard.rules import SECURITY_HEADERS, Policy, Request

DATA_PREFIX = "/data/"
CLIENT_PREFIX = "/v/em/"  # the Python-integration client finds its "token" here (one, fixed: no state)
_EVENTS = re.compile(r"/events/em")
_ACKNOWLEDGED = re.compile(r"/(?:state|action|credentials)/em")
_MAX_REPORT_BYTES = 1 << 20  # a client state report is a few kB of JSON
HEARTBEAT_SECONDS = 25.0
# A browser opens up to 6 connections to a host; 64 threads serve about ten users loading images at once.
# Each thread holds a socket and at most one block of a file (BLOCK_BYTES), so 64 bound the memory too.
MAX_CONNECTIONS = 64
# Every open Neuroglancer tab holds one event stream (and its thread) for as long as it is open; a quarter
# of the threads, so tabs left open can never take all of them from the images.
MAX_EVENT_STREAMS = 16
# A socket with nothing to read or unable to take a write for this long is closed: an idle keep-alive
# connection or a stalled client gives its thread back. (A browser reconnects without the user noticing.)
IDLE_SECONDS = 20.0
# the client's own files: index.html and its hashed bundles (the names Neuroglancer's package allows)
_CLIENT_FILE = re.compile(r"[a-z0-9][a-zA-Z0-9_\-.]*\.(?:js|map|css|wasm|html)")
_MIME = {
    ".css": "text/css",
    ".js": "application/javascript",
    ".html": "text/html; charset=utf-8",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".json": "application/json",
}


class ViewerUnavailable(RuntimeError):
    """The neuroglancer package (its built client) is not installed."""


def client_folder() -> Path:
    """The built Neuroglancer client inside the installed ``neuroglancer`` package (not imported: its
    ``__init__`` pulls in tornado and Google's auth libraries, which this server does not need)."""
    spec = importlib.util.find_spec("neuroglancer")
    if spec is None or spec.origin is None:
        raise ViewerUnavailable("the 'neuroglancer' package is not installed: pip install neuroglancer")
    folder = Path(spec.origin).parent / "static" / "client"
    if not (folder / "index.html").is_file():
        raise ViewerUnavailable(f"{folder} holds no built Neuroglancer client (index.html)")
    return folder


class ViewerServer(ThreadingHTTPServer):
    """The HTTP server; :meth:`start` serves in a thread (tests, ``make dev``), :func:`serve` in the
    foreground.

    ``allowed_hosts``: host names it answers to besides loopback and the address it listens on (settings:
    EM_VIEWER_URL's host and EM_VIEWER_HOSTS, e.g. a reverse proxy's public name)."""

    daemon_threads = True
    block_on_close = False  # closing does not wait for idle keep-alive connections to time out
    request_queue_size = 128  # connections waiting for a free thread: held by the kernel, not by this process

    def __init__(
        self,
        data_root: str,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_options=None,
        *,
        allowed_hosts=(),
        max_connections: int = MAX_CONNECTIONS,
        max_event_streams: int = MAX_EVENT_STREAMS,
        idle_seconds: float = IDLE_SECONDS,
    ):
        self.client = client_folder()
        self.images = ImageFiles(DataStore(data_root, storage_options))
        bound = [] if host in _EVERY_ADDRESS else [host]  # the address asked for is a name, too
        # the guard's rules (the Host allow-list; no state change from another origin); its client posts
        # state reports as text, which are dropped, so bodies need not be JSON here
        self.policy = Policy.for_hosts([*allowed_hosts, *bound], json_bodies=False)
        self.allowed_hosts = self.policy.allowed_hosts
        self.idle_seconds = idle_seconds
        self.stopping = threading.Event()  # ends the open event streams
        self._threads_free = threading.BoundedSemaphore(max_connections)
        self.event_streams = threading.BoundedSemaphore(max_event_streams)
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = cast(tuple[str, int], self.server_address[:2])  # an AF_INET server's
        return f"http://{host}:{port}"

    def get_request(self):
        """Accept a connection once a thread is free for it: beyond ``max_connections`` they wait in the
        listen queue. The thread is given back in :meth:`shutdown_request` (called once per connection)."""
        while not self._threads_free.acquire(timeout=0.25):
            if self.stopping.is_set():
                raise OSError("the viewer is stopping")  # socketserver drops this accept
        try:
            return super().get_request()
        except BaseException:
            self._threads_free.release()
            raise

    def shutdown_request(self, request) -> None:
        try:
            super().shutdown_request(request)
        finally:
            self._threads_free.release()

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()

    def server_close(self) -> None:
        self.stopping.set()
        super().server_close()

    def start(self) -> ViewerServer:
        self._thread = threading.Thread(target=self.serve_forever, name="viewer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers, then the body: no 40 ms wait for a delayed ACK between them
    _detail = ""  # what the log line adds to a refusal (paths, symlink targets): never sent to the client

    def setup(self) -> None:
        # socket timeout: StreamRequestHandler sets it on the socket. The stubs declare ``timeout`` a
        # ClassVar, but setup() reads self.timeout, so a per-connection value set here is what it uses.
        self.timeout = self.server.idle_seconds  # type: ignore[misc]
        super().setup()

    def parse_request(self) -> bool:
        """http.server's parsing, then what every request must be before it is answered: a path (not an
        absolute URL), one ``Host`` header (400 otherwise) naming a host this viewer answers to (421), and
        nothing posted from another origin (403): the guard's rules."""
        if not super().parse_request():
            return False
        if not self.path.startswith("/"):
            self._error(HTTPStatus.BAD_REQUEST, "a request needs a path", close=True)
            return False
        parts = urllib.parse.urlsplit(self.path)
        request = Request(self.command, parts.path, parts.query, tuple(self.headers.items()))
        refusal = self.server.policy.judge(request)
        if refusal is not None:
            if refusal.status == HTTPStatus.MISDIRECTED_REQUEST:
                self._detail = f"Host {self.headers.get('Host')!r} is not in the allow-list"
            self._error(HTTPStatus(refusal.status), refusal.reason, close=True)
            return False
        return True

    def end_headers(self) -> None:
        for name, value in SECURITY_HEADERS:  # no framing by another page, no sniffing, on every answer
            self.send_header(name, value)
        super().end_headers()

    def handle_expect_100(self) -> bool:
        return True  # no "100 Continue": a body is never invited before the request is judged

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        if _EVENTS.fullmatch(urllib.parse.urlsplit(self.path).path):
            return self._quiet_event_stream()
        self._answer(body=True)

    def do_POST(self) -> None:  # noqa: N802
        """The client's reports of its own state: bounded, read, acknowledged, nothing kept. A body that
        is refused is never read (the connection closes)."""
        if not _ACKNOWLEDGED.fullmatch(urllib.parse.urlsplit(self.path).path):
            return self._error(
                HTTPStatus.FORBIDDEN, "this viewer keeps no state; nothing to post here", close=True
            )
        length = content_length(self.headers.get_all("Content-Length"))
        if length is None or "Transfer-Encoding" in self.headers:
            return self._error(HTTPStatus.BAD_REQUEST, "a state report needs one Content-Length", close=True)
        if length > _MAX_REPORT_BYTES:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "a state report is a few kB", close=True)
        while length > 0:  # read and dropped in blocks
            block = self.rfile.read(min(length, 1 << 16))
            if not block:
                self.close_connection = True
                return
            length -= len(block)
        data = b'{"g": "em"}'
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _quiet_event_stream(self) -> None:
        """An open server-sent-event stream with nothing to say: the client sees its "Python" connected.
        A comment every HEARTBEAT_SECONDS finds a closed tab (the write fails) and ends the thread."""
        if not self.server.event_streams.acquire(blocking=False):
            return self._error(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "too many open viewer tabs",
                close=True,
                headers={"Retry-After": "30"},
            )
        try:
            self.close_connection = True
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            while True:
                self.wfile.write(b": quiet\n\n")
                self.wfile.flush()
                if self.server.stopping.wait(HEARTBEAT_SECONDS):
                    return
        except (OSError, ValueError):  # the tab was closed
            return
        finally:
            self.server.event_streams.release()

    def _answer(self, body: bool) -> None:
        if "Transfer-Encoding" in self.headers or (self.headers.get("Content-Length") or "0").strip() != "0":
            self.close_connection = True  # a body nobody reads must not be taken for the next request
        path = urllib.parse.urlsplit(self.path).path
        try:
            opened, mime, cache = self._open(path)
        except Refused as exc:
            self._detail = f"{exc}; {exc.__cause__}" if exc.__cause__ else str(exc)
            return self._error(HTTPStatus.FORBIDDEN, str(exc))
        except FileNotFoundError:
            return self._error(HTTPStatus.NOT_FOUND, "not found")  # an absent chunk: Neuroglancer fills it
        except OSError as exc:  # the object store is down, a disk error: say so, the viewer retries
            self._detail = repr(exc)
            return self._error(HTTPStatus.BAD_GATEWAY, "cannot read the data root now; try again")
        with opened:
            self._send(opened, mime, cache, body)

    def _open(self, path: str) -> tuple[Body, str, str]:
        """The file a GET/HEAD names, its type and its caching rule."""
        if path.startswith(DATA_PREFIX):
            key = requested_key(path[len(DATA_PREFIX) :])
            # a re-published image replaces its chunks: always revalidate
            return self.server.images.open(key), _mime(key), "no-cache"
        if not path.startswith(CLIENT_PREFIX):
            raise FileNotFoundError(path)
        name = path[len(CLIENT_PREFIX) :] or "index.html"
        if not _CLIENT_FILE.fullmatch(name):
            raise FileNotFoundError(name)
        cache = "no-cache" if name == "index.html" else "max-age=86400"  # hashed bundle names
        return open_local((self.server.client / name).resolve()), _mime(name), cache

    def _send(self, opened: Body, mime: str, cache: str, body: bool) -> None:
        """The whole file (200) or the one range asked for (206, or 416 past the end); HEAD: headers only."""
        ranged = None if "If-Range" in self.headers else self.headers.get("Range")  # no validators: whole
        try:
            span = byte_range(ranged, opened.size)
        except Unsatisfiable:
            headers = {"Content-Range": f"bytes */{opened.size}"}
            return self._error(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "range not satisfiable", headers=headers
            )
        first, last = span or (0, opened.size - 1)
        count = last - first + 1
        self.send_response(HTTPStatus.PARTIAL_CONTENT if span else HTTPStatus.OK)
        if span:
            self.send_header("Content-Range", f"bytes {first}-{last}/{opened.size}")
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(count))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Cache-Control", cache)
        self.end_headers()
        if body and count > 0 and opened.send(self.connection, first, count) < count:
            self.close_connection = True  # the file was cut short (replaced): the client sees it end early

    def _error(self, status: HTTPStatus, text: str, close: bool = False, headers: dict | None = None) -> None:
        data = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")  # http.server then closes the connection
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Refusals and server errors only (with what the client is not told): an absent chunk (404) is
        routine for a sparse image."""
        status = int(code) if str(code).isdigit() else 0
        if status in _LOGGED or status >= 500:
            detail, self._detail = (f": {self._detail}" if self._detail else ""), ""
            sys.stderr.write(f"viewer: {self.address_string()} {self.requestline!r} {status}{detail}\n")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        pass  # http.server's own access and error lines; log_request says what matters


_EVERY_ADDRESS = ("", "0.0.0.0", "::")  # a wildcard bind is no host name a browser uses
_LOGGED = (
    HTTPStatus.BAD_REQUEST,
    HTTPStatus.FORBIDDEN,
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    HTTPStatus.MISDIRECTED_REQUEST,
)


def _mime(name: str) -> str:
    return _MIME.get(posixpath.splitext(name)[1], "application/octet-stream")


def serve(
    data_root: str, host: str, port: int, storage_options=None, out=sys.stdout, allowed_hosts=()
) -> int:
    """Serve until interrupted (``em-platform viewer``)."""
    try:
        server = ViewerServer(data_root, host, port, storage_options, allowed_hosts=allowed_hosts)
    except ViewerUnavailable as exc:
        print(f"em-platform viewer: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"em-platform viewer: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    print(
        f"em-platform viewer: Neuroglancer on {server.url}, images of {data_root} under /data/; "
        f"answers to {', '.join(sorted(server.allowed_hosts))}",
        file=out,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
