"""bench/scale/ui_queries.py end to end: the UI's pages opened in Chromium on the project's guarded webserver
(its code location, a temporary Dagster home with a few montages, one runless materialization and one run),
their GraphQL queries captured and replayed. What it measures is the benchmark's (make bench-scale), not
asserted here: only that every page sent queries about what it shows, and that each replay was timed."""

from __future__ import annotations

import json
import time

import dagster as dg
import pytest

from bench.scale.ui_queries import UI_PAGES, QueryTiming, UIQueryError, capture, measure_queries, time_queries
from tests.support.browser import prepare_dagster_home, require_browser, start_webserver

# a browser on a webserver with its code location: 45 s on two cores, with make test-e2e's browser chains
pytestmark = [pytest.mark.slow, pytest.mark.end_to_end]
MONTAGES = ["m-ui-0001", "m-ui-0002", "m-ui-0003"]
PARTITION = MONTAGES[1]


@dg.asset
def ui_probe() -> None:
    """A run for the run pages to show (the platform's own runs need a montage's pixels)."""


def test_every_page_sends_queries_and_each_replay_is_timed(tmp_path, monkeypatch):
    require_browser()
    home = prepare_dagster_home(tmp_path / "dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the instance's dagster.yaml reads it
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("montages", MONTAGES)
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key="montage", partition=PARTITION, metadata={"tiles": 20})
        )
        run_id = dg.materialize([ui_probe], instance=instance).run_id
    env = {"EM_DATA_ROOT": str(tmp_path / "data"), "EM_INBOX": str(tmp_path / "inbox")}
    pages = UI_PAGES("montage", PARTITION, run_id)
    with start_webserver(home, env=env, module="em_platform.definitions") as web:
        started = time.perf_counter()
        captured = capture(web.url, pages, timeout_s=60)
        captured_s = time.perf_counter() - started
        measured = measure_queries(web.url, captured, repeats=2)
        replayed_s = time.perf_counter() - started - captured_s
        medians = time_queries(web.url, {"run": captured["run"]}, repeats=1)
        broken = {
            "operationName": "BrokenQuery",
            "variables": {},
            "query": "query BrokenQuery { noSuchField }",
        }
        with pytest.raises(UIQueryError, match=r"page 'runs': BrokenQuery answered"):
            measure_queries(web.url, {"runs": [broken]}, repeats=1)

    print(f"captured {len(pages)} pages in {captured_s:.1f} s, replayed them twice in {replayed_s:.1f} s")
    for page, timings in measured.items():
        for op, t in timings.items():
            print(f"  {page:17} {op:40} {t.median_seconds * 1000:8.1f} ms {t.response_bytes:9,d} B")
    assert set(captured) == set(pages)
    empty = [page for page, bodies in captured.items() if not bodies]
    assert not empty, f"pages that sent no GraphQL query: {empty}"
    for page, bodies in captured.items():
        assert all(b.get("query") and "operationName" in b for b in bodies), (page, bodies)
    assert any(PARTITION in json.dumps(b["variables"]) for b in captured["asset_partition"]), [
        (b["operationName"], b["variables"]) for b in captured["asset_partition"]
    ]
    assert any(run_id in json.dumps(b["variables"]) for b in captured["run"])
    for page, bodies in captured.items():
        assert len(measured[page]) == len(bodies), page  # one timing per captured body
        for t in measured[page].values():
            assert isinstance(t, QueryTiming) and len(t.seconds) == 2
            assert min(t.seconds) > 0 and t.response_bytes > 0, (page, t)
    assert set(medians["run"]) == set(measured["run"])
    assert all(s > 0 for s in medians["run"].values())
