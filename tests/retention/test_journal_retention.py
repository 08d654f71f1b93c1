"""Letting go of archived montages in the journal, on SQLite and PostgreSQL: their rows go, their own row stays
retired (so a late message starts nothing), the journal's high-water mark never goes back, and nothing of
another montage is touched."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from em_platform.catalog.dead_letters import DeadLetters
from em_platform.tem.journal import RETIRED, Journal


def _montage(journal: Journal, montage_id: str, tiles: int, tmp_path) -> None:
    share = tmp_path / "scope"
    share.mkdir(exist_ok=True)
    journal.record("montage.status", {"montage_id": montage_id, "state": "in_progress", "total_tiles": tiles})
    for i in range(tiles):
        path = share / f"{montage_id}_{i}.tif"
        path.write_bytes(b"")
        journal.record(
            "tile.raw",
            {
                "montage_id": montage_id,
                "tile_id": f"{montage_id}_{i}",
                "row": 0,
                "column": i,
                "path": str(path),
            },
        )
    journal.record("qc.tile", {"montage_id": montage_id, "tile_id": f"{montage_id}_0", "passed": True})
    journal.record_qc_status(montage_id, "GOOD", None)
    journal.record("montage.status", {"montage_id": montage_id, "state": "completed", "total_tiles": tiles})


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    return request.getfixturevalue("pg_url")


def test_an_archived_montage_is_let_go_and_another_is_untouched(url, tmp_path):
    journal = Journal(url)
    _montage(journal, "old", 3, tmp_path)
    _montage(journal, "new", 2, tmp_path)
    kept = journal.messages(montage_id="new"), journal.tiles("new"), journal.qc_statuses("new")
    counts = journal.retire(["old"])
    assert (
        counts["tiles"] == 3
        and counts["messages"] >= 5
        and counts["qc_status"] == 1
        and counts["montages"] == 1
    )
    assert journal.tiles("old") == [] and journal.messages(montage_id="old") == []
    assert journal.montage("old").state == RETIRED and journal.montage("old").finished
    assert (journal.messages(montage_id="new"), journal.tiles("new"), journal.qc_statuses("new")) == kept
    assert journal.retire(["old"]) == {"messages": 0, "tiles": 0, "qc_status": 0, "montages": 0}  # idempotent
    assert journal.unretired() == ["new"]
    journal.dispose()


def test_the_high_water_mark_stays_and_a_late_message_reopens_nothing(url, tmp_path):
    """All of the journal let go: its newest message stays, so a new montage still numbers past the montage
    sensor's cursor (SQLite would reuse the numbers of deleted rows); a late status for a retired montage
    leaves it retired, and no new montage appears after the cursor."""
    journal = Journal(url)
    _montage(journal, "only", 2, tmp_path)
    cursor = journal.high_water_mark()
    journal.retire(["only"])
    assert journal.high_water_mark() == cursor
    journal.record(
        "montage.status", {"montage_id": "only", "state": "in_progress", "total_tiles": 2, "late": 1}
    )
    assert journal.montage("only").state == RETIRED
    assert journal.montages_after(cursor) == []
    _montage(journal, "next", 1, tmp_path)
    assert [m.montage_id for m in journal.montages_after(cursor)] == ["next"]
    journal.dispose()


def test_messages_naming_no_montage_go_after_the_window(url, tmp_path):
    journal = Journal(url)
    journal.record("qc.status", {"status": "GOOD", "reason": None})
    journal.record_qc_status(None, "GOOD", None)
    _montage(journal, "m", 1, tmp_path)
    assert journal.forget_unattached(datetime.now(UTC) - timedelta(days=1)) == {"messages": 0, "qc_status": 0}
    assert journal.forget_unattached(datetime.now(UTC) + timedelta(days=1)) == {"messages": 1, "qc_status": 1}
    assert journal.messages(montage_id="m")  # a montage's own messages are the montage's policy
    journal.dispose()


def test_only_decided_dead_letters_go_after_the_window(url):
    letters = DeadLetters(url)
    waiting = letters.add(source="broker", topic="tile.raw", field="tile_id", reason="bad", body="1")
    decided = letters.add(source="broker", topic="tile.raw", field="tile_id", reason="bad", body="2")
    letters.clear([decided])
    assert letters.forget_decided(datetime.now(UTC) - timedelta(days=1)) == 0
    assert letters.forget_decided(datetime.now(UTC) + timedelta(days=1)) == 1
    assert [letter.id for letter in letters.letters(include_cleared=True)] == [waiting]
