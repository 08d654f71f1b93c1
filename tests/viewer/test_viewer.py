"""`em-platform viewer` and the links assets carry: what the browser is served, what it is refused, and
the view a link opens. (That Neuroglancer draws the images: tests/browser/test_operator_ui.py.)"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import urllib.parse

import dask.array as da
import numpy as np
import pytest

from em_platform.edge import Refused
from em_platform.imaging.ome_zarr import write_ome_zarr
from em_platform.viewer.links import Image, contrast_window, image_key, link_for, neuroglancer_link
from em_platform.viewer.server import ViewerServer


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(1)
    write_ome_zarr(
        da.from_array(np.broadcast_to(np.linspace(0, 255, 400), (300, 400)).astype(np.uint8)),  # a ramp
        str(root / "acquisition" / "m1" / "montage.ome.zarr"),
        axes=("y", "x"),
        scale=(4.0, 4.0),
        units=("nanometer", "nanometer"),
    )
    write_ome_zarr(
        da.from_array(rng.normal(5.0, 2.0, (12, 64, 64)).astype(np.float32)),
        str(root / "cryo" / "ts1" / "tomogram.ome.zarr"),
        axes=("z", "y", "x"),
        scale=(16.0, 16.0, 16.0),
        units=("angstrom",) * 3,
    )
    (root / "catalog.sqlite").write_bytes(b"SQLite format 3\0 the catalog")
    (root / ".staging" / "x" / "half.ome.zarr").mkdir(parents=True)
    (root / ".staging" / "x" / "half.ome.zarr" / "zarr.json").write_text("{}")
    return root


@pytest.fixture
def viewer(data_root):
    server = ViewerServer(str(data_root)).start()
    yield server
    server.stop()


def _get(server: ViewerServer, path: str, method: str = "GET", body: bytes | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=body)  # the path as sent, unnormalised (a browser would fold '..')
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def test_serves_the_client_and_the_images_chunks_byte_for_byte(viewer, data_root):
    status, headers, page = _get(viewer, "/v/em/")
    assert status == 200 and b"<script" in page and headers["Content-Type"].startswith("text/html")
    script = page.split(b'src="', 1)[1].split(b'"', 1)[0].decode()
    status, headers, _ = _get(viewer, f"/v/em/{script}")
    assert status == 200 and headers["Content-Type"] == "application/javascript"
    status, headers, meta = _get(viewer, "/data/cryo/ts1/tomogram.ome.zarr/zarr.json")
    assert status == 200 and json.loads(meta)["attributes"]["ome"]["multiscales"]
    chunk = data_root / "acquisition" / "m1" / "montage.ome.zarr" / "0" / "c" / "0" / "0"
    status, headers, body = _get(viewer, "/data/acquisition/m1/montage.ome.zarr/0/c/0/0")
    assert status == 200 and body == chunk.read_bytes()
    assert "Access-Control-Allow-Origin" not in headers  # same origin only: other sites cannot read images
    status, _, body = _get(viewer, "/data/acquisition/m1/montage.ome.zarr/0/c/0/0", method="HEAD")
    assert status == 200 and body == b""


def test_absent_chunk_is_404_so_neuroglancer_fills_it(viewer):
    assert _get(viewer, "/data/acquisition/m1/montage.ome.zarr/0/c/9/9")[0] == 404
    assert _get(viewer, "/data/acquisition/m1/montage.ome.zarr/0")[0] == 404  # a folder is no file
    assert _get(viewer, "/nothing-here.js")[0] == 404


@pytest.mark.parametrize(
    "path",
    [
        "/data/catalog.sqlite",  # not an image
        "/data/acquisition/m1/montage.ome.zarr/../../../catalog.sqlite",
        "/data/acquisition/m1/montage.ome.zarr/%2e%2e/%2e%2e/%2e%2e/catalog.sqlite",
        "/data/acquisition/m1/montage.ome.zarr/..%2f..%2f..%2fcatalog.sqlite",
        "/data//etc/passwd.zarr",
        "/data/.staging/x/half.ome.zarr/zarr.json",  # half-written: never published
        "/data/a.zarr/%00/zarr.json",
        "/data/a.zarr\\..\\catalog.sqlite",
    ],
)
def test_refuses_what_is_not_a_published_image(viewer, path):
    status, _, body = _get(viewer, path)
    assert status == 403, (path, status, body)
    assert b"refused" in body


def test_a_symlink_out_of_the_root_is_refused(viewer, data_root, tmp_path):
    secret = tmp_path / "secret.zarr"
    secret.mkdir()
    (secret / "zarr.json").write_text('{"secret": 1}')
    (data_root / "ingest").mkdir()
    (data_root / "ingest" / "link.ome.zarr").symlink_to(secret)
    status, _, body = _get(viewer, "/data/ingest/link.ome.zarr/zarr.json")
    assert status == 403 and b"outside" in body


def test_keeps_no_state_and_takes_no_uploads(viewer):
    status, _, body = _get(viewer, "/state/em", "POST", b'{"s": {}, "g": 1, "pg": "", "c": "x"}')
    assert status == 200 and json.loads(body) == {"g": "em"}  # the client's report, acknowledged, dropped
    assert _get(viewer, "/data/acquisition/m1/montage.ome.zarr/zarr.json", "POST", b"{}")[0] == 403
    host, port = viewer.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/state/em")
    conn.putheader("Content-Length", str(2 << 20))  # refused on its header, before any body is read
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()


def test_serves_an_object_store_root(s3_bucket, monkeypatch):
    url, opts = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    image = f"{url}/ingest/s3/v.ome.zarr"
    write_ome_zarr(
        da.from_array(np.arange(256 * 300, dtype=np.uint16).reshape(256, 300)),
        image,
        axes=("y", "x"),
        scale=(2.0, 2.0),
        units=("nanometer", "nanometer"),
        storage_options=opts,
    )
    server = ViewerServer(url, storage_options=opts).start()
    try:
        status, _, meta = _get(server, "/data/ingest/s3/v.ome.zarr/zarr.json")
        assert status == 200 and "multiscales" in json.loads(meta)["attributes"]["ome"]
        assert _get(server, "/data/ingest/s3/v.ome.zarr/0/c/0/0")[0] == 200
        assert _get(server, "/data/ingest/s3/v.ome.zarr/0/c/7/7")[0] == 404
    finally:
        server.stop()
    link = link_for(image, "http://127.0.0.1:3030", url, opts)
    assert "/data/ingest/s3/v.ome.zarr/" in urllib.parse.unquote(link)


def _state(link: str) -> dict:
    base, _, fragment = link.partition("#!")
    assert base.endswith("/v/em/")
    return json.loads(urllib.parse.unquote(fragment))


def test_link_opens_a_montage_flat_and_whole(data_root):
    link = link_for(
        str(data_root / "acquisition/m1/montage.ome.zarr"), "http://scope-pc:3030/", str(data_root)
    )
    state = _state(link)
    (layer,) = state["layers"]
    assert layer["source"] == "zarr3://http://scope-pc:3030/data/acquisition/m1/montage.ome.zarr/"
    assert state["layout"] == "xy" and state["displayDimensions"] == ["x", "y"]  # x across, as acquired
    lo, hi = layer["shaderControls"]["normalized"]["range"]
    assert 0 <= lo < 10 and 245 < hi <= 255


def test_link_opens_a_tomogram_in_four_panels_with_its_own_contrast(data_root):
    state = _state(
        link_for(str(data_root / "cryo/ts1/tomogram.ome.zarr"), "http://127.0.0.1:3030", str(data_root))
    )
    assert state["layout"] == "4panel" and state["displayDimensions"] == ["x", "y", "z"]
    lo, hi = state["layers"][0]["shaderControls"]["normalized"]["range"]
    assert -2 < lo < 1.5 and 8.5 < hi < 12  # the float32 values' 0.5-99.5 % (mean 5, sd 2), not [0, 1]


def test_big_image_is_zoomed_out_to_fit():
    state = _state(
        neuroglancer_link("http://h:1", Image("a.zarr", ("y", "x"), (40000, 24000), np.arange(9.0)))
    )
    assert state["crossSectionScale"] == pytest.approx(50.0)  # 40,000 px in an 800-px panel


def test_contrast_window_of_flat_and_empty_images():
    assert contrast_window(np.full((4, 4), 7, np.uint8)) == (6.0, 8.0)
    assert contrast_window(np.array([np.nan, np.inf], np.float32)) == (0.0, 1.0)


def test_image_outside_the_data_root_gets_no_link(data_root, tmp_path):
    with pytest.raises(Refused, match="not under the data root"):
        image_key(str(tmp_path / "elsewhere.ome.zarr"), str(data_root))
    with pytest.raises(Refused):
        image_key(str(data_root) + "/a/../../x.zarr", str(data_root))
    assert image_key("s3://b/root/cryo/t.ome.zarr/", "s3://b/root") == "cryo/t.ome.zarr"


def test_cli_serves_on_the_settings_address_and_refuses_a_taken_port(data_root):
    from tests.support.ports import free_port

    port = free_port()
    env = {**os.environ, "EM_DATA_ROOT": str(data_root), "EM_VIEWER_URL": f"http://127.0.0.1:{port}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "em_platform.cli", "viewer"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()  # printed once it listens
        assert f"Neuroglancer on http://127.0.0.1:{port}" in line, line
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/data/cryo/ts1/tomogram.ome.zarr/zarr.json")
        assert conn.getresponse().status == 200
        second = subprocess.run(
            [sys.executable, "-m", "em_platform.cli", "viewer"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in second.stderr
    finally:
        proc.terminate()
        proc.wait(30)


def test_viewer_url_setting_is_checked():
    from em_platform.settings import ConfigError, load_settings

    assert load_settings({"EM_VIEWER_URL": "http://lab-viewer:8080/"}).viewer_url == "http://lab-viewer:8080"
    for bad in ("lab-viewer:8080", "ftp://x", "http://x/#frag"):
        with pytest.raises(ConfigError, match="EM_VIEWER_URL"):
            load_settings({"EM_VIEWER_URL": bad})


def test_event_stream_stays_open_quietly_and_ends_with_the_server(data_root):
    server = ViewerServer(str(data_root)).start()
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/events/em?c=client&gc=")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    assert resp.fp.readline() == b": quiet\n"  # a comment, no state: the link's own view stands
    server.stop()  # the open stream does not hold the server up
    assert resp.read() == b"\n"  # ... and is closed
    conn.close()
