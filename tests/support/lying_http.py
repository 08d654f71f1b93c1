"""A loopback HTTP server that lies about sizes, for the hostile-source tests.

Each path answers what the test scripts: a status, headers (a ``Content-Length`` of 10¹⁷, ``Accept-Ranges``)
and a body that may be endless or far longer than announced (sent chunked, generated as it goes, so the
server holds no more than one block). Every request is logged (method, path, Range) so a test can assert
what the client asked for before it refused.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.http_files import start_loopback, stop_loopback


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    # bytes, or a callable giving the blocks of a chunked body (may never end)
    body: bytes | Callable[[], Iterable[bytes]] = b""


def endless(block: bytes = b"0" * 65536) -> Callable[[], Iterable[bytes]]:
    """A body that never ends."""
    return lambda: itertools.repeat(block)


def json_array_of(nbytes: int, block: int = 65536) -> Callable[[], Iterable[bytes]]:
    """A valid JSON document of about ``nbytes`` bytes (``[0,0,...,0]``), generated block by block."""

    def blocks():
        yield b"["
        sent = 1
        while sent < nbytes:
            yield b"0," * (block // 2)
            sent += block
        yield b"0]"

    return blocks


class LyingHttpServer:
    """``with LyingHttpServer() as srv: srv.answer("GET", "/f", Answer(...)); srv.url_for("f")``."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], Answer] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    def answer(self, method: str, path: str, answer: Answer) -> None:
        self.answers[(method, "/" + path.lstrip("/"))] = answer

    def __enter__(self) -> LyingHttpServer:
        self._httpd = start_loopback(_Handler, self)
        return self

    def __exit__(self, *exc) -> None:
        stop_loopback(self._httpd)

    def url_for(self, path: str) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{path.lstrip('/')}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_owner: LyingHttpServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def _answer(self) -> None:
        owner = self.server_owner
        with owner._lock:
            owner.log.append((self.command, self.path, self.headers.get("Range")))
        answer = owner.answers.get((self.command, self.path), Answer(404, body=b"not scripted\n"))
        self.send_response(answer.status)
        for k, v in answer.headers.items():
            self.send_header(k, v)
        chunked = callable(answer.body) and "Content-Length" not in answer.headers
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif "Content-Length" not in answer.headers and self.command != "HEAD":  # HEAD: only what is scripted
            self.send_header("Content-Length", str(len(answer.body)))  # type: ignore[arg-type]
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            if not callable(answer.body):
                self.wfile.write(answer.body)
                return
            for block in answer.body():
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client refused and hung up: what the tests want
