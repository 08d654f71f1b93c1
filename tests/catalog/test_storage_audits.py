"""The storage check's ledger (em_platform.catalog.storage_audits) on SQLite and PostgreSQL: each evaluation
audits a share of the complete records so that every one is audited once a cycle, never-audited first, then the
longest ago; a record whose last audit failed is audited every time; a record no longer complete leaves it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from em_platform.catalog.db import CatalogDB, datasets
from em_platform.catalog.storage_audits import AuditSettingError, StorageAudits, cycle_days
from em_platform.storage.consistency import RecordAudit


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    return request.getfixturevalue("pg_url")


def _records(url: str, statuses: list[str]) -> list[str]:
    db = CatalogDB(url)
    now = datetime.now(UTC)
    ids = [str(uuid.UUID(int=i + 1)) for i in range(len(statuses))]
    with db.engine.begin() as conn:
        conn.execute(
            datasets.insert(),
            [
                {"id": i, "source": "acquisition", "source_id": f"m{n}", "status": s, "retry_count": 0,
                 "record": {"id": i, "status": s}, "created_at": now, "updated_at": now}
                for n, (i, s) in enumerate(zip(ids, statuses, strict=True))
            ],
        )  # fmt: skip
    db.dispose()
    return ids


def _audited(ids: list[str], lost: set[str] = frozenset()) -> list[RecordAudit]:
    return [RecordAudit(i, i, 1, 1, missing=("x",) if i in lost else ()) for i in ids]


def test_every_complete_record_is_audited_once_a_cycle_the_longest_ago_first(url):
    ids = _records(url, ["complete"] * 7 + ["failed"])
    audits = StorageAudits(url)
    day = datetime(2026, 1, 1, tzinfo=UTC)
    seen: list[list[str]] = []
    for n in range(4):
        due = [r["id"] for r in audits.due(cycle=3)]
        seen.append(due)
        audits.record(_audited(due), at=day + timedelta(days=n))
    assert [len(d) for d in seen] == [3, 3, 3, 3]  # ceil(7 / 3) a day
    assert set(seen[0] + seen[1] + seen[2]) == set(ids[:7])  # the failed record never
    assert seen[2][0] not in seen[0] + seen[1]  # the never-audited one first, then the longest ago
    assert set(seen[2][1:]) <= set(seen[0]) and set(seen[3]) <= set(seen[0] + seen[1])
    coverage = audits.coverage()
    assert coverage["complete_records"] == 7 and coverage["never_audited"] == 0
    assert coverage["oldest_audit"].replace(tzinfo=UTC) == day + timedelta(days=1)
    audits.dispose()


def test_a_record_that_failed_is_audited_every_time_until_it_passes(url):
    ids = _records(url, ["complete"] * 4)
    audits = StorageAudits(url)
    first = [r["id"] for r in audits.due(cycle=4)]
    audits.record(_audited(first, lost={first[0]}))
    second = [r["id"] for r in audits.due(cycle=4)]
    assert second[0] == first[0] and len(second) == 2  # the failed one, and the day's share
    audits.record(_audited(second))  # its objects are back
    third = [r["id"] for r in audits.due(cycle=4)]
    assert first[0] not in third and len(third) == 1 and set(first + second + third) < set(ids)
    audits.dispose()


def test_a_record_no_longer_complete_leaves_the_ledger(url):
    ids = _records(url, ["complete"] * 2)
    audits = StorageAudits(url)
    audits.record(_audited(ids, lost={ids[0]}))
    with audits.engine.begin() as conn:
        conn.execute(datasets.update().where(datasets.c.id == ids[0]).values(status="failed"))
    assert [r["id"] for r in audits.due(cycle=1)] == [ids[1]]
    with audits.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT record_id FROM storage_audits")).scalars().all() == [ids[1]]
    audits.dispose()


def test_the_cycle_setting():
    assert cycle_days({}) == 7 and cycle_days({"EM_CONSISTENCY_CYCLE_DAYS": "30"}) == 30
    for bad in ("0", "1.5", "week", "-3"):
        with pytest.raises(AuditSettingError, match="EM_CONSISTENCY_CYCLE_DAYS"):
            cycle_days({"EM_CONSISTENCY_CYCLE_DAYS": bad})
