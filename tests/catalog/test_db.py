"""The catalog database on SQLite and on the local PostgreSQL server."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from em_platform.catalog.db import CatalogDB, CatalogUnavailable, datasets
from em_platform.catalog.schema import InvalidRecord
from em_platform.catalog.status import IllegalTransition, Status

FILES = [{"path": "a.mrc", "size_bytes": 10, "sha256": "0" * 64}]
COMPLETE_UPDATE = {
    "metadata": {
        "core": {
            "volume_shape": [4, 5, 6],
            "axes": ["z", "y", "x"],
            "voxel_size_nm": {"x": 1.0, "y": 1.0, "z": 2.0},
            "voxel_size_source": "header",
            "data_type": "uint16",
        },
        "technical": {"sha256": "0" * 64, "file_size_bytes": 10},
        "ome_zarr": {
            "uri": "/data/a.ome.zarr",
            "levels": [{"path": "0", "shape": [4, 5, 6], "scale": [2.0, 1.0, 1.0]}],
        },
    },
    "files": {"volume": "/data/a.ome.zarr"},
    "lineage": {"run_id": "r1", "asset_key": "ingest/local", "partition_key": "a.mrc"},
}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'catalog.sqlite'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    catalog = CatalogDB(url)
    yield catalog
    catalog.dispose()


def _complete(db: CatalogDB, source_id: str = "a.mrc") -> dict:
    rec = db.begin("local", source_id, description="a test volume", files=FILES, run_id="r1")
    db.transition(rec["id"], Status.PROCESSING)
    db.transition(rec["id"], Status.SAVING_DATA)
    return db.transition(rec["id"], Status.COMPLETE, update=COMPLETE_UPDATE)


def test_full_lifecycle_with_history(db):
    rec = _complete(db)
    assert rec["status"] == "complete"
    stored = db.find("local", "a.mrc")
    assert stored == rec
    assert stored["metadata"]["core"]["data_type"] == "uint16"
    assert [(h.from_status, h.to_status) for h in db.history(rec["id"])] == [
        (None, "pending"),
        ("pending", "processing"),
        ("processing", "saving-data"),
        ("saving-data", "complete"),
    ]


def test_illegal_transition_raises_and_changes_nothing(db):
    rec = db.begin("local", "b.mrc", description="b", files=FILES)
    with pytest.raises(IllegalTransition):
        db.transition(rec["id"], Status.COMPLETE)
    assert db.get(rec["id"])["status"] == "pending"
    assert len(db.history(rec["id"])) == 1


def test_failure_keeps_error_and_counts_retries(db):
    rec = db.begin("local", "c.mrc", description="c", files=FILES)
    db.transition(rec["id"], Status.PROCESSING)
    failed = db.transition(rec["id"], Status.FAILED, error=ValueError("c.mrc is truncated"))
    assert failed["error"]["message"] == "ValueError: c.mrc is truncated"
    assert failed["error"]["retry_count"] == 1
    assert "Traceback" in failed["error"]["traceback"] or failed["error"]["traceback"].startswith(
        "ValueError"
    )
    again = db.begin("local", "c.mrc", description="c", files=FILES)  # retry: failed → pending
    assert again["status"] == "pending" and again["id"] == rec["id"]
    db.transition(rec["id"], Status.PROCESSING)
    twice = db.transition(rec["id"], Status.FAILED, error="still truncated")
    assert twice["error"] == {"message": "still truncated", "retry_count": 2}
    with db.engine.connect() as conn:
        row = conn.execute(
            sa.select(datasets.c.retry_count, datasets.c.error).where(datasets.c.id == rec["id"])
        ).one()
    assert tuple(row) == (2, "still truncated")


def test_interrupted_run_is_recorded_as_failed_before_the_retry(db):
    """The retry may reach the record before the failure sensor does: it names the run that died."""
    rec = db.begin("local", "d.mrc", description="d", files=FILES, run_id="run-1")
    db.transition(rec["id"], Status.PROCESSING, run_id="run-1")  # …and the run dies here
    again = db.begin("local", "d.mrc", description="d", files=FILES, run_id="run-2")
    assert again["status"] == "pending"
    assert again["error"] == {
        "message": "interrupted: run run-1 stopped while the record was 'processing'",
        "retry_count": 1,
    }
    history = db.history(rec["id"])
    assert [h.to_status for h in history] == ["pending", "processing", "failed", "pending"]
    assert [h.run_id for h in history] == ["run-1", "run-1", "run-2", "run-2"]
    assert db.release_run("run-1", "run run-1 failed: SIGKILL") == []  # the sensor, late: the retry holds it


def test_complete_record_can_be_reingested(db):
    rec = _complete(db, "e.mrc")
    again = db.begin("local", "e.mrc", description="e changed", files=FILES)
    assert again["id"] == rec["id"] and again["status"] == "pending"


def test_invalid_record_is_refused(db):
    rec = db.begin("local", "f.mrc", description="f", files=FILES)
    db.transition(rec["id"], Status.PROCESSING)
    db.transition(rec["id"], Status.SAVING_DATA)
    with pytest.raises(InvalidRecord, match="data_type"):
        db.transition(
            rec["id"],
            Status.COMPLETE,
            update={**COMPLETE_UPDATE, "metadata": {"core": {"data_type": "uint12"}}},
        )
    assert db.get(rec["id"])["status"] == "saving-data"


def test_one_record_per_source_id(db):
    a = db.begin("local", "g.mrc", description="g", files=FILES)
    b = db.begin("local", "g.mrc", description="g", files=FILES)
    assert a["id"] == b["id"]
    assert len([r for r in db.records() if r["source_id"] == "g.mrc"]) == 1


def test_unreachable_database_names_the_url_and_the_fix():
    with pytest.raises(CatalogUnavailable, match="EM_CATALOG_URL") as info:
        CatalogDB("postgresql+psycopg2://nobody@127.0.0.1:1/nothing")
    assert "127.0.0.1:1" in str(info.value)


def test_a_dead_runs_records_are_released_and_only_those(db):
    """release_run fails what the run still held (last changed by it, in flight), with the reason; a record
    a later run took over, or one the run finished, stays as it is; a cancelled run's go to cancelled."""
    held = db.begin("local", "held.mrc", description="held", files=FILES, run_id="dead")
    db.transition(held["id"], Status.PROCESSING, run_id="dead")
    begun = db.begin("local", "begun.mrc", description="only begun", files=FILES, run_id="dead")
    taken = db.begin("local", "taken.mrc", description="taken over", files=FILES, run_id="dead")
    db.transition(taken["id"], Status.PROCESSING, run_id="dead")
    db.begin("local", "taken.mrc", description="taken over", files=FILES, run_id="retry")  # the retry's
    db.transition(taken["id"], Status.PROCESSING, run_id="retry")
    done = _complete(db, "done.mrc")  # by run r1, finished
    released = db.release_run("dead", "run dead failed: killed by signal 9 (SIGKILL)")
    assert sorted(r["source_id"] for r in released) == ["begun.mrc", "held.mrc"]
    rec = db.get(held["id"])
    assert rec["status"] == "failed" and rec["error"]["retry_count"] == 1
    assert rec["error"]["message"] == "run dead failed: killed by signal 9 (SIGKILL)"
    assert db.get(begun["id"])["status"] == "failed"
    assert db.get(taken["id"])["status"] == "processing" and db.get(done["id"])["status"] == "complete"
    assert db.release_run("dead", "again") == []  # nothing left in flight: safe to repeat
    cancelled = db.begin("local", "stopped.mrc", description="cancelled", files=FILES, run_id="gone")
    db.transition(cancelled["id"], Status.PROCESSING, run_id="gone")
    assert [
        r["status"] for r in db.release_run("gone", "run gone was cancelled", status=Status.CANCELLED)
    ] == ["cancelled"]
    assert db.history(cancelled["id"])[-1].message == "run gone was cancelled"
