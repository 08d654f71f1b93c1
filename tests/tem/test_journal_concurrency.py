"""Two writers recording the same message at once (two montage runs sending the same ``qc.status`` body, a
listener and a run): the second is a duplicate, not a UNIQUE error that fails its montage run."""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa

from em_platform.tem.journal import Journal, _now, _record

STATUS = {"status": "GOOD", "reason": None}  # qc.status names no montage: two scopes send the same body


def _waiting_on_a_lock(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar()
        )


def test_a_message_recorded_by_two_writers_at_once_is_kept_once(pg_url):
    first, second = Journal(pg_url), Journal(pg_url)
    outcome: dict = {}

    def record_second() -> None:
        try:
            outcome["new"] = second.record("qc.status", STATUS)
        except Exception as exc:  # the bug: a UNIQUE violation from a look-then-insert
            outcome["error"] = exc

    with first.engine.begin() as conn:
        assert _record(conn, "qc.status", STATUS, _now())
        writer = threading.Thread(target=record_second)
        writer.start()
        # the second writer must be inside its INSERT, held by the first one's uncommitted row
        deadline = time.monotonic() + 30
        while not _waiting_on_a_lock(first.engine):
            assert writer.is_alive(), outcome
            assert time.monotonic() < deadline, "the second writer never reached the first one's row"
    writer.join(30)  # the first writer committed on leaving the block
    assert "error" not in outcome, outcome["error"]
    assert outcome == {"new": False}
    assert [m["status"] for m in first.messages("qc.status")] == ["GOOD"]
