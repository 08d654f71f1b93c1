"""The Dagster UI as `make dev` serves it (``python -m em_platform.webserver dev``), attacked as the security
review did: crafted requests and a real browser on a page of another origin try to start a sensor; none of
them does, while the same mutation sent as the UI sends it does."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.deploy.dagster_api import wait_until
from tests.support.browser import new_page, open_browser, screenshot
from tests.support.ports import free_port
from tests.web_guard.guarded_ui import START, guarded_ui

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    with guarded_ui(tmp_path_factory.mktemp("guarded_ui")) as running:
        yield running


def _status(req: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_crafted_cross_site_requests_change_nothing(ui):
    body = json.dumps({"query": START}).encode()
    url = ui.url + "/graphql"
    attempts = {
        "text/plain with a JSON charset": urllib.request.Request(
            url, data=body, headers={"Content-Type": "text/plain; charset=application/json"}
        ),
        "a form with the query in the URL": urllib.request.Request(
            url + "?" + urllib.parse.urlencode({"query": START}),
            data=b"x=1",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        "GET of a mutation": urllib.request.Request(url + "?" + urllib.parse.urlencode({"query": START})),
        "JSON from another origin": urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json", "Origin": "https://evil.example"}
        ),
        "JSON through a rebound name": urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json", "Host": "evil.example:3000"}
        ),
    }
    statuses = {name: _status(req) for name, req in attempts.items()}
    assert statuses == {
        "text/plain with a JSON charset": 415,
        "a form with the query in the URL": 400,
        "GET of a mutation": 405,
        "JSON from another origin": 403,
        "JSON through a rebound name": 421,
    }
    assert ui.sensor_status() == "STOPPED"


def test_a_websocket_from_another_origin_is_refused(ui):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    ws_url = ui.url.replace("http://", "ws://") + "/graphql"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url, origin="https://evil.example", subprotocols=["graphql-ws"], open_timeout=30)
    assert refused.value.response.status_code == 403
    with connect(ws_url, origin=ui.url, subprotocols=["graphql-ws"], open_timeout=30) as same_origin:
        same_origin.send(json.dumps({"type": "connection_init"}))
        assert json.loads(same_origin.recv(timeout=30))["type"] == "connection_ack"


def test_every_answer_forbids_framing_and_sniffing(ui):
    for path in ("/", "/server_info", "/graphql?query=mutation%7B__typename%7D"):
        try:
            resp = urllib.request.urlopen(ui.url + path, timeout=30)
        except urllib.error.HTTPError as exc:  # a refusal carries them too
            resp = exc
        assert "frame-ancestors 'none'" in resp.headers.get_all("Content-Security-Policy"), path
        assert (
            resp.headers["X-Frame-Options"] == "DENY" and resp.headers["X-Content-Type-Options"] == "nosniff"
        )


ATTACK = """<!doctype html><title>a page of another origin</title>
<form id="plain" method="POST" action="{ui}/graphql" enctype="text/plain" target="sink">
  <input name='{{"query": {query}, "pad": "' value='"}}'></form>
<form id="urlencoded" method="POST" action="{ui}/graphql?query={quoted}" target="sink"><input name="x" value="1"></form>
<iframe name="sink"></iframe><iframe id="framed" src="{ui}/runs"></iframe>
<script>
const ui = {ui_js}, query = {query};
window.results = {{}};
window.done = Promise.all([
  fetch(ui + "/graphql", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
                           body: JSON.stringify({{query}})}}).then(() => "sent", e => "error"),
  fetch(ui + "/graphql", {{method: "POST", headers: {{"Content-Type": "application/json"}},
                           body: JSON.stringify({{query}})}}).then(r => "read " + r.status, e => "blocked"),
  new Promise(done => {{ const img = new Image(); img.onload = img.onerror = () => done("loaded");
                         img.src = ui + "/graphql?query=" + encodeURIComponent(query); }}),
  new Promise(done => {{ const ws = new WebSocket(ui.replace("http", "ws") + "/graphql", "graphql-ws");
    ws.onopen = () => {{ ws.send(JSON.stringify({{type: "connection_init"}}));
      ws.send(JSON.stringify({{id: "1", type: "start", payload: {{query}}}})); done("opened"); }};
    ws.onerror = () => done("refused"); }}),
]).then(r => {{ window.results = r; document.getElementById("plain").submit();
               document.getElementById("urlencoded").submit(); return r; }});
</script>"""


def test_a_page_of_another_origin_in_a_real_browser_cannot_start_the_sensor(ui, tmp_path):
    """Chromium opens an attacker's page (another port: another origin) that tries every way a page can send
    the mutation: a text/plain form, a form with the query in its URL, fetch in no-cors and cors modes, an image
    of a GET, a WebSocket, and framing the UI. The sensor stays stopped; the UI's own page still works."""
    page_html = ATTACK.format(
        ui=ui.url,
        ui_js=json.dumps(ui.url),
        query=json.dumps(START),
        quoted=urllib.parse.quote(START),
    ).encode()

    class Attack(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page_html)))
            self.end_headers()
            self.wfile.write(page_html)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Attack)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with open_browser() as browser:
            page = new_page(browser, timeout_ms=60_000)
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/attack.html")
            results = page.evaluate("window.done")
            # every attempt reached the UI and was refused there (its log), the forms' posts included
            refusals = (
                "refused POST /graphql 415",  # the text/plain form and the no-cors fetch
                "refused POST /graphql 400",  # the form with the query in its URL
                "refused GET /graphql 405",  # the image
                "refused OPTIONS /graphql 403",  # the CORS fetch's preflight
                "refused WebSocket /graphql 403",
            )
            wait_until(lambda: all(r in ui.log.read_text() for r in refusals), 60, f"the refusals {refusals}")
            screenshot(page, "guard-attack-page")
            assert results[1] == "blocked", results  # no CORS: the page may not even read an answer
            assert results[3] == "refused", results  # the WebSocket's handshake got 403
            # the UI refused to be framed: Chromium shows its own error page in the frame instead
            urls = [f.url for f in page.frames]
            assert not any(u.startswith(ui.url) for u in urls), urls
            assert any(u.startswith("chrome-error://") for u in urls), urls
            assert ui.sensor_status() == "STOPPED"  # nothing the page sent was run

            own = new_page(browser, timeout_ms=120_000)
            own.goto(ui.url + "/automation")
            own.get_by_text("Standard sensor").wait_for()  # the sensor's row, loaded by the UI's own GraphQL
            screenshot(own, "guard-ui-own-page")
    finally:
        server.shutdown()
    assert ui.post(START)["data"]["startSensor"]["__typename"] == "Sensor"  # what the UI sends: applied
    assert ui.sensor_status() == "RUNNING"
