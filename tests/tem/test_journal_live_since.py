"""Where a journal watcher (the live-QC service) starts after a restart: just before the oldest montage still
being acquired or changed recently, never at the journal's first montage (a year's journal is 10⁵ montages:
from 0 the service paged through all of them before it saw the montage being acquired), on SQLite and
PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from em_platform.tem.journal import Journal, montages


@pytest.fixture(params=["sqlite", "postgresql"])
def journal(request, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'j.sqlite'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    journal = Journal(url)
    yield journal
    journal.dispose()


def _status(journal: Journal, montage_id: str, state: str) -> None:
    journal.record("montage.status", {"montage_id": montage_id, "state": state, "total_tiles": 4})


def _age(journal: Journal, montage_ids: list[str], days: float) -> None:
    with journal.engine.begin() as conn:
        conn.execute(
            montages.update()
            .where(montages.c.montage_id.in_(montage_ids))
            .values(updated_at=datetime.now(UTC) - timedelta(days=days))
        )


def _seq(journal: Journal, montage_id: str) -> int:
    return journal.montage(montage_id).seq


def test_it_starts_before_the_oldest_live_montage_not_at_the_first(journal):
    old = [f"old-{i}" for i in range(30)]
    for m in old:
        _status(journal, m, "in_progress")
        _status(journal, m, "completed")
    _status(journal, "acquiring", "in_progress")
    _status(journal, "just-done", "in_progress")
    _status(journal, "just-done", "completed")
    _age(journal, [*old, "acquiring"], days=30)  # acquiring for a month still counts: it is not finished
    recent = datetime.now(UTC) - timedelta(minutes=10)
    start = journal.live_since(recent)
    assert start == _seq(journal, "acquiring") - 1
    seen = {m.montage_id for m in journal.montages_after(start)}
    assert {"acquiring", "just-done"} <= seen and not seen & set(old)


def test_with_nothing_live_it_starts_after_the_newest(journal):
    for m in ("a", "b"):
        _status(journal, m, "in_progress")
        _status(journal, m, "completed")
    _age(journal, ["a", "b"], days=2)
    start = journal.live_since(datetime.now(UTC) - timedelta(minutes=10))
    assert start == _seq(journal, "b") and journal.montages_after(start) == []
    _status(journal, "c", "in_progress")  # a montage that starts later is the first the watcher sees
    assert [m.montage_id for m in journal.montages_after(start)] == ["c"]


def test_an_empty_journal_starts_at_zero(journal):
    assert journal.live_since(datetime.now(UTC)) == 0
    with journal.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(montages)).scalar_one() == 0
