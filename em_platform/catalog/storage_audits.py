"""Which complete records the storage check audits today: every one within a cycle, not all of them every day.

Auditing every record each day costs a listing per montage on S3 and a read of every byte on a folder: at a
year's 10⁵ montages that is more than a day's work. So each record's last audit is kept (``storage_audits``,
in the catalog's database), and each evaluation takes

* every record whose last audit found lost objects (the check stays failed until they are back, and names
  them all);
* then records never audited, then those audited longest ago: as many as cover every complete record once in
  ``EM_CONSISTENCY_CYCLE_DAYS`` daily evaluations (at least one).

A record lost between two audits is found within the cycle; one that is new is audited on the next day.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from em_platform.catalog.db import datasets
from em_platform.catalog.status import Status
from em_platform.sql import JSONType, open_database

CYCLE_SETTING = "EM_CONSISTENCY_CYCLE_DAYS"
DEFAULT_CYCLE_DAYS = 7

metadata_obj = sa.MetaData()

storage_audits = sa.Table(
    "storage_audits",
    metadata_obj,
    sa.Column("record_id", sa.String(36), primary_key=True),
    sa.Column("audited_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("ok", sa.Boolean, nullable=False, index=True),
    sa.Column("problem", JSONType),  # {"missing": [...], "corrupted": [...]} of a failed audit
)


class AuditSettingError(ValueError):
    """``EM_CONSISTENCY_CYCLE_DAYS`` is not a whole number of days of at least 1."""


def cycle_days(env: Mapping[str, str] | None = None) -> int:
    raw = (os.environ if env is None else env).get(CYCLE_SETTING, "").strip()
    if not raw:
        return DEFAULT_CYCLE_DAYS
    if not raw.isdigit() or int(raw) < 1:
        raise AuditSettingError(
            f"{CYCLE_SETTING}={raw!r}: the days in which every complete record is audited once, a whole "
            "number of at least 1 (1: every record every day)"
        )
    return int(raw)


class StorageAudits:
    """The audits' ledger beside the catalog's records."""

    def __init__(self, url: str, *, create: bool = True):
        self.engine = open_database(url, metadata_obj, create=create)

    def dispose(self) -> None:
        self.engine.dispose()

    def due(self, cycle: int) -> list[dict[str, Any]]:
        """Today's complete records to audit (see the module docstring), as the catalog stores them."""
        complete = datasets.c.status == Status.COMPLETE.value
        a = storage_audits.c
        with self.engine.begin() as conn:
            # a record no longer complete (or gone) is no longer audited, nor reported from an old audit
            conn.execute(
                storage_audits.delete().where(a.record_id.not_in(sa.select(datasets.c.id).where(complete)))
            )
            total = conn.execute(sa.select(sa.func.count()).where(complete)).scalar_one()
            joined = datasets.outerjoin(storage_audits, a.record_id == datasets.c.id)
            failing = conn.execute(
                sa.select(datasets.c.record).select_from(joined).where(complete, a.ok.is_(False))
            ).all()
            rest = conn.execute(
                sa.select(datasets.c.record)
                .select_from(joined)
                .where(complete, sa.or_(a.ok.is_(None), a.ok.is_(True)))
                .order_by(sa.case((a.audited_at.is_(None), 0), else_=1), a.audited_at, datasets.c.id)
                .limit(max(1, math.ceil(total / cycle)))
            ).all()
        return [dict(r.record) for r in (*failing, *rest)]

    def record(self, audits, at: datetime | None = None) -> None:
        """Each :class:`~em_platform.storage.consistency.RecordAudit` as its record's last audit."""
        at = at or datetime.now(UTC)
        rows = [
            {
                "record_id": x.record_id,
                "audited_at": at,
                "ok": x.ok,
                "problem": None if x.ok else {"missing": list(x.missing), "corrupted": list(x.corrupted)},
            }
            for x in audits
        ]
        with self.engine.begin() as conn:
            ids = [r["record_id"] for r in rows]
            for i in range(0, len(ids), 1000):
                conn.execute(storage_audits.delete().where(storage_audits.c.record_id.in_(ids[i : i + 1000])))
            if rows:
                conn.execute(storage_audits.insert(), rows)

    def coverage(self) -> dict[str, Any]:
        """How far the audits reach: complete records, of them never audited, the oldest audit's time."""
        complete = datasets.c.status == Status.COMPLETE.value
        a = storage_audits.c
        joined = datasets.outerjoin(storage_audits, a.record_id == datasets.c.id)
        with self.engine.connect() as conn:
            total, never, oldest = conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.count().filter(a.record_id.is_(None)),
                    sa.func.min(a.audited_at),
                )
                .select_from(joined)
                .where(complete)
            ).one()
        return {"complete_records": total, "never_audited": never, "oldest_audit": oldest}
