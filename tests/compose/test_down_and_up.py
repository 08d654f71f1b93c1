"""`make compose-down` then `make compose-up`, as the deployment page shows them: down leaves no container
(the stack's, its runs') and no process of the stack behind; up again finds every record, run and object
of the first on the named volumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from em_platform.catalog.db import CatalogDB
from tests.support.outcomes import data_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _records(stack) -> list[tuple]:
    db = CatalogDB(stack.catalog_url)
    try:
        return sorted(
            (r["source"], r["source_id"], r["status"], json.dumps(r.get("files"), sort_keys=True))
            for r in db.records()
        )
    finally:
        db.dispose()


def _objects(stack) -> dict[str, int]:
    store = data_store(stack)
    return {p: int(i.get("size") or 0) for p, i in store.fs.find(store.root, detail=True).items()}


def _api_service(stack) -> int | None:
    pid_file = stack.stack.api_pid_file
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text())
    return pid if Path(f"/proc/{pid}").exists() else None


def test_down_leaves_nothing_and_up_again_finds_every_record_run_and_object(stack, dagster_api):
    records, objects, runs = _records(stack), _objects(stack), dagster_api.runs(limit=1000)
    assert records and objects and runs
    down = stack.make("compose-down")
    assert down.returncode == 0, down.stdout + down.stderr
    print(down.stdout)
    assert stack.stack.containers() == [] and stack.stack.run_containers() == []
    others = stack.stack.other_stacks_running()
    assert _api_service(stack) is None or others, "podman's API service outlived the last stack"
    for volume in ("data", "compute-logs"):
        assert stack.stack.engine_cmd("volume", "inspect", f"{stack.stack.project}-{volume}").returncode == 0

    up = stack.make("compose-up")
    assert up.returncode == 0, up.stdout + up.stderr
    print(up.stdout)
    with stack.get(f"{stack.webserver}/server_info") as resp:
        assert json.load(resp)["dagster_webserver_version"]
    assert _records(stack) == records
    assert _objects(stack) == objects
    again = dagster_api.runs(limit=1000)
    assert [(r["runId"], r["status"]) for r in again] == [(r["runId"], r["status"]) for r in runs]
