"""`em-platform viewer`: Neuroglancer and the data root's images from one loopback HTTP server.

Neuroglancer is the viewer connectomics users already use; its Python package ships the built web client.
This server hands out that client at ``/v/em/`` and the OME-Zarr images under the data root at
``/data/<key>`` (local folder or object storage, through fsspec), so a link the platform writes opens any
montage, dataset or tomogram at full resolution, chunk by chunk, with nothing to install in the browser.

The package's client is built to talk to a Python kernel (``neuroglancer.Viewer``): it loads under
``/v/<token>/`` and keeps an event stream (``/events/<token>``) open for state pushed from Python. A link
carries its whole view in the URL (``#!{...}``), which that client honours, so nothing is kept here: the
event stream stays open and quiet (a comment now and then), and the client's own state reports
(``/state``, ``/action``) are acknowledged and dropped. Links therefore survive restarts of this server.

It serves images and nothing else: a ``/data`` key must name something inside a ``*.zarr`` folder (never
the catalog database, the inbox or a half-written ``.staging`` image), each segment is checked lexically
(:func:`em_platform.edge.join_key`) and, on a local disk, the resolved path must stay inside the root
(:func:`em_platform.edge.inside`: no symlink out). Read only (GET/HEAD); same-origin (no CORS header, so a
web page from elsewhere cannot read the images through a user's browser); loopback unless configured.
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

from em_platform.edge import Refused, inside, join_key
from em_platform.storage.store import STAGING, DataStore

DATA_PREFIX = "/data/"
CLIENT_PREFIX = "/v/em/"  # the Python-integration client finds its "token" here (one, fixed: no state)
_EVENTS = re.compile(r"/events/em")
_ACKNOWLEDGED = re.compile(r"/(?:state|action|credentials)/em")
_MAX_REPORT_BYTES = 1 << 20  # a client state report is a few kB of JSON
HEARTBEAT_SECONDS = 25.0
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


def requested_key(raw: str) -> str:
    """The data-root key a ``/data/...`` request names, or :class:`Refused`: decoded, checked segment by
    segment, inside a ``*.zarr`` folder, never under ``.staging``."""
    key = urllib.parse.unquote(raw)
    if "\x00" in key:
        raise Refused("viewer path", key, "contains a NUL byte")
    key = join_key("", key.rstrip("/"), field="viewer path")  # no '', '.', '..', '\\', control characters
    segments = key.split("/")
    if segments[0] == STAGING:
        raise Refused(
            "viewer path", key, "is a half-written image (.staging); only published images are served"
        )
    if not any(s.endswith(".zarr") for s in segments):
        raise Refused(
            "viewer path", key, "is not inside an OME-Zarr image (*.zarr): the viewer serves images only"
        )
    return key


class ViewerServer(ThreadingHTTPServer):
    """The HTTP server; :meth:`start` serves in a thread (tests, ``make dev``), :func:`serve` in the foreground."""

    daemon_threads = True

    def __init__(self, data_root: str, host: str = "127.0.0.1", port: int = 0, storage_options=None):
        self.client = client_folder()
        self.store = DataStore(data_root, storage_options)
        self.stopping = threading.Event()  # ends the open event streams
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self) -> None:
        self.stopping.set()
        super().server_close()

    def read(self, key: str) -> bytes:
        """The bytes of ``key`` under the data root; FileNotFoundError when there is no such file."""
        path = self.store.path(key)
        if self.store.is_local:
            resolved = inside(self.store.root, key, field="viewer path")
            if not resolved.is_file():
                raise FileNotFoundError(key)
            return resolved.read_bytes()
        try:
            return self.store.fs.cat_file(path)
        except IsADirectoryError:
            raise FileNotFoundError(key) from None

    def start(self) -> ViewerServer:
        self._thread = threading.Thread(target=self.serve_forever, name="viewer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        if _EVENTS.fullmatch(urllib.parse.urlsplit(self.path).path):
            return self._quiet_event_stream()
        self._answer(body=True)

    def do_POST(self) -> None:  # noqa: N802
        """The client's reports of its own state: read (bounded) and acknowledged, nothing kept."""
        length = int(self.headers.get("Content-Length") or 0)
        if not _ACKNOWLEDGED.fullmatch(urllib.parse.urlsplit(self.path).path) or length > _MAX_REPORT_BYTES:
            self.close_connection = True
            return self._error(HTTPStatus.FORBIDDEN, "this viewer keeps no state; nothing to post here")
        self.rfile.read(length)
        data = b'{"g": "em"}'
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _quiet_event_stream(self) -> None:
        """An open server-sent-event stream with nothing to say: the client sees its "Python" connected.
        A comment every HEARTBEAT_SECONDS finds a closed tab (the write fails) and ends the thread."""
        self.close_connection = True
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            while True:
                self.wfile.write(b": quiet\n\n")
                self.wfile.flush()
                if self.server.stopping.wait(HEARTBEAT_SECONDS):
                    return
        except (OSError, ValueError):  # the tab was closed
            return

    def _answer(self, body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path.startswith(DATA_PREFIX):
                key = requested_key(path[len(DATA_PREFIX) :])
                content, mime = self.server.read(key), _mime(key)
                cache = "no-cache"  # a re-published image replaces its chunks: always revalidate
            else:
                if not path.startswith(CLIENT_PREFIX):
                    raise FileNotFoundError(path)
                name = path[len(CLIENT_PREFIX) :] or "index.html"
                if not _CLIENT_FILE.fullmatch(name) or not (self.server.client / name).is_file():
                    raise FileNotFoundError(name)
                content, mime = (self.server.client / name).read_bytes(), _mime(name)
                cache = "no-cache" if name == "index.html" else "max-age=86400"  # hashed bundle names
        except Refused as exc:
            return self._error(HTTPStatus.FORBIDDEN, str(exc))
        except FileNotFoundError:
            return self._error(HTTPStatus.NOT_FOUND, "not found")  # an absent chunk: Neuroglancer fills it
        except OSError as exc:  # the object store is down, a disk error: say so, the viewer retries
            return self._error(HTTPStatus.BAD_GATEWAY, f"cannot read the data root: {exc}")
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if body:
            self.wfile.write(content)

    def _error(self, status: HTTPStatus, text: str) -> None:
        data = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Refusals and server errors only: an absent chunk (404) is routine for a sparse image."""
        status = int(code) if str(code).isdigit() else 0
        if status == HTTPStatus.FORBIDDEN or status >= 500:
            sys.stderr.write(f"viewer: {self.address_string()} {self.requestline!r} {status}\n")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        pass  # http.server's own access and error lines; log_request says what matters


def _mime(name: str) -> str:
    return _MIME.get(posixpath.splitext(name)[1], "application/octet-stream")


def serve(data_root: str, host: str, port: int, storage_options=None, out=sys.stdout) -> int:
    """Serve until interrupted (``em-platform viewer``)."""
    try:
        server = ViewerServer(data_root, host, port, storage_options)
    except ViewerUnavailable as exc:
        print(f"em-platform viewer: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"em-platform viewer: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    print(
        f"em-platform viewer: Neuroglancer on {server.url}, images of {data_root} under /data/",
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
