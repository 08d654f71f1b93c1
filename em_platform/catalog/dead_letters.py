"""Dead letters: what an entry point refused, kept in the platform database until an operator decides.

A message or entry that fails the edge checks (:mod:`em_platform.edge`) or cannot be decoded is not dropped
and not retried forever: it becomes one row here with when, where it came from (``source``: ``broker`` a STOMP
message, ``inbox`` an inbox entry, ``request`` a run's partition key, ``journal`` a journal row a sensor or a
run would not use), its topic or asset, the field and the reason, and the raw body and headers, so it can be
read, fixed and replayed. A refused CLI argument is not a dead letter: the person who typed it reads the
refusal at once (exit status 2). The same refusal arriving again (a broker redelivery, the
same inbox entry) updates its row (``times``, ``last_at``) instead of adding one, and brings a cleared
row back: nothing an operator cleared hides a new occurrence.

Operators see them with ``em-platform dead-letters`` and in the Dagster UI (``dead_letter_sensor`` fails
its ticks while any are waiting), and clear or replay them from the CLI. No Dagster here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from em_platform.sql import JSONType, open_database

__all__ = ["SOURCES", "DeadLetter", "DeadLetters", "create_tables"]

SOURCES = ("broker", "inbox", "request", "journal")

metadata_obj = sa.MetaData()

dead_letters = sa.Table(
    "dead_letters",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("letter_key", sa.String(64), nullable=False, unique=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("topic", sa.String(200), nullable=False),  # the broker topic, inbox entry or asset it was for
    sa.Column("field", sa.String(200), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("headers", JSONType),
    sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("times", sa.Integer, nullable=False),
    sa.Column("cleared_at", sa.DateTime(timezone=True), index=True),
    sa.Column("resolution", sa.Text),  # "cleared" or "replayed", with who/what when known
)


def create_tables(engine: Engine) -> None:
    metadata_obj.create_all(engine)


@dataclass(frozen=True)
class DeadLetter:
    id: int
    source: str
    topic: str
    field: str
    reason: str
    body: str
    headers: dict[str, Any] | None
    first_at: datetime
    last_at: datetime
    times: int
    cleared_at: datetime | None
    resolution: str | None

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        for k in ("first_at", "last_at", "cleared_at"):
            d[k] = d[k].isoformat() if d[k] else None
        return d

    def line(self) -> str:
        times = f" (x{self.times})" if self.times > 1 else ""
        state = f" [{self.resolution}]" if self.cleared_at else ""
        return (
            f"#{self.id} {self.last_at:%Y-%m-%d %H:%M:%S} {self.source} {self.topic} field {self.field}: "
            f"{self.reason}{times}{state}"
        )


def _aware(ts: datetime | None) -> datetime | None:
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


def _letter(r) -> DeadLetter:
    return DeadLetter(
        r.id,
        r.source,
        r.topic,
        r.field,
        r.reason,
        r.body,
        r.headers,
        _aware(r.first_at),
        _aware(r.last_at),
        r.times,
        _aware(r.cleared_at),
        r.resolution,
    )


def _text(body: str | bytes | Any) -> str:
    if isinstance(body, bytes):
        return body.decode("utf-8", "backslashreplace")
    if isinstance(body, str):
        return body
    return json.dumps(body, sort_keys=True, default=str)


def add_letter(
    conn: Connection,
    *,
    source: str,
    topic: str,
    field: str,
    reason: str,
    body: str | bytes | Any,
    headers: dict[str, Any] | None = None,
) -> int:
    """Record one refusal in the caller's transaction; the row's id (an existing row's if it came before)."""
    if source not in SOURCES:
        raise ValueError(f"dead-letter source {source!r} is not one of {', '.join(SOURCES)}")
    text = _text(body)
    key = hashlib.sha256(f"{source}\n{topic}\n{field}\n{text}".encode()).hexdigest()
    now = datetime.now(UTC)
    row = conn.execute(sa.select(dead_letters.c.id).where(dead_letters.c.letter_key == key)).first()
    if row is not None:
        conn.execute(
            dead_letters.update()
            .where(dead_letters.c.id == row.id)
            .values(
                times=dead_letters.c.times + 1,
                last_at=now,
                reason=reason[:4000],
                cleared_at=None,
                resolution=None,
            )
        )
        return int(row.id)
    return int(
        conn.execute(
            dead_letters.insert()
            .values(
                letter_key=key,
                source=source,
                topic=topic[:200],
                field=field[:200],
                reason=reason[:4000],
                body=text,
                headers=json.loads(json.dumps(headers, default=str)) if headers else None,
                first_at=now,
                last_at=now,
                times=1,
            )
            .returning(dead_letters.c.id)
        ).scalar_one()
    )


class DeadLetters:
    """The dead letters of one platform database (the catalog URL; the journal shares it)."""

    def __init__(self, url: str | None = None, *, engine: Engine | None = None):
        if engine is None:
            if url is None:
                raise ValueError("give the database URL (EM_CATALOG_URL) or an engine")
            engine = open_database(url, metadata_obj)
            self._own = True
        else:
            create_tables(engine)
            self._own = False
        self.engine = engine

    def dispose(self) -> None:
        if self._own:
            self.engine.dispose()

    def add(
        self,
        *,
        source: str,
        topic: str,
        field: str,
        reason: str,
        body: str | bytes | Any,
        headers: dict[str, Any] | None = None,
    ) -> int:
        """Record one refusal (committed when this returns)."""
        for attempt in (1, 2):
            try:
                with self.engine.begin() as conn:
                    return add_letter(
                        conn,
                        source=source,
                        topic=topic,
                        field=field,
                        reason=reason,
                        body=body,
                        headers=headers,
                    )
            except sa.exc.IntegrityError:
                if attempt == 2:  # two writers inserted the same letter at once: the retry updates it
                    raise
        raise AssertionError("unreachable")

    def letters(self, *, include_cleared: bool = False, source: str | None = None) -> list[DeadLetter]:
        """Oldest first; only those waiting for a decision unless ``include_cleared``."""
        q = sa.select(dead_letters).order_by(dead_letters.c.id)
        if not include_cleared:
            q = q.where(dead_letters.c.cleared_at.is_(None))
        if source:
            q = q.where(dead_letters.c.source == source)
        with self.engine.connect() as conn:
            return [_letter(r) for r in conn.execute(q)]

    def waiting_count(self) -> int:
        q = sa.select(sa.func.count()).select_from(dead_letters).where(dead_letters.c.cleared_at.is_(None))
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def get(self, letter_id: int) -> DeadLetter | None:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(dead_letters).where(dead_letters.c.id == letter_id)).first()
        return _letter(r) if r is not None else None

    def clear(self, ids: list[int] | None, resolution: str = "cleared") -> int:
        """Mark letters decided (all waiting ones when ``ids`` is None); they stay listed with ``--all``."""
        q = (
            dead_letters.update()
            .where(dead_letters.c.cleared_at.is_(None))
            .values(cleared_at=datetime.now(UTC), resolution=resolution)
        )
        if ids is not None:
            q = q.where(dead_letters.c.id.in_(ids))
        with self.engine.begin() as conn:
            return int(conn.execute(q).rowcount or 0)
