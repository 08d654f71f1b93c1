"""The few GraphQL calls the deployment tests make against the topology's webserver, with waits on conditions."""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.support import polling

TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
REPO = {"repositoryLocationName": "em_platform", "repositoryName": "__repository__"}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """:func:`tests.support.polling.wait_until` at the API's pace: a predicate here is mostly a GraphQL query to
    a webserver that shares the machine's cores with the runs it reports on."""
    return polling.wait_until(predicate, timeout, what, interval)


class DagsterApi:
    """``auth`` (user, password) and ``cafile``: a UI behind a proxy with TLS and a login (compose's)."""

    def __init__(self, base_url: str, auth: tuple[str, str] | None = None, cafile: str | None = None):
        self.base = base_url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if auth:
            self.headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        self.context = ssl.create_default_context(cafile=cafile) if cafile else None

    def query(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        """One GraphQL query. A server error is asked again twice, a second apart: the webserver answers
        500 once per pooled PostgreSQL connection that a database restart closed (the fault tests make
        such restarts); an error that persists is raised."""
        req = urllib.request.Request(
            f"{self.base}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers=self.headers,
        )
        for attempt in range(3):
            try:
                with urllib.request.urlopen(req, timeout=timeout, context=self.context) as resp:
                    body = json.load(resp)
                break
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == 2:
                    raise
                time.sleep(1.0)
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def runs(self, tags: dict[str, str] | None = None, limit: int = 100) -> list[dict]:
        """Runs (newest first) carrying every one of ``tags``."""
        flt = {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]}
        data = self.query(
            """query Runs($filter: RunsFilter, $limit: Int) { runsOrError(filter: $filter, limit: $limit) {
                 __typename ... on Runs { results { runId status jobName startTime endTime
                   tags { key value } } } ... on PythonError { message } } }""",
            {"filter": flt, "limit": limit},
        )["runsOrError"]
        if data["__typename"] != "Runs":
            raise AssertionError(f"runs query failed: {data}")
        for run in data["results"]:
            run["tags"] = {t["key"]: t["value"] for t in run["tags"]}
        return data["results"]

    def partition_runs(self, partition: str) -> list[dict]:
        return self.runs({"dagster/partition": partition})

    def wait_runs_done(self, tags: dict[str, str], count: int, timeout: float) -> list[dict]:
        """Wait until at least ``count`` runs with ``tags`` exist and all of them have ended."""

        def done():
            runs = self.runs(tags)
            return runs if len(runs) >= count and all(r["status"] in TERMINAL for r in runs) else None

        return wait_until(done, timeout, f"{count} finished run(s) tagged {tags}")

    def run_events(self, run_id: str, limit: int = 2000) -> list[dict]:
        data = self.query(
            """query Logs($runId: ID!, $limit: Int) { logsForRun(runId: $runId, limit: $limit) {
                 __typename ... on EventConnection { events { __typename ... on MessageEvent { message level }
                   ... on ExecutionStepFailureEvent { error { message errorChain { error { message } } } }
                   ... on RunFailureEvent { error { message errorChain { error { message } } } } } } } }""",
            {"runId": run_id, "limit": limit},
        )["logsForRun"]
        return data.get("events", [])

    def failure_messages(self, run_id: str) -> str:
        """Every ERROR event of the run, with the error it carries and the errors that caused it (a step's
        exception: Dagster wraps it in DagsterExecutionStepExecutionError, whose message names only the op)."""

        def error(e: dict) -> str:
            chain = [e["error"], *(link["error"] for link in e["error"].get("errorChain") or [])]
            return "".join(f"\n  {c['message'].strip()}" for c in chain)

        return "\n".join(
            e.get("message", "") + (error(e) if e.get("error") else "")
            for e in self.run_events(run_id)
            if e.get("level") == "ERROR"
        )
