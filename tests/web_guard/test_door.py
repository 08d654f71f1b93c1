"""The door the TLS proxy asks before it forwards a request (Caddy's forward_auth): the login, the bound on
failed logins per client, and the guard's rules, on the headers the proxy sends it."""

from __future__ import annotations

import base64
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

from em_platform.deploy.stack import set_ui_user
from em_platform.web_guard.door import DoorServer
from em_platform.web_guard.login import FailedLogins, Users
from em_platform.web_guard.rules import Policy

PASSWORD = "a-long-admin-password"


@pytest.fixture
def door(tmp_path):
    users = tmp_path / "users"
    set_ui_user(users, "admin", PASSWORD)
    server = DoorServer(
        Users(users),
        {
            "ui": Policy.for_hosts(["em.example"]),
            "viewer": Policy.for_hosts(["em.example"], json_bodies=False),
        },
        failed=FailedLogins(limit=3, window_s=600),
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, users
    finally:
        server.shutdown()
        server.server_close()


def ask(
    server, site="ui", user=("admin", PASSWORD), client="192.0.2.10", method="GET", uri="/runs", **headers
):
    """What the proxy sends for one browser request, and the door's status."""
    sent = {
        "Host": "em.example:3000",
        "X-Forwarded-Method": method,
        "X-Forwarded-Uri": uri,
        "X-Forwarded-For": client,
    }
    if user:
        sent["Authorization"] = "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    sent.update({k.replace("_", "-"): v for k, v in headers.items()})
    query = urllib.parse.urlsplit(uri).query  # Caddy's rewrite to /check/<site> keeps the request's query
    req = urllib.request.Request(f"{server.url}/check/{site}" + (f"?{query}" if query else ""), headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_a_login_is_asked_for_and_a_good_one_lets_the_request_through(door):
    server, _ = door
    status, headers, body = ask(server, user=None)
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="em_platform"' and body == b""
    assert ask(server, user=("admin", "wrong"))[0] == 401
    assert ask(server, user=("nobody", PASSWORD))[0] == 401
    assert ask(server)[0] == 200
    assert ask(server, site="viewer", uri="/v/em/")[0] == 200


def test_failed_logins_are_bounded_per_client_and_the_right_password_waits_too(door):
    server, _ = door
    for _ in range(3):
        assert ask(server, user=("admin", "guess"), client="198.51.100.7")[0] == 401
    status, headers, _ = ask(server, client="198.51.100.7")  # the right password, from the guessing client
    assert status == 429 and 0 < int(headers["Retry-After"]) <= 600
    assert ask(server, user=("admin", "guess"), client="198.51.100.7")[0] == 429  # not even checked
    assert ask(server, client="192.0.2.10")[0] == 200  # another client is not locked out
    # the proxy's own entry is the last: a browser cannot pick its address by sending the header itself
    assert ask(server, client="203.0.113.1, 198.51.100.7")[0] == 429


def test_the_guards_rules_hold_at_the_door(door):
    server, _ = door
    mutation = "/graphql?query=mutation%7BterminateRun%7D"
    assert ask(server, method="GET", uri=mutation)[0] == 405
    assert ask(server, method="POST", uri="/graphql", Content_Type="text/plain")[0] == 415
    cross = {"Content_Type": "application/json", "Origin": "https://evil.example"}
    assert ask(server, method="POST", uri="/graphql", **cross)[0] == 403
    assert ask(server, method="GET", uri="/graphql", Origin="https://evil.example")[0] == 403  # a WebSocket
    assert ask(server, Host="evil.example:3000")[0] == 421
    ok = {"Content_Type": "application/json", "Origin": "https://em.example:3000"}
    assert ask(server, method="POST", uri="/graphql?op=RunsRoot", **ok)[0] == 200
    assert ask(server, site="viewer", method="POST", uri="/state/em", Content_Type="text/plain")[0] == 200
    assert ask(server, site="nowhere")[0] == 404


def test_a_user_added_or_changed_counts_at_once(door):
    server, users = door
    assert ask(server)[0] == 200  # remembered now
    set_ui_user(users, "admin", "a-new-admin-password")
    assert ask(server)[0] == 401  # the old password is forgotten with the file's change
    set_ui_user(users, "curator", "a-curator-password")
    assert ask(server, user=("curator", "a-curator-password"))[0] == 200
    assert oct(users.stat().st_mode & 0o777) == "0o600"


def test_the_failed_login_window_slides_and_its_memory_is_bounded():
    bound = FailedLogins(limit=2, window_s=60, max_clients=3)
    bound.failed("a", now=0)
    bound.failed("a", now=10)
    assert bound.retry_after("a", now=20) == pytest.approx(40)
    assert bound.retry_after("a", now=60.5) == 0  # the first failure has left the window
    for client in "bcd":
        bound.failed(client, now=30)
    assert bound.retry_after("a", now=30) == 0  # forgotten: the longest quiet of four, with room for three
