"""`em-platform viewer` against someone on the facility network (issue 36): a real server on a loopback port,
raw sockets for what a browser would never send. It must serve the bytes of published images and nothing
else, answer only to its own host names, and stay small however it is asked.

Every planted file that is not part of a published image holds CANARY: no response may carry it."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from em_platform.imaging.ome_zarr import write_ome_zarr
from em_platform.viewer import server as viewer_server
from em_platform.viewer.server import ViewerServer

CANARY = b"CANARY-not-an-image"
MONTAGE = "acquisition/m1/montage.ome.zarr"
CHUNK = f"{MONTAGE}/0/c/0/0"
MIB = 1 << 20


def _plant(path: Path, data: bytes = CANARY) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


@pytest.fixture
def root(tmp_path) -> Path:
    """A data root as the platform lays it out: published images (zarr v3 and v2), and around them
    everything else a data root holds or an attacker can drop, each holding CANARY."""
    root = tmp_path / "data"
    write_ome_zarr(
        da.from_array(np.broadcast_to(np.linspace(0, 255, 400), (300, 400)).astype(np.uint8)),
        str(root / MONTAGE),
        axes=("y", "x"),
        scale=(4.0, 4.0),
        units=("nanometer", "nanometer"),
    )
    v2 = root / "ingest" / "local" / "v2.zarr"
    _plant(v2 / ".zgroup", b'{"zarr_format": 2}')
    _plant(v2 / ".zattrs", b'{"multiscales": []}')
    _plant(v2 / "0" / ".zarray", b'{"zarr_format": 2, "shape": [2]}')
    _plant(v2 / "0" / "0", b"\x01\x02")
    # the catalog database (acquisition journal, dead letters) and the working folders beside the images
    _plant(root / "catalog.sqlite", b"SQLite format 3\x00" + CANARY)
    _plant(root / "inbox" / "upload.tif", CANARY)
    _plant(root / "downloads" / "empiar" / "vol.zarr" / "zarr.json", b"{}" + CANARY)
    _plant(root / "downloads" / "empiar" / "vol.zarr" / "0" / "c" / "0" / "0", CANARY)
    _plant(root / "downloads" / "empiar" / "stack.tif.part", CANARY)
    _plant(root / "buffer" / ".staging" / "m9" / "montage.ome.zarr" / "zarr.json", b"{}" + CANARY)
    _plant(root / "buffer" / ".staging" / "m9" / "montage.ome.zarr" / "0" / "c" / "0" / "0", CANARY)
    _plant(root / "buffer" / "m2" / "montage.ome.zarr" / "zarr.json", b"{}" + CANARY)  # waits for upload
    _plant(root / ".staging" / "x" / "half.ome.zarr" / "zarr.json", b"{}" + CANARY)
    _plant(root / ".staging" / "x" / "half.ome.zarr" / "0" / "c" / "0" / "0", CANARY)
    _plant(root / "ingest" / "local" / ".staging" / "h.ome.zarr" / "zarr.json", b"{}" + CANARY)
    _plant(root / "ingest" / "local" / ".staging" / "h.ome.zarr" / "0" / "c" / "0" / "0", CANARY)
    _plant(root / "ingest" / "local" / "notes.zarr", CANARY)  # a FILE named *.zarr
    _plant(root / "ingest" / "local" / "bare.zarr" / "0" / "c" / "0" / "0", CANARY)  # no zarr.json: no image
    _plant(root / "ingest" / "local" / "dl.zarr" / "zarr.json", b"{}")
    _plant(root / "ingest" / "local" / "dl.zarr" / "0" / "c" / "0" / "0.part", CANARY)
    _plant(root / f"{MONTAGE}.old-1a2b3c4d" / "0" / "c" / "0" / "0", CANARY)  # an image being replaced
    _plant(root / MONTAGE / ".git" / "config", CANARY)
    _plant(root / MONTAGE / "0" / "c" / "0" / "1.part", CANARY)
    outside = tmp_path / "outside" / "secret.zarr"
    _plant(outside / "zarr.json", b"{}" + CANARY)
    _plant(outside / "0" / "c" / "0" / "0", CANARY)
    # symlinks: what anyone who can drop a file in the inbox can make, and the same inside a family
    for folder in (root / "inbox", root / "ingest" / "local"):
        _link(folder / "y.zarr", root / "catalog.sqlite")
        _link(folder / "x.zarr", root)
        _link(folder / "s.zarr", root / ".staging")
        _link(folder / "out.zarr", outside)
    _link(root / "ingest" / "local" / "h.zarr", root / ".staging" / "x" / "half.ome.zarr")  # a group, staged
    _link(root / "ingest" / "local" / "b.zarr", root / "buffer" / ".staging" / "m9" / "montage.ome.zarr")
    _link(root / MONTAGE / "0" / "c" / "7", root / ".staging" / "x" / "half.ome.zarr" / "0" / "c" / "0")
    _link(root / MONTAGE / "0" / "c" / "8", root / "catalog.sqlite")
    return root


@pytest.fixture
def image_bytes(tmp_path) -> set[bytes]:
    """The bytes of every file of the published images (filled in by :func:`viewer`)."""
    return set()


@pytest.fixture
def viewer(root, image_bytes):
    for image in (
        root / MONTAGE,
        root / "ingest" / "local" / "v2.zarr",
        root / "ingest" / "local" / "dl.zarr",
    ):
        for folder, _, files in os.walk(image):
            for name in files:
                path = Path(folder) / name
                if CANARY not in path.read_bytes():
                    image_bytes.add(path.read_bytes())
    server = ViewerServer(str(root)).start()
    yield server
    server.stop()


def _request(server, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def _raw(server, request: bytes, method: str = "GET", timeout: float = 5.0):
    """Send bytes as they are; the status, headers and body of the one response."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(request)
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def _secrets(root: Path) -> list[str]:
    """What an error text must never show: server paths and where symlinks point."""
    found = {str(root), str(root.parent), str(root.resolve())}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            if (Path(folder) / name).is_symlink():
                found.add(os.readlink(Path(folder) / name))
    return sorted(found)


# -- 1. only the resolved files of published images ----------------------------------------------------------

HOSTILE = {
    "symlink to the catalog": "/data/inbox/y.zarr",
    "symlink to the root": "/data/inbox/x.zarr/catalog.sqlite",
    "symlink to staging": "/data/inbox/s.zarr/x/half.ome.zarr/0/c/0/0",
    "family symlink to the catalog": "/data/ingest/local/y.zarr",
    "family symlink to the root": "/data/ingest/local/x.zarr/catalog.sqlite",
    "family symlink to the root, then an image": f"/data/ingest/local/x.zarr/{CHUNK}",
    "family symlink to staging": "/data/ingest/local/s.zarr/x/half.ome.zarr/0/c/0/0",
    "symlinked image root in staging": "/data/ingest/local/h.zarr/0/c/0/0",
    "symlinked image root in the buffer's staging": "/data/ingest/local/b.zarr/0/c/0/0",
    "symlink out of the root": "/data/ingest/local/out.zarr/0/c/0/0",
    "symlink in an image to staging": f"/data/{MONTAGE}/0/c/7/0",
    "symlink in an image to the catalog": f"/data/{MONTAGE}/0/c/8",
    "a file named *.zarr": "/data/ingest/local/notes.zarr",
    "a *.zarr folder that is no group": "/data/ingest/local/bare.zarr/0/c/0/0",
    "a download in progress": "/data/ingest/local/dl.zarr/0/c/0/0.part",
    "a partial file in an image": f"/data/{MONTAGE}/0/c/0/1.part",
    "a hidden folder in an image": f"/data/{MONTAGE}/.git/config",
    "an image being replaced": f"/data/{MONTAGE}.old-1a2b3c4d/0/c/0/0",
    "the downloads folder": "/data/downloads/empiar/vol.zarr/0/c/0/0",
    "the downloads folder's group": "/data/downloads/empiar/vol.zarr/zarr.json",
    "the buffer's staging": "/data/buffer/.staging/m9/montage.ome.zarr/0/c/0/0",
    "the buffer": "/data/buffer/m2/montage.ome.zarr/zarr.json",
    "staging at the top": "/data/.staging/x/half.ome.zarr/0/c/0/0",
    "staging in a family": "/data/ingest/local/.staging/h.ome.zarr/0/c/0/0",
    "staging, encoded": "/data/ingest/local/%2estaging/h.ome.zarr/0/c/0/0",
    "the catalog": "/data/catalog.sqlite",
    "the inbox": "/data/inbox/upload.tif",
}


@pytest.mark.parametrize("path", HOSTILE.values(), ids=HOSTILE.keys())
def test_what_is_no_published_image_is_refused(viewer, root, path):
    for method in ("GET", "HEAD"):
        status, _, body = _request(viewer, method, path)
        assert status == 403, (method, path, status, body[:200])
        assert CANARY not in body
        assert not any(secret in body.decode() for secret in _secrets(root)), body  # the rule, no path


def test_no_request_returns_a_byte_that_is_not_part_of_a_complete_image(viewer, root, image_bytes):
    """Every file and folder the data root holds, as itself and through every symlink on the way."""
    keys = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            keys.add((Path(folder) / name).relative_to(root).as_posix())
    for key in list(keys):
        if (root / key).is_symlink() and (root / key).resolve().is_dir():
            target = (root / key).resolve()
            for folder, dirs, files in os.walk(target):
                for name in dirs + files:
                    keys.add(f"{key}/{(Path(folder) / name).relative_to(target).as_posix()}")
    served = 0
    for key in sorted(keys):
        status, _, body = _request(viewer, "GET", f"/data/{key}")
        assert CANARY not in body, key
        if status == 200:
            assert body in image_bytes, key
            served += 1
        else:
            assert status in (403, 404), (key, status)
    assert served >= len(image_bytes)  # every file of the images is there to see


def test_error_texts_name_no_server_path_but_the_log_does(viewer, root, capsys):
    long_name = f"/data/{CHUNK[:-1]}{'x' * 300}"  # no file can have it: the old text showed the path
    for path in [*HOSTILE.values(), long_name]:
        status, _, body = _request(viewer, "GET", path)
        assert status in (403, 404), (path, status)
        assert not any(secret in body.decode() for secret in _secrets(root)), (path, body)
    assert str(root.parent / "outside") in capsys.readouterr().err  # the operator's log says where it led


def test_zarr_v2_metadata_is_served_and_other_hidden_names_are_not(viewer, root):
    for name in (".zgroup", ".zattrs", "0/.zarray", "0/0"):
        status, _, body = _request(viewer, "GET", f"/data/ingest/local/v2.zarr/{name}")
        assert status == 200 and body == (root / "ingest/local/v2.zarr" / name).read_bytes()
    assert _request(viewer, "GET", "/data/ingest/local/v2.zarr/0/.zgroup/x")[0] == 403  # not the file's name
    assert _request(viewer, "GET", f"/data/{MONTAGE}")[0] == 404  # the image's folder is no file


# -- 2. a Host allow-list: no DNS rebinding ------------------------------------------------------------------


def test_a_wrong_host_gets_nothing(viewer):
    port = viewer.server_address[1]
    for method, path in (("GET", f"/data/{CHUNK}"), ("HEAD", f"/data/{CHUNK}"), ("GET", "/v/em/")):
        status, _, body = _request(viewer, method, path, {"Host": f"evil.example.com:{port}"})
        assert status == 421 and b"\x00" not in body and len(body) < 100, (method, path, status)
    status, _, _ = _request(viewer, "POST", "/state/em", {"Host": "evil.example.com"}, b"{}")
    assert status == 421
    status, _, _ = _request(viewer, "GET", "/events/em", {"Host": f"rebind.127.0.0.1.nip.io:{port}"})
    assert status == 421


def test_nothing_is_posted_from_another_origin_and_no_page_may_frame_the_viewer(viewer):
    """The guard's rules (em_platform/web_guard/rules.py) in the viewer: its client's state reports come from
    its own origin; every answer, refusals included, forbids framing and content sniffing."""
    port = viewer.server_address[1]
    for cross in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        status, _, _ = _request(viewer, "POST", "/state/em", {"Content-Length": "2", **cross}, b"{}")
        assert status == 403, cross
    own = {"Content-Length": "2", "Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    assert _request(viewer, "POST", "/state/em", own, b"{}")[0] == 200
    for path in (f"/data/{CHUNK}", "/v/em/", "/data/catalog.sqlite"):
        status, headers, _ = _request(viewer, "GET", path)
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff", path
        assert headers["content-security-policy"] == "frame-ancestors 'none'", path


def test_a_missing_doubled_or_malformed_host_is_a_bad_request(viewer):
    port = viewer.server_address[1]
    chunk = f"/data/{CHUNK}".encode()
    for request in (
        b"GET " + chunk + b" HTTP/1.0\r\n\r\n",  # no Host
        b"GET " + chunk + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example.com\r\n\r\n",
        b"GET " + chunk + b" HTTP/1.1\r\nHost: evil.example.com/x\r\n\r\n",
        b"GET http://evil.example.com" + chunk + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # absolute form
    ):
        status, _, body = _raw(viewer, request)
        assert status == 400 and len(body) < 100, request
    status, _, _ = _raw(viewer, b"GET " + chunk + b" HTTP/1.1\r\nHost: LOCALHOST.:%d\r\n\r\n" % port)
    assert status == 200


def test_loopback_names_and_the_configured_ones_are_answered(root):
    server = ViewerServer(str(root), allowed_hosts=("viewer.facility.example",)).start()
    try:
        port = server.server_address[1]
        for host in ("127.0.0.1", "localhost", "[::1]", "viewer.facility.example", "Viewer.Facility.Example"):
            assert _request(server, "GET", f"/data/{CHUNK}", {"Host": f"{host}:{port}"})[0] == 200, host
        assert (
            _request(server, "GET", f"/data/{CHUNK}", {"Host": "viewer.facility.example"})[0] == 200
        )  # proxy
        assert _request(server, "GET", f"/data/{CHUNK}", {"Host": "facility.example"})[0] == 421
    finally:
        server.stop()


def test_viewer_hosts_setting():
    from em_platform.settings import ConfigError, load_settings

    assert load_settings({}).viewer_hosts == ("127.0.0.1",)
    settings = load_settings(
        {
            "EM_VIEWER_URL": "https://Viewer.Facility.Example/",
            "EM_VIEWER_HOSTS": "em-proxy, 10.0.0.5 ,[fd00::1]",
        }
    )
    assert settings.viewer_hosts == ("viewer.facility.example", "em-proxy", "10.0.0.5", "fd00::1")
    for bad in ("http://x", "*", "a/b", "x y"):
        with pytest.raises(ConfigError, match="EM_VIEWER_HOSTS"):
            load_settings({"EM_VIEWER_HOSTS": bad})


# -- 3. ranges, HEAD from the size ---------------------------------------------------------------------------


def test_ranges_are_served_and_an_unsatisfiable_one_is_416(viewer, root):
    data = (root / CHUNK).read_bytes()
    size = len(data)
    cases = {
        "bytes=0-1": (0, 1),
        "bytes=10-": (10, size - 1),
        "bytes=-5": (size - 5, size - 1),
        f"bytes=3-{size * 10}": (3, size - 1),
        f"bytes=-{size * 10}": (0, size - 1),
    }
    for header, (first, last) in cases.items():
        status, headers, body = _request(viewer, "GET", f"/data/{CHUNK}", {"Range": header})
        assert status == 206 and body == data[first : last + 1], header
        assert headers["content-range"] == f"bytes {first}-{last}/{size}"
    for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 9}", "bytes=-0"):
        status, headers, _ = _request(viewer, "GET", f"/data/{CHUNK}", {"Range": header})
        assert status == 416 and headers["content-range"] == f"bytes */{size}", header
    for header in ("bytes=5-2", "bytes=0-1,4-5", "items=0-1", "bytes=abc"):  # not one range: the whole file
        status, _, body = _request(viewer, "GET", f"/data/{CHUNK}", {"Range": header})
        assert status == 200 and body == data, header
    status, _, body = _request(viewer, "GET", f"/data/{CHUNK}", {"Range": "bytes=0-1", "If-Range": '"x"'})
    assert status == 200 and body == data  # no validators here: If-Range asks for the whole file
    status, headers, body = _request(viewer, "HEAD", f"/data/{CHUNK}")
    assert status == 200 and body == b"" and headers["content-length"] == str(size)
    assert headers["accept-ranges"] == "bytes"
    status, headers, body = _request(viewer, "HEAD", f"/data/{CHUNK}", {"Range": "bytes=-3"})
    assert status == 206 and headers["content-length"] == "3" and body == b""


def test_object_store_images_by_the_same_rules_in_blocks(s3_bucket, monkeypatch):
    url, opts = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    image = "ingest/s3/v.ome.zarr"
    write_ome_zarr(
        da.from_array(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)),
        f"{url}/{image}",
        axes=("y", "x"),
        scale=(2.0, 2.0),
        units=("nanometer", "nanometer"),
        storage_options=opts,
    )
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    bucket = url.removeprefix("s3://")
    big = np.random.default_rng(0).integers(0, 255, 3 * MIB + 17, dtype=np.uint8).tobytes()  # > BLOCK_BYTES
    fs.pipe(f"{bucket}/{image}/0/c/big", big)
    for key in (
        "ingest/s3/notes.zarr",
        "ingest/s3/bare.zarr/0/c/0/0",
        "ingest/s3/.staging/h.ome.zarr/zarr.json",
        "ingest/s3/.staging/h.ome.zarr/0/c/0/0",
        ".staging/x/h.ome.zarr/zarr.json",
        ".staging/x/h.ome.zarr/0/c/0/0",
        "downloads/d.zarr/zarr.json",
        "downloads/d.zarr/0/c/0/0",
        f"{image}/0/c/0/0.part",
        "catalog/metadata_catalog_1.json",
    ):
        fs.pipe(f"{bucket}/{key}", b"{}" + CANARY)
    server = ViewerServer(url, storage_options=opts).start()
    try:
        for key in (
            "ingest/s3/notes.zarr",
            "ingest/s3/bare.zarr/0/c/0/0",
            "ingest/s3/.staging/h.ome.zarr/0/c/0/0",
        ):
            status, _, body = _request(server, "GET", f"/data/{key}")
            assert status == 403 and CANARY not in body, key
        for key in (".staging/x/h.ome.zarr/0/c/0/0", "downloads/d.zarr/0/c/0/0", f"{image}/0/c/0/0.part"):
            assert _request(server, "GET", f"/data/{key}")[0] == 403, key
        assert _request(server, "GET", "/data/catalog/metadata_catalog_1.json")[0] == 403
        status, _, body = _request(server, "GET", f"/data/{image}/0/c/big")
        assert status == 200 and body == big  # several blocks
        status, headers, body = _request(
            server, "GET", f"/data/{image}/0/c/big", {"Range": f"bytes={MIB - 3}-"}
        )
        assert status == 206 and body == big[MIB - 3 :]
        assert headers["content-range"] == f"bytes {MIB - 3}-{len(big) - 1}/{len(big)}"
        status, headers, body = _request(server, "HEAD", f"/data/{image}/0/c/big")
        assert status == 200 and body == b"" and headers["content-length"] == str(len(big))
        assert _request(server, "GET", f"/data/{image}/0/c/big", {"Range": f"bytes={len(big)}-"})[0] == 416
        assert _request(server, "GET", f"/data/{image}")[0] == 404  # the image's prefix is no file
        assert _request(server, "GET", f"/data/{image}/0/c/0/0")[0] == 200
    finally:
        server.stop()


# -- 4. request bodies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length_headers, status",
    [
        (b"Content-Length: -1\r\n", 400),
        (b"Content-Length: abc\r\n", 400),
        (b"Content-Length: \xc2\xb2\r\n", 400),  # not ASCII digits
        (b"", 400),  # no length: the body's end is unknown
        (b"Content-Length: 5\r\nContent-Length: 500\r\n", 400),
        (b"Transfer-Encoding: chunked\r\n", 400),
        (b"Content-Length: %d\r\n" % (200 * MIB), 413),
        (b"Content-Length: %d\r\nExpect: 100-continue\r\n" % (200 * MIB), 413),  # no "100 Continue" first
    ],
    ids=[
        "negative",
        "not a number",
        "unicode digit",
        "missing",
        "two",
        "chunked",
        "200 MiB",
        "200 MiB, expect",
    ],
)
def test_a_state_report_needs_a_small_stated_length_and_is_refused_unread(viewer, length_headers, status):
    head = b"POST /state/em HTTP/1.1\r\nHost: 127.0.0.1\r\n" + length_headers + b"\r\n"
    with socket.create_connection(viewer.server_address[:2], timeout=5) as sock:
        sock.sendall(head)  # and no body: the answer must come without it
        answer = b""
        while block := sock.recv(4096):  # until the server closes: no body is read later
            answer += block
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:80]


# -- 5. bounded threads, event streams, idle sockets ---------------------------------------------------------


def _handler_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "process_request_thread" in t.name}


def _accept_queue(port: int) -> int:
    """Connections waiting in the kernel for the viewer on 127.0.0.1:``port`` to accept them (Linux: a
    listening socket's rx_queue in /proc/net/tcp is its accept queue)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # LISTEN
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def _settles(condition, deadline_s: float = 30.0) -> bool:
    end = time.monotonic() + deadline_s
    while not condition() and time.monotonic() < end:
        time.sleep(0.02)  # polling a condition, with a deadline
    return condition()


def test_connections_and_event_streams_are_capped(viewer):
    host, port = viewer.server_address[:2]
    earlier = _handler_threads()  # an earlier test's server may still hold idle keep-alive threads

    def ours():
        return _handler_threads() - earlier

    sockets, statuses = [], []
    try:
        for _ in range(60):  # open tabs' event streams
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall(b"GET /events/em?c=x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sockets.append(sock)
        for sock in sockets:
            statuses.append(int(sock.recv(64).split(b" ")[1]))
        assert statuses.count(200) == viewer_server.MAX_EVENT_STREAMS and statuses.count(503) == 60 - 16
        for _ in range(80):  # and sockets that say nothing: 16 streams + 80 would be 96 threads uncapped
            sockets.append(socket.create_connection((host, port), timeout=10))
        # the server settles with every thread in use and the other connections left in the kernel's queue; a
        # thread that has answered a 503 and given back its slot may take a moment to exit
        waiting = 16 + 80 - viewer_server.MAX_CONNECTIONS
        assert _settles(
            lambda: len(ours()) == viewer_server.MAX_CONNECTIONS and _accept_queue(port) == waiting
        ), f"{len(ours())} threads, {_accept_queue(port)} connections waiting"
    finally:
        for sock in sockets:
            sock.close()


def test_an_idle_or_stalled_socket_is_closed_and_frees_its_thread(root):
    server = ViewerServer(str(root), idle_seconds=1.0, max_connections=4).start()
    host, port = server.server_address[:2]
    try:
        silent = [socket.create_connection((host, port), timeout=10) for _ in range(4)]  # every thread
        stalled = socket.create_connection((host, port), timeout=10)
        stalled.sendall(b"GET /data/" + CHUNK.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
        assert _request(server, "GET", f"/data/{CHUNK}")[0] == 200  # served once the idle ones are closed
        for sock in [*silent, stalled]:
            assert sock.recv(1024) == b""  # closed by the server, nothing said
            sock.close()
    finally:
        server.stop()


# -- 6. memory: a real server process, its peak resident memory ----------------------------------------------


def _memory_kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(f"{field}:")).split()[1])


def _peak_from_now(pid: int) -> int:
    """The server's resident memory now (KiB), its peak reset to it (Linux clear_refs) so that a peak from
    starting up does not hide what follows; where that cannot be reset, the peak so far."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return _memory_kib(pid, "VmHWM")
    return _memory_kib(pid, "VmRSS")


def _grown(pid: int, before_kib: int) -> int:
    return (_memory_kib(pid, "VmHWM") - before_kib) * 1024


@pytest.fixture
def viewer_process(root):
    """`em-platform viewer` in its own process (wired from the settings, a proxy's host name allowed)."""
    from tests.support.ports import free_port

    if not Path("/proc/self/status").exists():
        pytest.skip("reads the server's peak memory from /proc")
    port = free_port()
    env = {
        **os.environ,
        "EM_DATA_ROOT": str(root),
        "EM_VIEWER_URL": f"http://127.0.0.1:{port}",
        "EM_VIEWER_HOSTS": "viewer.facility.example",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "em_platform.cli", "viewer"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert "Neuroglancer on" in proc.stdout.readline()
        proc.server_address = ("127.0.0.1", port)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def _big_chunk(root: Path, size: int, sparse: bool = False) -> tuple[str, bytes | None]:
    key = f"{MONTAGE}/0/c/big"
    if sparse:
        with open(root / key, "wb") as f:
            f.truncate(size)
        return key, None
    data = np.random.default_rng(2).integers(0, 255, size, dtype=np.uint8).tobytes()
    (root / key).write_bytes(data)
    return key, data


def test_the_cli_answers_its_configured_host_names_only(viewer_process):
    assert _request(viewer_process, "GET", f"/data/{CHUNK}", {"Host": "viewer.facility.example"})[0] == 200
    assert _request(viewer_process, "GET", f"/data/{CHUNK}", {"Host": "evil.example.com"})[0] == 421


def test_head_and_a_small_range_of_a_huge_chunk_read_nothing_of_it(viewer_process, root):
    key, _ = _big_chunk(root, 1 << 30, sparse=True)  # 1 GiB, no disk used
    _request(viewer_process, "GET", f"/data/{CHUNK}")  # warm
    before = _peak_from_now(viewer_process.pid)
    status, headers, body = _request(viewer_process, "HEAD", f"/data/{key}")
    assert status == 200 and headers["content-length"] == str(1 << 30) and body == b""
    status, headers, body = _request(viewer_process, "GET", f"/data/{key}", {"Range": "bytes=0-1"})
    assert status == 206 and body == b"\x00\x00" and headers["content-range"] == f"bytes 0-1/{1 << 30}"
    grown = _grown(viewer_process.pid, before)
    assert grown < 32 * MIB, f"the server grew by {grown / MIB:.0f} MiB"


def test_memory_stays_bounded_under_100_concurrent_range_requests(viewer_process, root):
    size = 32 * MIB
    key, data = _big_chunk(root, size)
    _request(viewer_process, "GET", f"/data/{key}", {"Range": "bytes=0-9"})  # warm
    before = _peak_from_now(viewer_process.pid)
    spans = [(i * 256 * 1024, i * 256 * 1024 + MIB - 1) for i in range(100)]
    sockets = []
    for first, last in spans:  # all asked for before any answer is read
        sock = socket.create_connection(viewer_process.server_address, timeout=60)
        sock.sendall(
            f"GET /data/{key} HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: bytes={first}-{last}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        sockets.append(sock)
    time.sleep(1.0)

    def read(i: int) -> tuple[int, bytes]:
        resp = http.client.HTTPResponse(sockets[i])
        resp.begin()
        return resp.status, resp.read() if resp.status == 206 else b""

    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(read, range(100)))
    for sock in sockets:
        sock.close()
    grown = _grown(viewer_process.pid, before)
    print(
        f"viewer peak memory grew by {grown / MIB:.1f} MiB for 100 concurrent 1 MiB ranges of a 32 MiB chunk"
    )
    assert grown < 4 * size, (
        f"grew by {grown / MIB:.0f} MiB (100 copies of the chunk: {100 * size / MIB:.0f} MiB)"
    )
    for (status, body), (first, last) in zip(answers, spans, strict=True):
        assert status == 206 and body == data[first : last + 1]
