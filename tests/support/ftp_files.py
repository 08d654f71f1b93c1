"""A loopback anonymous FTP server (pyftpdlib) serving a folder, with an injectable dropped transfer."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import DTPHandler, FTPHandler
from pyftpdlib.ioloop import IOLoop
from pyftpdlib.servers import ThreadedFTPServer


class FtpFileServer:
    """``with FtpFileServer(root) as ftp: ftp.url_for("data/a.dm3")``; ``drop_next(after_bytes)`` cuts a RETR."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.retr: list[tuple[str, int]] = []  # (path, REST offset) of every RETR
        self._drop: list[int] = []
        self._lock = threading.Lock()
        self._server: ThreadedFTPServer | None = None
        self._thread: threading.Thread | None = None

    def drop_next(self, after_bytes: int, n: int = 1) -> None:
        with self._lock:
            self._drop.extend([after_bytes] * n)

    def __enter__(self) -> FtpFileServer:
        logging.getLogger("pyftpdlib").setLevel(logging.WARNING)  # one line per command otherwise
        owner = self
        authorizer = DummyAuthorizer()
        authorizer.add_anonymous(str(self.root), perm="elr")

        class Dtp(DTPHandler):
            limit: int | None = None

            def push(self, data):  # not used for file transfers
                return super().push(data)

        class Handler(FTPHandler):
            dtp_handler = Dtp
            banner = "em_platform test FTP"

            def ftp_RETR(self, file):
                with owner._lock:
                    owner.retr.append(
                        (Path(file).relative_to(owner.root.resolve()).as_posix(), self._restart_position)
                    )
                    drop = owner._drop.pop(0) if owner._drop else None
                if drop is None:
                    return super().ftp_RETR(file)
                # Send only `drop` bytes of the file (from the REST offset), then close the data connection
                # abruptly, as a broken link would.
                rest = self._restart_position
                with open(file, "rb") as f:
                    f.seek(rest)
                    data = f.read(drop)
                self._restart_position = 0
                handler = self
                producer = _Truncated(data, handler)
                self.push_dtp_data(producer, isproducer=True, file=None, cmd="RETR")
                return file

        Handler.authorizer = authorizer
        Handler.passive_ports = None
        self._server = ThreadedFTPServer(
            ("127.0.0.1", 0), Handler, ioloop=IOLoop()
        )  # not the shared default loop
        # pyftpdlib keeps the stop event on the class: one server's close_all() would stop every later one.
        self._server._exit = threading.Event()
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"timeout": 0.05, "handle_exit": False}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server:
            self._server.close_all()

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.address[:2]
        return f"ftp://{host}:{port}"

    def url_for(self, path: str) -> str:
        return f"{self.url}/{path.lstrip('/')}"


class _Truncated:
    """A producer that yields some bytes and then aborts the data channel (a dropped connection)."""

    def __init__(self, data: bytes, handler: FTPHandler):
        self.data = data
        self.handler = handler
        self.sent = False

    def more(self) -> bytes:
        if not self.sent:
            self.sent = True
            return self.data
        dtp = self.handler.data_channel
        if dtp is not None:
            dtp._resp = ("426 Connection closed; transfer aborted.", None)
            dtp.transfer_finished = False
            dtp.close()
        return b""
