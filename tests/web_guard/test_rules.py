"""The guard's rules on crafted requests: every cross-site form, text/plain body, GraphQL by GET, foreign
Origin or Host is refused; what the UI's own pages and a non-browser client send passes."""

from __future__ import annotations

import pytest

from em_platform.web_guard.rules import Policy, Request, is_json, same_origin

UI = Policy.for_hosts(["em.facility.example"])
HOST = ("Host", "127.0.0.1:3000")
MUTATION = "query=mutation%20%7B%20terminateRun(runId%3A%22x%22)%20%7B%20__typename%20%7D%20%7D"


def judged(method="POST", path="/graphql", query="", headers=(), websocket=False, policy=UI):
    refusal = policy.judge(Request(method, path, query, (HOST, *headers), websocket))
    return refusal.status if refusal else None


# What a page of another origin can make a browser send without asking (no CORS preflight): each refused.
@pytest.mark.parametrize(
    "method,path,query,headers,status",
    [
        # the review's three: text/plain with a JSON-looking charset, a form POST with the query in the URL,
        # a plain GET of a mutation (a link, an <img>)
        ("POST", "/graphql", "", [("Content-Type", "text/plain; charset=application/json")], 415),
        ("POST", "/graphql", MUTATION, [("Content-Type", "application/x-www-form-urlencoded")], 400),
        ("GET", "/graphql", MUTATION, [], 405),
        ("HEAD", "/graphql", MUTATION, [], 405),
        # the same spelled differently: doubled and trailing slashes, multipart, no type at all
        ("GET", "//graphql/", MUTATION, [], 405),
        ("POST", "/graphql/", "", [("Content-Type", "multipart/form-data; boundary=x")], 415),
        ("POST", "/graphql", "", [], 415),
        ("POST", "/graphql", "", [("Content-Type", "text/plain")], 415),
        ("POST", "/graphql", "", [("Content-Type", "application/json"), ("Content-Type", "text/plain")], 415),
        ("POST", "/graphql", "", [("Content-Type", "application/jsonx")], 415),
        ("PUT", "/graphql", "", [("Content-Type", "application/json")], 405),
        # a JSON body from another origin (a browser asks first, but the answer is no either way)
        (
            "POST",
            "/graphql",
            "",
            [("Content-Type", "application/json"), ("Origin", "https://evil.example")],
            403,
        ),
        (
            "POST",
            "/graphql",
            "",
            [("Content-Type", "application/json"), ("Origin", "http://127.0.0.1:3001")],
            403,
        ),
        ("POST", "/graphql", "", [("Content-Type", "application/json"), ("Origin", "null")], 403),
        (
            "POST",
            "/graphql",
            "",
            [("Content-Type", "application/json"), ("Sec-Fetch-Site", "cross-site")],
            403,
        ),
        (
            "POST",
            "/graphql",
            "",
            [("Content-Type", "application/json"), ("Sec-Fetch-Site", "same-site")],
            403,
        ),
        # Dagster's REST endpoints that write events: a form from anywhere
        (
            "POST",
            "/report_asset_materialization/montage",
            "",
            [("Content-Type", "application/x-www-form-urlencoded"), ("Origin", "https://evil.example")],
            403,
        ),
        ("POST", "/report_asset_materialization/montage", "", [("Content-Type", "text/plain")], 415),
        (
            "DELETE",
            "/anything",
            "",
            [("Content-Type", "application/json"), ("Sec-Fetch-Site", "cross-site")],
            403,
        ),
    ],
)
def test_cross_site_and_non_json_requests_are_refused(method, path, query, headers, status):
    assert judged(method, path, query, headers) == status


def test_a_websocket_from_another_origin_is_refused_and_the_uis_own_is_not():
    assert judged("GET", "/graphql", websocket=True, headers=[("Origin", "https://evil.example")]) == 403
    assert judged("GET", "/graphql", websocket=True, headers=[("Origin", "http://127.0.0.1:3000")]) is None
    assert judged("GET", "/graphql", websocket=True) is None  # no browser: no Origin


def test_a_host_the_server_does_not_answer_to_is_refused_everywhere():
    """DNS rebinding: a page at http://evil.example:3000 whose name resolves to 127.0.0.1 is same-origin with
    itself; its Host gives it away."""
    for host in ("evil.example:3000", "127.0.0.1.evil.example", "em.facility.example.evil:3000"):
        refusal = UI.judge(Request("GET", "/", "", (("Host", host),)))
        assert refusal is not None and refusal.status == 421, host
    assert UI.judge(Request("GET", "/", "", ())).status == 400  # no Host
    assert UI.judge(Request("GET", "/", "", (HOST, HOST))).status == 400  # two
    for host in (
        "127.0.0.1:3000",
        "localhost:3000",
        "[::1]:3000",
        "em.facility.example",
        "EM.Facility.Example.",
    ):
        assert UI.judge(Request("GET", "/", "", (("Host", host),))) is None, host


@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Type", "application/json")],  # a script, curl, the Dagster GraphQL client
        [("Content-Type", "application/json; charset=utf-8")],
        [
            ("Content-Type", "application/json"),
            ("Origin", "http://127.0.0.1:3000"),
            ("Sec-Fetch-Site", "same-origin"),
        ],
        [("Content-Type", "Application/JSON"), ("Origin", "http://127.0.0.1:3000")],
    ],
)
def test_what_the_ui_and_its_clients_send_passes(headers):
    assert judged("POST", "/graphql", "", headers) is None


def test_pages_and_files_are_served_to_a_navigation_from_anywhere():
    """A link to the UI from another site (an e-mail, the viewer's page) opens it: reading is not changing."""
    for path in ("/", "/runs", "/assets/montage", "/static/js/main.js", "/server_info"):
        assert judged("GET", path, headers=[("Sec-Fetch-Site", "cross-site")]) is None, path
    assert judged("GET", "/graphql") is None  # the GraphQL explorer's page, with no document in the URL


def test_the_viewer_takes_text_bodies_but_not_from_another_origin():
    viewer = Policy.for_hosts([], json_bodies=False)
    same = [("Content-Type", "text/plain;charset=UTF-8"), ("Origin", "http://127.0.0.1:3000")]
    assert judged("POST", "/state/em", headers=same, policy=viewer) is None
    assert judged("POST", "/state/em", headers=[("Origin", "https://evil.example")], policy=viewer) == 403


def test_origin_comparison_knows_default_ports_and_nothing_else():
    assert same_origin("https://em.example", "em.example:443")
    assert same_origin("http://em.example:80", "em.example")
    assert not same_origin("https://em.example", "em.example:80")
    assert not same_origin("https://em.example:3000/path", "em.example:3000")
    assert not same_origin("file://", "em.example")
    assert is_json(['application/json ; charset="utf-8"']) and not is_json(
        ["application/json; charset=latin1"]
    )
