"""Dead letters: what an entry point refused, kept in the platform database until an operator decides.

A message or entry that fails the edge checks (:mod:`em_platform.edge`) or cannot be decoded is not dropped
and not retried forever: it becomes one row here with when, where it came from (``source``: ``broker`` a STOMP
message, ``inbox`` an inbox entry, ``request`` a run's partition key, ``journal`` a journal row a sensor or a
run would not use, ``session`` a cryo session's folder or file), its topic or asset, the field and the reason,
and the raw body and headers, so it can be read, fixed and replayed. A body is kept up to
:data:`KEPT_BODY_BYTES`; of a larger one the first bytes, with the length and SHA-256 of the whole
(:class:`LetterBody`): one hostile message cannot grow the database by its own size, and an operator can still
match the letter to what was sent. A refused CLI argument is not a dead letter: the person who typed it reads the
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

from em_platform.sql import JSONType, aware, open_database

__all__ = [
    "KEPT_BODY_BYTES",
    "SOURCES",
    "DeadLetter",
    "DeadLetters",
    "LetterBody",
    "add_letter",
    "create_tables",
]

SOURCES = ("broker", "inbox", "request", "journal", "session")

KEPT_BODY_BYTES = 1 << 20
"""How much of a refused body a dead letter keeps: 1 MiB. Every consumed microscope message but one is under
1 KiB; ``montage.complete`` lists its tiles (about 130 bytes each), so 1 MiB keeps it whole, and replayable, up
to about 8,000 tiles (90 × 90; the Allen TEMCA montages are about 70 × 70). Past it the first 1 MiB is kept
with the length and SHA-256 of the whole body: enough to read what was sent and why it was refused."""

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
    sa.Column("body", sa.Text, nullable=False),  # at most KEPT_BODY_BYTES of it (body_truncated)
    sa.Column("headers", JSONType),
    sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("times", sa.Integer, nullable=False),
    sa.Column("cleared_at", sa.DateTime(timezone=True), index=True),
    sa.Column("resolution", sa.Text),  # "cleared" or "replayed", with who/what when known
    # added after the first release (NULL in its rows, whose bodies are whole): see _add_columns
    sa.Column("body_bytes", sa.BigInteger),  # length of the whole body
    sa.Column("body_sha256", sa.String(64)),  # of the whole body
    sa.Column("body_truncated", sa.Boolean),  # only the first KEPT_BODY_BYTES are in ``body``
)

_ADDED_COLUMNS = ("body_bytes", "body_sha256", "body_truncated")


def create_tables(engine: Engine) -> None:
    metadata_obj.create_all(engine)
    _add_columns(engine)


def _add_columns(engine: Engine) -> None:
    """Bring a ``dead_letters`` table made by an earlier release up to this one.

    The platform's tables are made by ``create_all``, which creates a missing table but never a missing column;
    the columns added since are nullable, so ``ALTER TABLE ... ADD COLUMN`` (PostgreSQL and SQLite alike) keeps
    every row valid. Two processes starting at once may both try: the one that loses finds the column there.
    """

    def present() -> set[str]:
        return {c["name"] for c in sa.inspect(engine).get_columns(dead_letters.name)}

    have = present()
    for name in _ADDED_COLUMNS:
        if name in have:
            continue
        kind = dead_letters.c[name].type.compile(dialect=engine.dialect)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f"ALTER TABLE {dead_letters.name} ADD COLUMN {name} {kind}"))
        except sa.exc.DBAPIError:
            if name not in present():
                raise


def _body_bytes(body: str | bytes | Any) -> bytes:
    """A body as the bytes that arrived: bytes as given, text as UTF-8, anything else as sorted JSON."""
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8", "surrogatepass")
    return json.dumps(body, sort_keys=True, default=str).encode()


def _whole_characters(data: bytes) -> bytes:
    """``data`` without the UTF-8 character its end may cut in two (a cut body stays readable text)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return data
        if byte >= 0xC0:  # the lead byte of the last character: is the character whole?
            size = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= size else data[:-back]
    return data


@dataclass(frozen=True)
class LetterBody:
    """A refused body as its dead letter keeps it: at most :data:`KEPT_BODY_BYTES` of it (cut between two
    characters), with the length and SHA-256 of the whole body, so the letter still identifies the message."""

    text: str
    length: int  # bytes of the whole body
    sha256: str  # hex digest of the whole body
    truncated: bool

    @classmethod
    def of(cls, body: str | bytes | Any) -> LetterBody:
        """The kept form of a body that is here whole."""
        data = _body_bytes(body)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) <= KEPT_BODY_BYTES:
            return cls(_text(body), len(data), digest, False)
        return cls.cut(data[:KEPT_BODY_BYTES], len(data), digest)

    @classmethod
    def cut(cls, head: bytes, length: int, sha256: str) -> LetterBody:
        """The kept form of a body of which only ``head`` was read (the rest streamed past: the listener's
        message bound); ``length`` and ``sha256`` are those of the whole body."""
        kept = bytes(head[:KEPT_BODY_BYTES])
        if len(kept) < length:
            kept = _whole_characters(kept)
        return cls(kept.decode("utf-8", "backslashreplace"), length, sha256, len(kept) < length)

    def describe(self) -> str:
        """How much was kept, in the words the CLI and the logs use."""
        kept = len(self.text.encode("utf-8", "surrogatepass"))
        return f"body truncated: first {kept:,} of {self.length:,} bytes kept, sha256 {self.sha256}"


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
    body_bytes: int = 0  # length of the whole body (``body`` holds at most KEPT_BODY_BYTES of it)
    body_sha256: str = ""  # of the whole body
    body_truncated: bool = False

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        for k in ("first_at", "last_at", "cleared_at"):
            d[k] = d[k].isoformat() if d[k] else None
        return d

    def line(self) -> str:
        times = f" (x{self.times})" if self.times > 1 else ""
        state = f" [{self.resolution}]" if self.cleared_at else ""
        cut = f" [{self.kept().describe()}]" if self.body_truncated else ""
        return (
            f"#{self.id} {self.last_at:%Y-%m-%d %H:%M:%S} {self.source} {self.topic} field {self.field}: "
            f"{self.reason}{times}{state}{cut}"
        )

    def kept(self) -> LetterBody:
        return LetterBody(self.body, self.body_bytes, self.body_sha256, self.body_truncated)


def _letter(r) -> DeadLetter:
    if r.body_sha256 is None:  # a row of the first release: its body is whole
        whole = LetterBody.of(r.body)
        size, digest, truncated = whole.length, whole.sha256, False
    else:
        size, digest, truncated = int(r.body_bytes), r.body_sha256, bool(r.body_truncated)
    return DeadLetter(
        r.id,
        r.source,
        r.topic,
        r.field,
        r.reason,
        r.body,
        r.headers,
        aware(r.first_at),
        aware(r.last_at),
        r.times,
        aware(r.cleared_at),
        r.resolution,
        size,
        digest,
        truncated,
    )


def _text(body: str | bytes | Any) -> str:
    if isinstance(body, bytes):
        return body.decode("utf-8", "backslashreplace")
    if isinstance(body, str):
        return body
    return json.dumps(body, sort_keys=True, default=str)


def add_letter(
    engine: Engine,
    *,
    source: str,
    topic: str,
    field: str,
    reason: str,
    body: str | bytes | LetterBody | Any,
    headers: dict[str, Any] | None = None,
) -> int:
    """Record one refusal, committed when this returns; the row's id (an existing row's if it came before).

    The one writer of dead letters (:class:`DeadLetters` and the acquisition journal both call it). ``body``
    is kept up to :data:`KEPT_BODY_BYTES` (:class:`LetterBody`); pass a :class:`LetterBody` for a body that
    was never read whole."""
    for attempt in (1, 2):
        try:
            with engine.begin() as conn:
                return _upsert_letter(
                    conn, source=source, topic=topic, field=field, reason=reason, body=body, headers=headers
                )
        except sa.exc.IntegrityError:
            if attempt == 2:  # two writers inserted the same letter at once: the retry updates it
                raise
    raise AssertionError("unreachable")


def _upsert_letter(
    conn: Connection,
    *,
    source: str,
    topic: str,
    field: str,
    reason: str,
    body: str | bytes | LetterBody | Any,
    headers: dict[str, Any] | None,
) -> int:
    """One refusal in ``conn``'s transaction: a new row, or the same letter's row counted once more."""
    if source not in SOURCES:
        raise ValueError(f"dead-letter source {source!r} is not one of {', '.join(SOURCES)}")
    if isinstance(body, LetterBody):  # only its digest stands for the whole
        kept, whole = body, f"sha256:{body.sha256}"
    else:
        kept, whole = LetterBody.of(body), _text(body)
    key = hashlib.sha256(f"{source}\n{topic}\n{field}\n{whole}".encode("utf-8", "surrogatepass")).hexdigest()
    sizes = {"body_bytes": kept.length, "body_sha256": kept.sha256, "body_truncated": kept.truncated}
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
                **sizes,
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
                body=kept.text,
                **sizes,
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
            _add_columns(engine)
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
        body: str | bytes | LetterBody | Any,
        headers: dict[str, Any] | None = None,
    ) -> int:
        """Record one refusal (committed when this returns; see :func:`add_letter`)."""
        return add_letter(
            self.engine, source=source, topic=topic, field=field, reason=reason, body=body, headers=headers
        )

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

    def forget_decided(self, before: datetime) -> int:
        """Delete the letters decided (cleared or replayed) before ``before``; a waiting letter is never
        deleted. The number deleted."""
        q = dead_letters.delete().where(
            dead_letters.c.cleared_at.is_not(None), dead_letters.c.cleared_at < before
        )
        with self.engine.begin() as conn:
            return int(conn.execute(q).rowcount or 0)
