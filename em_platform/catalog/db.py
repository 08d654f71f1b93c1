"""The catalog database (SQLAlchemy): dataset records with their status history.

SQLite file by default, PostgreSQL in production. Every status change goes through
:func:`check_transition` inside one transaction, so two runs cannot race a record into a state the
machine forbids, and the record is validated against the schema before it is stored.
"""

from __future__ import annotations

import traceback as tb
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from em_platform.catalog.records import deep_merge, iso, new_record, utc_now
from em_platform.catalog.schema import validate_record
from em_platform.catalog.status import IN_FLIGHT, OWNED_BY_A_RUN, Status, check_transition
from em_platform.sql import DatabaseUnavailable, JSONType, open_database
from em_platform.storage.disk_full import disk_full

metadata_obj = sa.MetaData()

datasets = sa.Table(
    "datasets",
    metadata_obj,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("source_id", sa.String(512), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("retry_count", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text),
    sa.Column("record", JSONType, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("source", "source_id", name="uq_dataset_source"),
)

status_history = sa.Table(
    "dataset_status_history",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "dataset_id",
        sa.String(36),
        sa.ForeignKey("datasets.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("from_status", sa.String(16)),
    sa.Column("to_status", sa.String(16), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("message", sa.Text),
    sa.Column("run_id", sa.String(64)),
)


CatalogUnavailable = DatabaseUnavailable


@dataclass(frozen=True)
class HistoryEntry:
    from_status: str | None
    to_status: str
    at: datetime
    message: str | None
    run_id: str | None


class CatalogDB:
    """Dataset records and their status history in one SQL database."""

    def __init__(self, url: str, *, create: bool = True):
        self.url = url
        self.engine: Engine = open_database(url, metadata_obj, create=create)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- reads ---------------------------------------------------------------------------------

    def get(self, dataset_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(datasets.c.record).where(datasets.c.id == dataset_id)).first()
        return dict(row.record) if row else None

    def find(self, source: str, source_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(datasets.c.record).where(
                    datasets.c.source == source, datasets.c.source_id == source_id
                )
            ).first()
        return dict(row.record) if row else None

    def records(self, source: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(datasets.c.record).order_by(datasets.c.source, datasets.c.source_id)
        if source:
            query = query.where(datasets.c.source == source)
        with self.engine.connect() as conn:
            return [dict(r.record) for r in conn.execute(query)]

    def complete_before(self, source: str, before: datetime, source_ids: Iterable[str]) -> list[str]:
        """Which of ``source_ids`` have a ``source`` record complete since before ``before`` (its last change):
        what a retention policy may let go of elsewhere, the record itself staying."""
        wanted, found = list(source_ids), []
        for i in range(0, len(wanted), 1000):
            query = sa.select(datasets.c.source_id).where(
                datasets.c.source == source,
                datasets.c.source_id.in_(wanted[i : i + 1000]),
                datasets.c.status == Status.COMPLETE.value,
                datasets.c.updated_at < before,
            )
            with self.engine.connect() as conn:
                found += [r.source_id for r in conn.execute(query)]
        return found

    def complete_ids_before(self, source: str, before: datetime) -> list[str]:
        """Every ``source`` record complete since before ``before``, by source id."""
        query = sa.select(datasets.c.source_id).where(
            datasets.c.source == source,
            datasets.c.status == Status.COMPLETE.value,
            datasets.c.updated_at < before,
        )
        with self.engine.connect() as conn:
            return [r.source_id for r in conn.execute(query.order_by(datasets.c.source_id))]

    def statuses(self, source: str, source_ids: Iterable[str]) -> dict[str, tuple[str, datetime]]:
        """(status, last change, UTC) of the ``source`` records of ``source_ids`` there are."""
        wanted, found = list(source_ids), {}
        for i in range(0, len(wanted), 1000):
            query = sa.select(datasets.c.source_id, datasets.c.status, datasets.c.updated_at).where(
                datasets.c.source == source, datasets.c.source_id.in_(wanted[i : i + 1000])
            )
            with self.engine.connect() as conn:
                for r in conn.execute(query):
                    at = r.updated_at if r.updated_at.tzinfo else r.updated_at.replace(tzinfo=UTC)
                    found[r.source_id] = (r.status, at)
        return found

    def history(self, dataset_id: str) -> list[HistoryEntry]:
        h = status_history
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(h.c.from_status, h.c.to_status, h.c.at, h.c.message, h.c.run_id)
                .where(h.c.dataset_id == dataset_id)
                .order_by(h.c.id)
            )
            return [HistoryEntry(*r) for r in rows]

    def completions_after(self, history_id: int | None) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
        """The records that became complete after status-history row ``history_id`` ((source, record), in
        order) and the newest row's id, the cursor of the next call. None reads no completion: where to start."""
        h = status_history
        with self.engine.connect() as conn:
            newest = conn.execute(sa.select(sa.func.max(h.c.id))).scalar() or 0
            if history_id is None:
                return newest, []
            rows = conn.execute(
                sa.select(datasets.c.source, datasets.c.record)
                .join(h, h.c.dataset_id == datasets.c.id)
                .where(h.c.id > history_id, h.c.id <= newest, h.c.to_status == Status.COMPLETE.value)
                .order_by(h.c.id)
            )
            return newest, [(r.source, dict(r.record)) for r in rows]

    # -- writes --------------------------------------------------------------------------------

    def begin(
        self,
        source: str,
        source_id: str,
        *,
        description: str,
        files: list[dict[str, Any]],
        run_id: str | None = None,
    ) -> dict[str, Any]:
        """Create the record in 'pending', or bring an existing one back to 'pending' for a new attempt.

        A record left 'processing'/'saving-data' by a run that died is first marked failed
        ("interrupted"), so the history shows what happened and the retry count goes up.
        """
        now = utc_now()
        with self._tx() as conn:
            row = self._lock(conn, source=source, source_id=source_id)
            if row is None:
                record = new_record(source, source_id, description, files, now)
                validate_record(record)
                conn.execute(
                    datasets.insert().values(
                        id=record["id"],
                        source=source,
                        source_id=source_id,
                        status="pending",
                        retry_count=0,
                        record=record,
                        created_at=now,
                        updated_at=now,
                    )
                )
                self._log(conn, record["id"], None, Status.PENDING, now, "record created", run_id)
                return record
            record = dict(row.record)
            status = Status(record["status"])
            if status in IN_FLIGHT:
                holder = self._holder(conn, record["id"])
                record = self._apply(
                    conn,
                    record,
                    Status.FAILED,
                    now,
                    run_id,
                    error=f"interrupted: {f'run {holder}' if holder else 'the run working on it'} stopped "
                    f"while the record was {status.value!r}",
                )
                status = Status.FAILED
            update = {"metadata": {"core": {"description": description}}, "files": {"source": files}}
            if status is not Status.PENDING:
                record = self._apply(
                    conn, record, Status.PENDING, now, run_id, update=update, message="new attempt"
                )
            else:
                record = self._store(conn, deep_merge(record, update), now)
            return record

    def transition(
        self,
        dataset_id: str,
        new_status: Status | str,
        *,
        update: dict[str, Any] | None = None,
        error: BaseException | str | None = None,
        message: str | None = None,
        run_id: str | None = None,
    ) -> dict[str, Any]:
        """Move a record to ``new_status`` (raising IllegalTransition if the machine forbids it)."""
        now = utc_now()
        with self._tx() as conn:
            row = self._lock(conn, dataset_id=dataset_id)
            if row is None:
                raise KeyError(f"no catalog record with id {dataset_id}")
            return self._apply(
                conn,
                dict(row.record),
                Status(new_status),
                now,
                run_id,
                update=update,
                error=error,
                message=message,
            )

    def release_run(
        self, run_id: str, reason: str, *, status: Status | str = Status.FAILED
    ) -> list[dict[str, Any]]:
        """Records a run left unfinished (pending, processing or saving-data, their last status change made
        by ``run_id``) go to ``status`` (failed, or cancelled for a cancelled run) with ``reason``; returns
        them. The status history says which run owns a record: a record a later run has taken over is
        left alone, and a record the run itself finished or failed is not in flight. Safe to repeat."""
        new = Status(status)
        h = status_history
        last = sa.select(h.c.dataset_id, sa.func.max(h.c.id).label("id")).group_by(h.c.dataset_id).subquery()
        owned = (
            sa.select(datasets.c.id)
            .join(last, last.c.dataset_id == datasets.c.id)
            .join(h, h.c.id == last.c.id)
            .where(h.c.run_id == run_id, datasets.c.status.in_([s.value for s in OWNED_BY_A_RUN]))
        )
        released = []
        with self._tx() as conn:
            for (dataset_id,) in conn.execute(owned).all():
                row = self._lock(conn, dataset_id=dataset_id)
                if row is not None and Status(row.record["status"]) in OWNED_BY_A_RUN:
                    error = reason if new is Status.FAILED else None
                    message = None if new is Status.FAILED else reason
                    released.append(
                        self._apply(
                            conn, dict(row.record), new, utc_now(), run_id, error=error, message=message
                        )
                    )
        return released

    def update(self, dataset_id: str, update: dict[str, Any]) -> dict[str, Any]:
        """Merge fields into a record without changing its status."""
        now = utc_now()
        with self._tx() as conn:
            row = self._lock(conn, dataset_id=dataset_id)
            if row is None:
                raise KeyError(f"no catalog record with id {dataset_id}")
            return self._store(conn, deep_merge(dict(row.record), update), now)

    # -- internals -----------------------------------------------------------------------------

    def _lock(
        self,
        conn: Connection,
        *,
        dataset_id: str | None = None,
        source: str | None = None,
        source_id: str | None = None,
    ):
        query = sa.select(datasets.c.id, datasets.c.record)
        query = (
            query.where(datasets.c.id == dataset_id)
            if dataset_id
            else query.where(datasets.c.source == source, datasets.c.source_id == source_id)
        )
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        return conn.execute(query).first()

    def _apply(
        self,
        conn: Connection,
        record: dict[str, Any],
        new: Status,
        now: datetime,
        run_id: str | None,
        *,
        update: dict[str, Any] | None = None,
        error: BaseException | str | None = None,
        message: str | None = None,
    ) -> dict[str, Any]:
        old = Status(record["status"])
        check_transition(old, new)
        record = deep_merge(record, update or {})
        record["status"] = new.value
        record.setdefault("progress", {})["current_step"] = new.value
        if new is Status.FAILED:
            retries = int(record.get("error", {}).get("retry_count", 0)) + 1
            if isinstance(error, BaseException):
                text = disk_full(error) or f"{type(error).__name__}: {error}"
                trace = "".join(tb.format_exception(error))[-8000:]
            else:
                text, trace = str(error or message or "failed"), None
            record["error"] = {"message": text, "retry_count": retries} | (
                {"traceback": trace} if trace else {}
            )
            message = text
        self._store(conn, record, now)
        self._log(conn, record["id"], old, new, now, message, run_id)
        return record

    def _store(self, conn: Connection, record: dict[str, Any], now: datetime) -> dict[str, Any]:
        record["updated_at"] = iso(now)
        validate_record(record)
        err = record.get("error", {}).get("message") if record["status"] == "failed" else None
        conn.execute(
            datasets.update()
            .where(datasets.c.id == record["id"])
            .values(
                status=record["status"],
                record=record,
                updated_at=now,
                error=err,
                retry_count=int(record.get("error", {}).get("retry_count", 0)),
            )
        )
        return record

    @staticmethod
    def _holder(conn: Connection, dataset_id: str) -> str | None:
        """The run that made the record's last status change (the one holding it while it is in flight)."""
        h = status_history
        return conn.execute(
            sa.select(h.c.run_id).where(h.c.dataset_id == dataset_id).order_by(h.c.id.desc()).limit(1)
        ).scalar()

    @staticmethod
    def _log(conn, dataset_id, old, new, now, message, run_id) -> None:
        conn.execute(
            status_history.insert().values(
                dataset_id=dataset_id,
                from_status=old.value if old else None,
                to_status=Status(new).value,
                at=now,
                message=message,
                run_id=run_id,
            )
        )
