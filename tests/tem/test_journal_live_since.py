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


def test_a_journal_an_earlier_release_made_gets_the_indexes_and_each_query_uses_one(journal):
    """The montages table as releases before the indexes made it: opening the journal adds them (create_all
    adds none to an existing table), and each of live_since's queries reads its index, not every montage."""
    names = ("ix_acq_montages_unfinished_seq", "ix_acq_montages_updated_at")
    with journal.engine.begin() as conn:
        for name in names:
            conn.execute(sa.text(f"DROP INDEX {name}"))
    for i in range(200):
        _status(journal, f"m-{i}", "completed")
    assert not set(names) & {i["name"] for i in sa.inspect(journal.engine).get_indexes("acq_montages")}
    reopened = Journal(journal.url)
    try:
        assert set(names) <= {i["name"] for i in sa.inspect(reopened.engine).get_indexes("acq_montages")}
        asked: list[tuple[str, object]] = []

        def note(conn, cursor, statement, parameters, context, executemany):
            asked.append((statement, parameters))

        sa.event.listen(reopened.engine, "before_cursor_execute", note)
        assert reopened.live_since(datetime.now(UTC) - timedelta(minutes=10)) == _seq(reopened, "m-0") - 1
        sa.event.remove(reopened.engine, "before_cursor_execute", note)
        assert len(asked) == 3  # the two looks and, nothing live, the newest
        with reopened.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("ANALYZE acq_montages"))
                conn.execute(sa.text("SET LOCAL enable_seqscan = off"))  # a small table: still no full read
                explain = "EXPLAIN"
            else:
                explain = "EXPLAIN QUERY PLAN"
            for (statement, parameters), index in zip(asked, names, strict=False):
                plan = " ".join(
                    str(r[-1]) for r in conn.exec_driver_sql(f"{explain} {statement}", parameters)
                )
                assert index in plan, (statement, plan)
    finally:
        reopened.dispose()


def test_a_runs_poll_of_its_montages_tiles_reads_one_range_of_one_index(journal):
    """Journal.tiles (every montage run, every 0.1 s): the montage's tiles after a position, from the (montage,
    seq) index alone; PostgreSQL intersected an index of each column, reading every tile after the position
    (29 ms a poll at 5 x 10^5 journaled tiles, most of it before the montage's first tile)."""
    for m in ("a", "b"):
        _status(journal, m, "in_progress")
        for i in range(50):
            journal.record(
                "tile.raw",
                {"tile_id": f"{m}-{i}", "montage_id": m, "row": 0, "column": i, "path": f"/t/{m}{i}.tif"},
            )
    asked: list[tuple[str, object]] = []

    def note(conn, cursor, statement, parameters, context, executemany):
        asked.append((statement, parameters))

    sa.event.listen(journal.engine, "before_cursor_execute", note)
    assert len(journal.tiles("a", after_seq=0)) == 50
    sa.event.remove(journal.engine, "before_cursor_execute", note)
    [(statement, parameters)] = asked
    with journal.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("ANALYZE acq_tiles"))
            conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
            explain = "EXPLAIN"
        else:
            explain = "EXPLAIN QUERY PLAN"
        plan = [str(r[-1]) for r in conn.exec_driver_sql(f"{explain} {statement}", parameters)]
    used = [
        name
        for name in ("ix_acq_tiles_montage_seq", "ix_acq_tiles_seq", "ix_acq_tiles_montage_id")
        if name in " ".join(plan)
    ]
    assert used == ["ix_acq_tiles_montage_seq"], plan
