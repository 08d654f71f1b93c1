"""A DVID-like and a neuPrint-like HTTP server on 127.0.0.1, for the FlyEM source's tests and benchmark.

``DvidServer`` answers DVID's ``/api/node/{uuid}/{instance}/info`` (the uint8blk info JSON: ``Base`` and
``Extended`` with BlockSize, VoxelSize, VoxelUnits, MinPoint, MaxPoint, MinIndex, MaxIndex in x,y,z order)
and ``/raw/0_1_2/{sx}_{sy}_{sz}/{x0}_{y0}_{z0}`` (uint8, x fastest; zeros outside the volume, as DVID
answers background). The voxels come from a formula over a small EM-like tile, so any box of any size is
computed on demand and a test can compute the expected crop with :meth:`DvidServer.voxels`. Faults can be
injected into raw requests: an HTTP status for the next N, a connection dropped mid-body, a short body,
or a status for every request after K more successes (a run "killed" part-way).

``NeuprintServer`` is HTTPS (neuprint-python refuses http) with a throw-away CA, and answers the endpoints
neuprint-python's ``Client`` and ``fetch_meta`` call: ``GET /api/dbmeta/datasets``, ``GET /api/version``
and ``POST /api/custom/custom`` (the :Meta cypher), only with ``Authorization: Bearer <token>``.

Both are plain context managers with ``.url``; each keeps a request log.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from em_platform.samples import em_texture

TILE_ZYX = (50, 60, 70)  # not a divisor of any block size, so a misplaced block shows


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    status: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Base:
    """Start/stop and the request log shared by both servers."""

    scheme = "http"

    def __init__(self) -> None:
        self.log: list[Logged] = []
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def _wrap(self, httpd: _Server) -> None:
        """Hook for TLS."""

    def start(self) -> _Base:
        self._httpd = _Server(("127.0.0.1", 0), self._handler())
        self._wrap(self._httpd)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name=type(self).__name__, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"{self.scheme}://127.0.0.1:{self._httpd.server_address[1]}"

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append(Logged(method, path, status))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as requests sessions use it
    owner: Any = None

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def send_bytes(self, status: int, body: bytes, content_type: str, *, declared: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if declared is None else declared))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj: Any) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json")


# ---------------------------------------------------------------------------------------------------
# DVID


class DvidServer(_Base):
    """A DVID uint8blk instance on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        *,
        uuid: str = "a89eb3af216a46cdba81204d8f954786",
        instance: str = "grayscale",
        min_zyx: tuple[int, int, int] = (128, 0, 64),
        shape_zyx: tuple[int, int, int] = (256, 256, 256),
        voxel_size_xyz: tuple[float, float, float] = (8.0, 8.0, 8.0),
        seed: int = 5,
        info: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.uuid = uuid
        self.instance = instance
        self.min_zyx = tuple(min_zyx)
        self.shape_zyx = tuple(shape_zyx)
        self.voxel_size_xyz = voxel_size_xyz
        self.info_override = info  # answer this JSON for /info instead of the real form
        self._tile = em_texture(TILE_ZYX, seed)
        self._fail: list[int] = []  # statuses for the next raw requests
        self._drop = 0
        self._short = 0
        self._fail_after: tuple[int, int] | None = None  # (successes left, status then)

    # --- what the server holds --------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        if self.info_override is not None:
            return self.info_override
        (z0, y0, x0), (nz, ny, nx) = self.min_zyx, self.shape_zyx
        lo = [x0, y0, z0]
        hi = [x0 + nx - 1, y0 + ny - 1, z0 + nz - 1]
        return {
            "Base": {
                "TypeName": "uint8blk",
                "TypeURL": "github.com/janelia-flyem/dvid/datatype/imageblk/uint8.go",
                "TypeVersion": "0.2",
                "DataUUID": "1b2f6c7d0e5a4c1f9a8b7c6d5e4f3a2b",
                "Name": self.instance,
                "RepoUUID": self.uuid,
                "Compression": "jpeg",
                "Checksum": "No checksum",
                "Syncs": [],
                "Versioned": False,
            },
            "Extended": {
                "Values": [{"DataType": "uint8", "Label": self.instance}],
                "Interpolable": True,
                "BlockSize": [64, 64, 64],
                "VoxelSize": list(self.voxel_size_xyz),
                "VoxelUnits": ["nanometers"] * 3,
                "MinPoint": lo,
                "MaxPoint": hi,
                "MinIndex": [v // 64 for v in lo],
                "MaxIndex": [v // 64 for v in hi],
                "Background": 0,
            },
        }

    def voxels(self, offset_zyx: tuple[int, int, int], size_zyx: tuple[int, int, int]) -> np.ndarray:
        """The uint8 (z, y, x) box the server answers for a raw request (zeros outside the volume)."""
        axes = [np.arange(o, o + n, dtype=np.int64) for o, n in zip(offset_zyx, size_zyx, strict=True)]
        z, y, x = np.ix_(*axes)
        tz, ty, tx = TILE_ZYX
        out = self._tile[z % tz, y % ty, x % tx].astype(np.int64)
        out = (out + (z // tz) * 31 + (y // ty) * 17 + (x // tx) * 7) % 256
        inside = np.ones((1, 1, 1), dtype=bool)
        for a, lo, n in zip((z, y, x), self.min_zyx, self.shape_zyx, strict=True):
            inside = inside & (a >= lo) & (a < lo + n)
        return np.where(inside, out, 0).astype(np.uint8)

    # --- faults and the log -------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._fail.extend([status] * n)

    def drop_next(self, n: int = 1) -> None:
        """Send the headers and half the body of the next ``n`` raw answers, then close the connection."""
        with self._lock:
            self._drop += n

    def short_next(self, n: int = 1) -> None:
        """Answer the next ``n`` raw requests with a well-formed response whose body lacks its last voxels."""
        with self._lock:
            self._short += n

    def fail_after(self, successes: int, status: int = 403) -> None:
        """Answer ``successes`` more raw requests, then ``status`` to every raw request until cleared."""
        with self._lock:
            self._fail_after = (successes, status)

    def clear_faults(self) -> None:
        with self._lock:
            self._fail, self._drop, self._short, self._fail_after = [], 0, 0, None

    def raw_requests(
        self, *, ok_only: bool = False
    ) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
        """(offset_zyx, size_zyx) of every raw request so far, in arrival order."""
        out = []
        with self._lock:
            entries = list(self.log)
        for e in entries:
            m = _RAW.match(e.path)
            if m and (not ok_only or e.status == 200):
                sx, sy, sz, x0, y0, z0 = (int(v) for v in m.group(3, 4, 5, 6, 7, 8))
                out.append(((z0, y0, x0), (sz, sy, sx)))
        return out

    def _next_fault(self) -> tuple[str, int] | None:
        with self._lock:
            if self._fail:
                return "status", self._fail.pop(0)
            if self._drop:
                self._drop -= 1
                return "drop", 0
            if self._short:
                self._short -= 1
                return "short", 0
            if self._fail_after is not None:
                left, status = self._fail_after
                if left <= 0:
                    return "status", status
                self._fail_after = (left - 1, status)
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(_Handler):
            def do_GET(self) -> None:
                status = server._answer(self)
                server._record("GET", self.path, status)

        return Handler

    def _answer(self, h: _Handler) -> int:
        path = h.path.split("?")[0]
        m = _RAW.match(path)
        info = re.fullmatch(r"/api/node/([0-9a-fA-F]+)/([^/]+)/info", path)
        node = m or info
        if not node:
            h.send_bytes(404, b"no such endpoint\n", "text/plain")
            return 404
        if node.group(1) != self.uuid or node.group(2) != self.instance:
            msg = f"no data instance {node.group(2)!r} in node {node.group(1)!r}\n".encode()
            h.send_bytes(400, msg, "text/plain")
            return 400
        if info:
            h.send_json(200, self.info())
            return 200
        sx, sy, sz, x0, y0, z0 = (int(v) for v in m.group(3, 4, 5, 6, 7, 8))
        fault = self._next_fault()
        if fault and fault[0] == "status":
            h.send_bytes(fault[1], f"injected fault {fault[1]}\n".encode(), "text/plain")
            return fault[1]
        body = self.voxels((z0, y0, x0), (sz, sy, sx)).tobytes()
        if fault and fault[0] == "drop":
            h.send_bytes(200, body[: len(body) // 2], "application/octet-stream", declared=len(body))
            h.wfile.flush()
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return 200
        if fault and fault[0] == "short":
            body = body[: max(0, len(body) - 1000)]
        h.send_bytes(200, body, "application/octet-stream")
        return 200


_RAW = re.compile(r"/api/node/([0-9a-fA-F]+)/([^/]+)/raw/0_1_2/(\d+)_(\d+)_(\d+)/(-?\d+)_(-?\d+)_(-?\d+)")


# ---------------------------------------------------------------------------------------------------
# neuPrint


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a 127.0.0.1/localhost server certificate signed by it: (ca, cert, key)."""
    from em_platform.deploy.certificates import CA, CERT, KEY, make_certificates

    make_certificates(folder, ("127.0.0.1", "localhost"), common_name="em_platform test")
    return folder / CA, folder / CERT, folder / KEY


class NeuprintServer(_Base):
    """neuPrintHTTP's dataset and :Meta endpoints over HTTPS; ``.ca_bundle`` is the CA file to trust."""

    scheme = "https"

    def __init__(self, *, token: str = "test-token", dataset: str = "hemibrain:v1.2.1"):
        super().__init__()
        self.token = token
        self.dataset = dataset
        self._tmp = tempfile.TemporaryDirectory(prefix="neuprint-tls-")
        self.ca_bundle, self._cert, self._key = _tls_files(Path(self._tmp.name))
        self.datasets = {
            dataset: {
                "last-mod": "2020-12-28T10:11:12.000Z",
                "uuid": "52a13",
                "ROIs": ["AB(L)", "AB(R)", "EB", "FB", "PB"],
                "superLevelROIs": ["CX", "MB(R)"],
                "info": "https://www.janelia.org/project-team/flyem/hemibrain",
                "logo": "https://www.janelia.org/sites/default/files/Project%20Teams/Fly%20EM/hemibrain_logo.png",
                "hidden": False,
            }
        }
        self.meta = {
            "dataset": dataset.split(":")[0],
            "tag": dataset.split(":")[-1],
            "uuid": "52a13",
            "lastDatabaseEdit": "2020-12-28 10:11:12.000000",
            "latestMutationId": 1000013,
            "totalPreCount": 9651269,
            "totalPostCount": 64168633,
            "preHPThreshold": 0.0,
            "postHPThreshold": 0.0,
            "postHighAccuracyThreshold": 0.7,
            "primaryRois": ["AB(L)", "AB(R)", "EB", "FB", "PB"],
            "superLevelRois": ["CX", "MB(R)"],
            "info": "https://www.janelia.org/project-team/flyem/hemibrain",
            "meshHost": "https://hemibrain-dvid.janelia.org",
        }

    def _wrap(self, httpd: _Server) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self._cert, self._key)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)

    def stop(self) -> None:
        super().stop()
        self._tmp.cleanup()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(_Handler):
            def do_GET(self) -> None:
                server._record("GET", self.path, server._answer(self, None))

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                server._record("POST", self.path, server._answer(self, body))

        return Handler

    def _answer(self, h: _Handler, body: bytes | None) -> int:
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            h.send_json(401, {"error": "user not authorized: missing or invalid token"})
            return 401
        path = h.path.split("?")[0]
        if body is None and path == "/api/dbmeta/datasets":
            h.send_json(200, self.datasets)
            return 200
        if body is None and path == "/api/version":
            h.send_json(200, {"Version": "1.7.2"})  # < 1.7.3: neuprint-python asks for JSON, not Arrow
            return 200
        if body is not None and path == "/api/custom/custom":
            try:
                req = json.loads(body)
            except ValueError:
                h.send_json(400, {"error": "request body is not JSON"})
                return 400
            if req.get("dataset") != self.dataset:
                h.send_json(400, {"error": f"dataset {req.get('dataset')!r} not found"})
                return 400
            if "MATCH (m:Meta)" not in req.get("cypher", ""):
                h.send_json(400, {"error": "this test server answers only the :Meta query"})
                return 400
            columns = [
                "meta",
                "roiInfo",
                "roiHierarchy",
                "neuroglancerInfo",
                "neuroglancerMeta",
                "statusDefinitions",
            ]
            row = [
                self.meta,
                {"EB": {"pre": 1, "post": 2}},
                {"name": "hemibrain", "children": [{"name": "CX"}]},
                {"segmentation": {"host": "https://hemibrain-dvid.janelia.org"}},
                [{"name": "grayscale"}],
                {"Traced": "neuron is fully traced"},
            ]
            h.send_json(200, {"columns": columns, "data": [row]})
            return 200
        h.send_json(404, {"error": f"no endpoint {h.command} {path}"})
        return 404
