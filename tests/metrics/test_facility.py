"""The facility's exporter: gauges read from a real journal and catalog (SQLite and PostgreSQL) at each scrape,
a store that does not answer reported as such, the SLURM queue, and the runs counted as they end."""

from __future__ import annotations

import copy
import time
import uuid
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from em_platform.catalog.db import CatalogDB, datasets
from em_platform.catalog.status import Status
from em_platform.cluster.slurm import queue_summary
from em_platform.metrics.facility import FacilityCollector, FacilityReaders
from em_platform.metrics_cli import upload_lag
from em_platform.run_metrics import RunCounts
from em_platform.tem.archive import SOURCE
from em_platform.tem.journal import Journal

SHARES = ("/shares/temca2", "/shares/temca3")
FILES = [{"path": "a.mrc", "size_bytes": 10, "sha256": "0" * 64}]


def _samples(*collectors) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    for c in collectors:
        registry.register(c)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _montage(journal: Journal, mid: str, share: str, tiles: int, judged: int, state: str = "started") -> None:
    journal.record("montage.status", {"montage_id": mid, "state": "started", "total_tiles": tiles})
    for i in range(tiles):
        tile_id = f"{mid}-t{i}"
        journal.record(
            "tile.raw",
            {"tile_id": tile_id, "montage_id": mid, "row": 0, "column": i, "path": f"{share}/{mid}/t{i}.tif"},
        )
        if i < judged:
            journal.save_tile_results(tile_id, status="processed", qc_passed=True)
    if state != "started":
        journal.record("montage.status", {"montage_id": mid, "state": state, "total_tiles": tiles})


def _record(catalog: CatalogDB, montage_id: str, status: Status) -> None:
    """The montage's catalog record as the upload leaves it (its body is not what is read here)."""
    now = datetime.now(UTC)
    row = {"source": SOURCE, "source_id": montage_id, "status": status.value, "retry_count": 0}
    with catalog.engine.begin() as conn:
        conn.execute(
            datasets.insert().values(id=str(uuid.uuid4()), record={}, created_at=now, updated_at=now, **row)
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/catalog.sqlite"
    return request.getfixturevalue("pg_url")


def test_the_gauges_follow_the_journal_and_the_catalog(url, tmp_path):
    journal, catalog = Journal(url), CatalogDB(url)
    try:
        _montage(journal, "m-open-a", SHARES[0], tiles=5, judged=3)  # temca2 acquiring, 2 tiles waiting
        _montage(journal, "m-open-b", SHARES[1], tiles=2, judged=2)  # temca3 acquiring
        journal.record(
            "montage.status", {"montage_id": "m-new", "state": "started", "total_tiles": 4}
        )  # no tile
        _montage(journal, "m-done", SHARES[0], tiles=2, judged=2, state="completed")  # GOOD, not uploaded
        journal.record_qc_status("m-done", "GOOD", None)
        _montage(journal, "m-stopped", SHARES[0], tiles=2, judged=2, state="completed")  # held by its checks
        journal.record_qc_status("m-stopped", "STOP_AT_END", "focus")
        _montage(journal, "m-archived", SHARES[1], tiles=2, judged=2, state="completed")
        _record(catalog, "m-archived", Status.COMPLETE)
        readers = FacilityReaders(
            open_montages=lambda: journal.open_montages(datetime.now(UTC) - timedelta(days=1)),
            upload_lag=lambda now: upload_lag(journal, catalog, now),
            buffer=str(tmp_path),
            shares=SHARES,
        )
        before = time.time()
        s = _samples(FacilityCollector(readers))
        assert s[("em_montages_open", (("scope", "temca2"),))] == 1
        assert s[("em_montages_open", (("scope", "temca3"),))] == 1
        assert s[("em_montages_open", (("scope", "other"),))] == 1  # started, no tile yet
        assert (
            before - 60 < s[("em_montage_last_tile_timestamp_seconds", (("scope", "temca2"),))] <= time.time()
        )
        assert s[("em_journal_backlog", ())] == 2
        # only m-done waits: m-stopped was held back by its checks, m-archived is uploaded
        assert 0 < s[("em_montage_upload_lag_seconds", ())] < 60
        assert 0 < s[("em_buffer_free_bytes", ())] <= s[("em_buffer_size_bytes", ())]
        assert {k: v for k, v in s.items() if k[0] == "em_store_up"} == {
            ("em_store_up", (("store", "journal"),)): 1,
            ("em_store_up", (("store", "catalog"),)): 1,
            ("em_store_up", (("store", "buffer"),)): 1,
        }
        # archived now: nothing waits; the montage left open a day ago is no longer counted as acquiring
        _record(catalog, "m-done", Status.COMPLETE)
        readers.open_montages = lambda: journal.open_montages(datetime.now(UTC) + timedelta(seconds=1))
        s = _samples(FacilityCollector(readers))
        assert s[("em_montage_upload_lag_seconds", ())] == 0
        assert not [k for k in s if k[0] == "em_montages_open"] and s[("em_journal_backlog", ())] == 0
    finally:
        journal.dispose()
        catalog.dispose()


def test_a_store_that_does_not_answer_is_reported_and_its_gauges_left_out(tmp_path):
    def down(*_):
        raise OSError("connection refused")

    s = _samples(
        FacilityCollector(
            FacilityReaders(open_montages=down, upload_lag=down, buffer=str(tmp_path / "not-yet"))
        )
    )
    assert s[("em_store_up", (("store", "journal"),))] == 0
    assert s[("em_store_up", (("store", "catalog"),))] == 0
    assert s[("em_store_up", (("store", "buffer"),))] == 1  # not made yet: the filesystem it will be on
    assert {k[0] for k in s} == {"em_store_up", "em_buffer_free_bytes", "em_buffer_size_bytes"}


class _Squeue:
    def __init__(self, stdout: str, returncode: int = 0):
        self.stdout, self.returncode, self.stderr = (
            stdout,
            returncode,
            "slurm_load_jobs error: Unable to contact slurm controller",
        )

    def __call__(self, *args, **kwargs):
        return self


def test_the_slurm_queue_by_state_and_the_longest_wait():
    now = datetime(2026, 11, 28, 12, 0, 0).timestamp()  # squeue prints local time, as fromisoformat reads it
    out = "RUNNING|2026-11-28T11:00:00\nPENDING|2026-11-28T11:49:00\nPENDING|2026-11-28T11:58:30\n"
    queue = queue_summary(now, run=_Squeue(out))
    assert queue.jobs == {"RUNNING": 1, "PENDING": 2} and queue.oldest_pending_s == 660
    s = _samples(FacilityCollector(FacilityReaders(slurm=lambda now: queue)))
    assert (
        s[("em_slurm_jobs", (("state", "pending"),))] == 2
        and s[("em_slurm_jobs", (("state", "running"),))] == 1
    )
    assert s[("em_slurm_oldest_pending_seconds", ())] == 660
    with pytest.raises(RuntimeError, match="Unable to contact slurm controller"):
        queue_summary(now, run=_Squeue("", returncode=1))
    s = _samples(FacilityCollector(FacilityReaders(slurm=lambda now: queue_summary(now, run=_Squeue("", 1)))))
    assert s == {("em_store_up", (("store", "slurm"),)): 0}


@dg.op
def fine():
    return 1


@dg.op
def broken():
    raise RuntimeError("a tile that cannot be read")


@dg.job
def good_job():
    fine()


@dg.job
def bad_job():
    broken()


def test_runs_are_counted_once_as_they_end_by_job_and_status():
    with dg.instance_for_test() as instance:
        good_job.execute_in_process(instance=instance)  # before the exporter started: not counted
        counts = RunCounts(instance)
        s = _samples(counts)
        assert s[("em_runs_total", (("job", "good_job"), ("status", "SUCCESS")))] == 0  # its series from 0
        assert s[("em_runs_total", (("job", "good_job"), ("status", "FAILURE")))] == 0
        good_job.execute_in_process(instance=instance)
        bad_job.execute_in_process(instance=instance, raise_on_error=False)
        bad_job.execute_in_process(instance=instance, raise_on_error=False)
        for _ in range(2):  # a second scrape counts nothing again
            s = _samples(counts)
            assert s[("em_runs_total", (("job", "good_job"), ("status", "SUCCESS")))] == 1
            assert s[("em_runs_total", (("job", "bad_job"), ("status", "FAILURE")))] == 2
            assert s[("em_runs_total", (("job", "bad_job"), ("status", "SUCCESS")))] == 0


def _ingest(
    catalog: CatalogDB, source: str, source_id: str, size: int, end: Status = Status.COMPLETE
) -> None:
    """A dataset ingested as the ingest's lifecycle records it: pending, processing, saving-data, ``end``."""
    record = catalog.begin(source, source_id, description="a test dataset", files=FILES)
    catalog.transition(record["id"], Status.PROCESSING)
    catalog.transition(record["id"], Status.SAVING_DATA)
    if end is Status.COMPLETE:
        catalog.transition(record["id"], end, update=_complete(size))
    else:
        catalog.transition(record["id"], end, error="the store refused")


def _complete(size: int) -> dict:
    from tests.catalog.test_db import COMPLETE_UPDATE

    update = copy.deepcopy(COMPLETE_UPDATE)
    update["metadata"]["technical"]["file_size_bytes"] = size
    return update


def test_the_bytes_ingested_count_each_completion_after_the_start_by_source(url):
    from em_platform.metrics.ingest import IngestBytes

    catalog = CatalogDB(url)
    try:
        _ingest(catalog, "empiar", "EMPIAR-10001", 1000)  # before the exporter: not counted
        counter = IngestBytes(catalog.completions_after, ["empiar", "idr", "epfl"])
        s = _samples(counter)
        assert {k[1][0][1]: v for k, v in s.items() if k[0] == "em_ingest_bytes_total"} == {
            "empiar": 0,
            "epfl": 0,
            "idr": 0,
        }
        _ingest(catalog, "idr", "idr0001", 300)
        _ingest(catalog, "idr", "idr0002", 200)
        _ingest(catalog, "epfl", "hippocampus", 7, end=Status.FAILED)  # no bytes ingested
        _ingest(catalog, "acquisition", "m-1", 99)  # a montage, not an ingest source: left out
        again = catalog.find("empiar", "EMPIAR-10001")
        catalog.begin("empiar", "EMPIAR-10001", description="changed upstream", files=FILES)
        catalog.transition(again["id"], Status.PROCESSING)
        catalog.transition(again["id"], Status.SAVING_DATA)
        catalog.transition(
            again["id"], Status.COMPLETE, update=_complete(1500)
        )  # ingested again: its bytes came again
        s = _samples(counter)
        assert {k[1][0][1]: v for k, v in s.items() if k[0] == "em_ingest_bytes_total"} == {
            "empiar": 1500,
            "epfl": 0,
            "idr": 500,
        }
        assert _samples(counter)[("em_ingest_bytes_total", (("source", "idr"),))] == 500  # counted once
    finally:
        catalog.dispose()


def test_the_bytes_ingested_hold_while_the_catalog_does_not_answer(tmp_path):
    from em_platform.metrics.ingest import IngestBytes

    answers = iter(
        [(0, []), (4, [("idr", {"metadata": {"technical": {"file_size_bytes": 10}}})]), OSError("refused")]
    )

    def completions(cursor):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    counter = IngestBytes(completions, ["idr"])
    assert _samples(counter)[("em_ingest_bytes_total", (("source", "idr"),))] == 10
    assert _samples(counter)[("em_ingest_bytes_total", (("source", "idr"),))] == 10 and counter.cursor == 4
