"""What a user waits for in the web UI: the GraphQL queries its pages send, captured in a real browser and
timed as the browser sends them (issue 51).

A page of the Dagster UI is a handful of GraphQL queries whose documents, variables and batching only the
UI's own code knows, and they change with every Dagster release; writing them by hand would time queries no
user sends. So :func:`capture` opens each page in headless Chromium (Debian's, with the project's flags,
tests/support/browser.py) and keeps the bodies the page POSTed to ``/graphql``; :func:`time_queries` (or
:func:`measure_queries`, which also gives each answer's size) replays them over HTTP, one at a time, so each
figure is the server's time for that query alone, not the browser's rendering or its parallel requests::

    captured = capture(web.url, UI_PAGES("montage", "m-0001", run_id))
    seconds = time_queries(web.url, captured)  # {"asset_partitions": {"AssetGraphLiveQuery": 0.04, ...}, ...}

No em_platform import (only the browser's path and flags come from tests/support/browser.py): it measures
the UI of any Dagster webserver, the project's guarded one (``python -m em_platform.webserver``) included.
Live updates the UI streams over the GraphQL WebSocket (a run's log) are no POST and are not captured; the
polls it repeats every 5 s (CodeLocationStatusQuery, an asset's live state) are the queries of its first
load again, so each is timed once.
"""

from __future__ import annotations

import json
import re
import statistics
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

import requests

GRAPHQL_PATH = "/graphql"
# A page has loaded its data when every query it sent has been answered and no new one has been sent or
# answered for this long: the UI sends its queries in waves (the page's, then those of the panels its answers
# draw, the lineage graph's after its layout), each within a few hundred milliseconds of the last answer, so
# a second without a new one means it has what it shows. Its polls (the same queries every 5 s) do not count.
QUIET_SECONDS = 1.0
_PUMP_SECONDS = 0.05  # how often the quiet window is checked while Playwright delivers the page's events


class UIQueryError(RuntimeError):
    """A page's query could not be captured or timed; the message names the page and the operation."""


@dataclass(frozen=True)
class QueryTiming:
    """One captured query replayed ``repeats`` times: the median is what the benchmark reports."""

    operation: str  # its operationName, "#2", "#3"... appended when a page sends it with other variables
    seconds: tuple[float, ...]  # each replay: request sent to answer read
    response_bytes: int  # the answer's JSON body, decoded: what the browser parses

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


def UI_PAGES(asset_key_path: str, partition_key: str, run_id: str) -> dict[str, str]:
    """The paths of the pages issue 51 names, in Dagster 1.13's UI (its router, webapp bundle):
    an asset's partitions, one partition of it, the runs list, one run, and the global asset lineage (the
    side bar's "Lineage", ``/asset-groups``). ``asset_key_path``: the key's parts joined by "/"
    (``ingest/empiar``), each part URL-encoded as the UI encodes it."""
    asset = "/".join(urllib.parse.quote(part, safe="") for part in asset_key_path.split("/"))
    partition = urllib.parse.urlencode({"view": "partitions", "partition": partition_key})
    return {
        "asset_partitions": f"/assets/{asset}?view=partitions",
        "asset_partition": f"/assets/{asset}?{partition}",
        "runs": "/runs",
        "run": f"/runs/{urllib.parse.quote(run_id, safe='')}",
        "global_lineage": "/asset-groups",
    }


def capture(
    base_url: str, pages: Mapping[str, str], *, timeout_s: float = 120, quiet_s: float = QUIET_SECONDS
) -> dict[str, list[dict]]:
    """Open each page (name -> path under ``base_url``) in headless Chromium, each in a fresh browser context
    (no cached answers, as a user opening it) of the UI tests' viewport (what the lineage graph draws, and so
    queries, depends on it), until it has loaded its data (``quiet_s`` without GraphQL traffic; at most
    ``timeout_s`` a page); return name -> the JSON bodies (``operationName``, ``variables``, ``query``) it
    POSTed to ``/graphql``, in the order sent, identical bodies (a poll repeating itself) once."""
    from playwright.sync_api import sync_playwright

    executable, flags, viewport = _project_chromium()
    captured: dict[str, list[dict]] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=flags)
        try:
            for name, path in pages.items():
                context = browser.new_context(viewport=viewport)
                try:
                    captured[name] = _capture_page(context, base_url, name, path, timeout_s, quiet_s)
                finally:
                    context.close()
        finally:
            browser.close()
    return captured


def measure_queries(
    base_url: str, captured: Mapping[str, list[dict]], *, repeats: int = 3, timeout_s: float = 120
) -> dict[str, dict[str, QueryTiming]]:
    """Replay every captured body ``repeats`` times, one request at a time, exactly as the browser sent it
    (POST to ``/graphql?op=<operationName>``, ``Content-Type: application/json``, this origin's
    ``Origin``, which the guarded webserver requires of a browser); page -> operation -> :class:`QueryTiming`.
    An answer that is not 200 or carries GraphQL ``errors`` raises :class:`UIQueryError` naming the page and
    the operation: an error is never timed. A mutation is refused before it is sent (replaying it would
    change what is measured)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: replay each query at least once")
    origin = _origin(base_url)
    url = origin + GRAPHQL_PATH
    headers = {"Content-Type": "application/json", "Accept": "*/*", "Origin": origin}
    results: dict[str, dict[str, QueryTiming]] = {}
    with requests.Session() as session:  # keep-alive, as the browser's connection
        for page, bodies in captured.items():
            timings: dict[str, QueryTiming] = {}
            for body, operation in zip(bodies, _operation_names(bodies), strict=True):
                if _is_mutation(body):
                    raise UIQueryError(
                        f"page {page!r}: {operation} is a mutation; it is not replayed (it would change "
                        "the state being measured): leave it out of the captured bodies"
                    )
                data = json.dumps(body).encode()
                # the UI names the operation in the URL too (``?op=``, as its requests in Chromium show)
                op = {"op": body.get("operationName") or ""}
                seconds = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    response = session.post(url, params=op, data=data, headers=headers, timeout=timeout_s)
                    answer = response.content
                    seconds.append(time.perf_counter() - started)
                    _check_answer(page, operation, response.status_code, answer)
                timings[operation] = QueryTiming(operation, tuple(seconds), len(answer))
            results[page] = timings
    return results


def time_queries(
    base_url: str, captured: Mapping[str, list[dict]], *, repeats: int = 3, timeout_s: float = 120
) -> dict[str, dict[str, float]]:
    """:func:`measure_queries`, reduced to page -> operation -> median seconds."""
    measured = measure_queries(base_url, captured, repeats=repeats, timeout_s=timeout_s)
    return {page: {op: t.median_seconds for op, t in ops.items()} for page, ops in measured.items()}


def _project_chromium() -> tuple[str, list[str], dict]:
    """The browser the project's UI tests drive, with their flags: one home for both (tests/support)."""
    from tests.support.browser import CHROMIUM_FLAGS, VIEWPORT, chromium_path

    executable = chromium_path()
    if executable is None:
        raise UIQueryError(
            "no Chromium to open the UI's pages: run scripts/install_chromium.sh as root or set EM_CHROMIUM"
        )
    return executable, list(CHROMIUM_FLAGS), dict(VIEWPORT)


def _is_graphql_post(request, origin: str) -> bool:
    parts = urllib.parse.urlsplit(request.url)
    return (
        request.method == "POST"
        and f"{parts.scheme}://{parts.netloc}" == origin
        and parts.path.rstrip("/") == GRAPHQL_PATH
    )


def _capture_page(
    context, base_url: str, name: str, path: str, timeout_s: float, quiet_s: float
) -> list[dict]:
    origin = _origin(base_url)
    page = context.new_page()
    page.set_default_timeout(timeout_s * 1000)
    bodies: list[dict] = []
    malformed: list[object] = []  # raised from the loop below: an exception in an event handler is lost
    in_flight: dict[object, str] = {}  # request -> its body as text
    sent_once: dict[str, str] = {}  # each distinct body (as text) -> its operation
    answered: set[str] = set()
    last_activity = time.monotonic()  # a new distinct query sent, or one answered for the first time

    def sent(request) -> None:
        nonlocal last_activity
        if _is_graphql_post(request, origin):
            try:
                body = request.post_data_json
            except ValueError:
                body = request.post_data
            if not isinstance(body, dict):  # the UI sends one operation per request, never a batch
                malformed.append(body)
                return
            bodies.append(body)
            text = json.dumps(body, sort_keys=True)
            in_flight[request] = text
            if text not in sent_once:
                sent_once[text] = body.get("operationName") or "anonymous"
                last_activity = time.monotonic()

    def ended(request) -> None:
        nonlocal last_activity
        text = in_flight.pop(request, None)
        if text is not None and text not in answered:
            answered.add(text)
            last_activity = time.monotonic()

    page.on("request", sent)
    page.on("requestfinished", ended)
    page.on("requestfailed", ended)
    deadline = time.monotonic() + timeout_s
    response = page.goto(base_url.rstrip("/") + path, wait_until="load")
    if response is None or not response.ok:
        status = response.status if response is not None else "no answer"
        raise UIQueryError(f"page {name!r} ({path}): the UI answered {status}")
    # loaded: every query it sent answered once, and no new one for quiet_s. Its polls (the same queries again)
    # are not waited for: where a query takes longer than the UI's 5 s poll, one is always in flight
    while sent_once.keys() - answered or not bodies or time.monotonic() - last_activity < quiet_s:
        if malformed:
            raise UIQueryError(
                f"page {name!r}: a GraphQL POST whose body is no JSON object: {malformed[0]!r:.200}"
            )
        if time.monotonic() > deadline:
            waiting = sorted({sent_once[t] for t in sent_once.keys() - answered}) or "its first GraphQL query"
            raise UIQueryError(f"page {name!r} ({path}): still waiting for {waiting} after {timeout_s:g} s")
        page.wait_for_timeout(_PUMP_SECONDS * 1000)  # Playwright delivers the page's events while it waits
    unique: list[dict] = []
    for body in bodies:
        if body not in unique:
            unique.append(body)
    return unique


def _origin(base_url: str) -> str:
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url {base_url!r}: give the UI's address, e.g. http://127.0.0.1:3000")
    return f"{parts.scheme}://{parts.netloc}"


def _operation_names(bodies: list[dict]) -> list[str]:
    """Each body's operationName; one sent again with other variables (a second batch of asset keys)
    becomes ``Name#2``, ``Name#3``... so that no timing hides another."""
    seen: dict[str, int] = {}
    names = []
    for body in bodies:
        base = body.get("operationName") or "anonymous"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def _is_mutation(body: Mapping) -> bool:
    operation = body.get("operationName")
    name = re.escape(operation) + r"\b" if operation else ""
    return re.search(rf"(^|[}}\s])mutation\s*{name}", body.get("query") or "") is not None


def _check_answer(page: str, operation: str, status: int, answer: bytes) -> None:
    if status != 200:
        raise UIQueryError(f"page {page!r}: {operation} answered HTTP {status}: {answer[:300]!r}")
    try:
        errors = json.loads(answer).get("errors")
    except (ValueError, AttributeError) as exc:
        raise UIQueryError(f"page {page!r}: {operation} answered no JSON object: {answer[:300]!r}") from exc
    if errors:
        raise UIQueryError(f"page {page!r}: {operation} answered GraphQL errors: {json.dumps(errors)[:500]}")
