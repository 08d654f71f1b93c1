"""The acquisition journal: every acquisition message, the montages and tiles it describes, and their results.

A broker keeps no topic message for a consumer that is not connected, so the listener writes each
message here (and acknowledges it only after the commit); the sensor and the runs read the journal,
never the broker. The embedded scope simulator writes the same messages here directly. A message is
identified by a digest of its topic and body, so a redelivered message changes nothing.

``messages.seq`` is a monotonically increasing high-water mark: a montage's ``seq`` is the sequence
number of the first message that mentioned it, which is what the montage sensor's cursor follows.

Every writer goes through :meth:`Journal.record`, so the edge checks (:func:`em_platform.edge.check_tem_message`:
safe montage and tile ids, rows, columns, planned tiles and stage positions within the montage bounds, and with
``tile_shares`` a tile path on a scope share) guard the listener and the
embedded simulator alike; a refusal raises :class:`~em_platform.edge.Refused` before anything is written, and
:meth:`Journal.dead_letter` keeps the refused message in the same database.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from em_platform.catalog.dead_letters import add_letter, create_tables
from em_platform.edge import MontageBounds, check_tem_message
from em_platform.sql import JSONType, aware, open_database

metadata_obj = sa.MetaData()

messages = sa.Table(
    "acq_messages",
    metadata_obj,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("message_key", sa.String(64), nullable=False, unique=True),
    sa.Column("topic", sa.String(64), nullable=False),
    sa.Column("montage_id", sa.String(64), index=True),
    sa.Column("tile_id", sa.String(64)),
    sa.Column("payload", JSONType, nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
)

montages = sa.Table(
    "acq_montages",
    metadata_obj,
    sa.Column("montage_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False),  # TEM_comms MontageState values
    sa.Column("total_tiles", sa.Integer),
    sa.Column("acquisition_id", sa.String(64)),
    sa.Column("pixel_size_nm", sa.Float),
    sa.Column("rotation_angle", sa.Float),
    sa.Column("roi_id", sa.String(128)),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("error_message", sa.Text),
    sa.Column("complete_message", JSONType),
)

tiles = sa.Table(
    "acq_tiles",
    metadata_obj,
    sa.Column("tile_id", sa.String(64), primary_key=True),
    sa.Column("montage_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False, index=True),
    sa.Column("raster_index", sa.Integer),
    sa.Column("row", sa.Integer, nullable=False),
    sa.Column("column", sa.Integer, nullable=False),
    sa.Column("overlap", sa.Integer),
    sa.Column("stage_x_nm", sa.Integer),
    sa.Column("stage_y_nm", sa.Integer),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("brightfield", sa.Boolean, nullable=False, default=False),
    sa.Column("darkfield", sa.Boolean, nullable=False, default=False),
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
    # per-tile results, filled in by processing
    sa.Column("status", sa.String(16), nullable=False, default="acquired"),  # acquired | processed | failed
    sa.Column("results", JSONType),
    sa.Column("qc_passed", sa.Boolean),
    sa.Column("qc_faults", JSONType),
    sa.Column("error", sa.Text),
    sa.Column("processed_at", sa.DateTime(timezone=True)),
)

qc_status = sa.Table(
    "acq_qc_status",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("montage_id", sa.String(64), index=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
)

# Who is judging a montage's tiles right now (the warm live-QC service or a Dagster run): one at a time, so
# no tile is judged twice. A holder renews its claim; one that died loses it when ``expires_at`` passes.
judges = sa.Table(
    "acq_montage_judges",
    metadata_obj,
    sa.Column("montage_id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)

# A montage whose journal rows were let go after it was archived (em_platform.retention): its row stays, so a
# late message for it changes nothing and no sensor takes it for a new montage; a run of it is refused.
RETIRED = "retired"
FINISHED_STATES = frozenset({"completed", "cancelled", "error", RETIRED})

# Where a watcher starts (Journal.live_since): the montages still being acquired, and those changed lately, are
# a handful among a year's 10^5; without these indexes the query read every montage row (0.57 s at 10^5 on
# PostgreSQL, the live-QC service's first look after a restart). The predicate is SQL text, the same in the
# index and the query, so that PostgreSQL and SQLite alike see that the index answers it.
UNFINISHED = sa.text("state NOT IN (" + ", ".join(f"'{s}'" for s in sorted(FINISHED_STATES)) + ")")
sa.Index(
    "ix_acq_montages_unfinished_seq", montages.c.seq, postgresql_where=UNFINISHED, sqlite_where=UNFINISHED
)
sa.Index("ix_acq_montages_updated_at", montages.c.updated_at)
# A run's poll (Journal.tiles: one montage's tiles after a journal position, every 0.1 s): one range of this
# index. With an index on each column PostgreSQL intersected the montage's rows with every tile after the
# position, all of them before the montage's first tile (29 ms a poll against 5 x 10^5 journaled tiles).
sa.Index("ix_acq_tiles_montage_seq", tiles.c.montage_id, tiles.c.seq)


def message_key(topic: str, payload: dict[str, Any]) -> str:
    """Identity of a message: the same topic and body (a redelivery) give the same key."""
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{topic}\n{body}".encode()).hexdigest()


@dataclass(frozen=True)
class MontageRow:
    montage_id: str
    seq: int
    state: str
    total_tiles: int | None
    pixel_size_nm: float | None
    updated_at: datetime
    error_message: str | None
    acquisition_id: str | None = None
    completed_at: datetime | None = None
    rotation_angle: float | None = None  # montage.complete: image axes -> stage axes, radians
    announced_complete: bool = False  # a montage.complete (which names the tiles) is journaled

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def retired(self) -> bool:
        return self.state == RETIRED


@dataclass(frozen=True)
class TileReport:
    """One judged tile as it is committed: its outgoing messages (``tile.*``, ``qc.tile``) and the status,
    results and QC that become its :class:`TileRow`'s (see :meth:`Journal.save_tile_results`)."""

    tile_id: str
    outgoing: list[tuple[str, dict[str, Any]]]
    status: str
    results: dict[str, Any] | None = None
    qc_passed: bool | None = None
    qc_faults: list[dict[str, Any]] | None = None
    error: str | None = None


@dataclass(frozen=True)
class OpenMontage:
    """A montage being acquired, as an operator's dashboard counts it (:meth:`Journal.open_montages`)."""

    montage_id: str
    last_arrival: datetime  # its newest tile's, or when the montage started if it has none yet
    a_tile_path: str | None  # one of its tiles' files (which scope share it is on), None before its first
    unjudged: int  # montage tiles without a verdict yet


@dataclass(frozen=True)
class TileRow:
    """A tile as the journal holds it: its ``tile.raw`` (place, stage position, file) and, once judged, the
    results, QC and error its :class:`TileReport` committed."""

    tile_id: str
    montage_id: str
    seq: int
    raster_index: int | None
    row: int
    column: int
    overlap: int | None
    stage_x_nm: int | None
    stage_y_nm: int | None
    path: str
    brightfield: bool
    darkfield: bool
    acquired_at: datetime
    status: str
    results: dict | None
    qc_passed: bool | None
    qc_faults: list | None
    error: str | None
    processed_at: datetime | None = None  # when its verdict was committed

    @property
    def is_reference(self) -> bool:
        """A brightfield or darkfield frame for flatfield correction, not part of the montage image."""
        return self.brightfield or self.darkfield


def _now() -> datetime:
    return datetime.now(UTC)


class Journal:
    """Acquisition messages, montages, tiles and per-tile results in the platform database."""

    def __init__(
        self,
        url: str,
        *,
        create: bool = True,
        tile_shares: Iterable[str | os.PathLike[str]] | None = None,
        montage_bounds: MontageBounds | None = None,
    ):
        """``tile_shares``: the folders a ``tile.raw`` path must lie in (EM_SCOPE_SHARES); None leaves tile
        paths unchecked here (a library caller that trusts its scope; every entry point passes them).
        ``montage_bounds``: the largest montage accepted; None reads EM_MONTAGE_MAX_GRID / EM_STAGE_MAX_NM."""
        self.url = url
        self.tile_shares = None if tile_shares is None else tuple(tile_shares)
        self.montage_bounds = montage_bounds or MontageBounds.from_env()
        self.engine = open_database(url, metadata_obj, create=create)
        if create:
            create_tables(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    # -- writing messages -------------------------------------------------------------------------

    def record(self, topic: str, payload: dict[str, Any], *, received_at: datetime | None = None) -> bool:
        """Store one message and apply it to montages/tiles, atomically. False if it was already recorded.

        Raises :class:`~em_platform.edge.Refused` (nothing written) for an unsafe id, a size past the montage
        bounds or a tile off the shares.
        """
        check_tem_message(topic, payload, self.tile_shares, self.montage_bounds)
        with self.engine.begin() as conn:
            return _record(conn, topic, payload, received_at or _now())

    def dead_letter(
        self,
        source: str,
        topic: str,
        field: str,
        reason: str,
        body: str | bytes | Any,
        headers: dict[str, Any] | None = None,
    ) -> int:
        """Keep a refused message (see :func:`em_platform.catalog.dead_letters.add_letter`); committed when
        this returns."""
        return add_letter(
            self.engine, source=source, topic=topic, field=field, reason=reason, body=body, headers=headers
        )

    def record_tile_reports(self, reports: Sequence[TileReport]) -> None:
        """Judged tiles' outgoing messages and results, all in one commit.

        One transaction for every tile judged since the last one instead of one per message: on SQLite
        each commit is an fsync, and two scopes' montages judge six tiles a second. The outgoing messages
        are JSON-ready TEM_comms payloads of topics the journal does not apply; one already journaled
        (a re-processed montage) is skipped.
        """
        if not reports:
            return
        now = _now()
        rows = [
            {
                "message_key": message_key(topic, payload),
                "topic": topic,
                "montage_id": payload.get("montage_id") or None,
                "tile_id": payload.get("tile_id"),
                "payload": payload,
                "received_at": now,
            }
            for r in reports
            for topic, payload in r.outgoing
        ]
        results = [
            {
                "_tile_id": r.tile_id,
                "_status": r.status,
                "_results": r.results,
                "_qc_passed": r.qc_passed,
                "_qc_faults": r.qc_faults,
                "_error": r.error,
                "_processed_at": now,
            }
            for r in reports
        ]
        with self.engine.begin() as conn:
            if rows:
                conn.execute(_insert_new(conn, messages, "message_key"), rows)
            conn.execute(_RESULTS_UPDATE, results)

    def save_match_results(self, tile_id: str, matches: dict[str, Any]) -> None:
        """Matches measured after the tile's verdict (a neighbour that arrived later) join its results."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(tiles.c.results).where(tiles.c.tile_id == tile_id)).first()
            if row is None or row.results is None:
                return
            results = dict(row.results)
            results["matches"] = {**(results.get("matches") or {}), **matches}
            conn.execute(tiles.update().where(tiles.c.tile_id == tile_id).values(results=results))

    # -- reading --------------------------------------------------------------------------------------

    def montages_after(self, seq: int, limit: int = 1000) -> list[MontageRow]:
        """Montages first seen after high-water mark ``seq``, oldest first."""
        q = sa.select(*_montage_cols()).where(montages.c.seq > seq).order_by(montages.c.seq).limit(limit)
        with self.engine.connect() as conn:
            return [_montage(r) for r in conn.execute(q)]

    def live_since(self, recent: datetime) -> int:
        """A journal position to watch montages from: just before the oldest montage still being acquired or
        changed at or after ``recent``, else the newest montage's. A watcher that starts from 0 would page
        through every montage a year holds before it saw the one being acquired now."""
        c = montages.c
        # two queries, each on its index (an OR of both would read them all)
        with self.engine.connect() as conn:
            found = [
                conn.execute(sa.select(sa.func.min(c.seq)).where(UNFINISHED)).scalar_one(),
                # seq + 0: not the seq index in order, filtering every older montage on the way (SQLite's
                # choice, and PostgreSQL's when it expects many recent rows), but the recent ones by date
                conn.execute(sa.select(sa.func.min(c.seq + 0)).where(c.updated_at >= recent)).scalar_one(),
            ]
            if any(s is not None for s in found):
                return int(min(s for s in found if s is not None)) - 1
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(c.seq), 0))).scalar_one())

    def open_montages(self, changed_since: datetime) -> list[OpenMontage]:
        """The montages not finished that changed at or after ``changed_since`` (one a scope left open
        long ago, crashed mid-montage, is not being acquired): each one's newest arrival, a tile path and its
        tiles still without a verdict. Read by the partial index of unfinished montages, whatever the year
        holds."""
        m, t = montages.c, tiles.c
        montage_tile = sa.and_(t.montage_id == m.montage_id, t.brightfield.is_(False), t.darkfield.is_(False))
        q = (
            sa.select(
                m.montage_id,
                sa.func.coalesce(
                    sa.func.max(t.acquired_at), sa.func.min(m.started_at), sa.func.min(m.updated_at)
                ),
                sa.func.max(t.path),
                sa.func.count(t.tile_id) - sa.func.count(t.qc_passed),
            )
            .select_from(montages.outerjoin(tiles, montage_tile))
            .where(UNFINISHED, m.updated_at >= changed_since)
            .group_by(m.montage_id)
        )
        with self.engine.connect() as conn:
            return [OpenMontage(r[0], aware(r[1]), r[2], int(r[3])) for r in conn.execute(q)]

    def completed_since(self, since: datetime) -> list[tuple[str, datetime, str | None]]:
        """(montage id, when the scope completed it, the last ``qc.status`` sent for it) of the montages
        completed at or after ``since``."""
        c, q, earlier = montages.c, qc_status.c, qc_status.alias("earlier").c
        last = (
            sa.select(sa.func.max(earlier.id))
            .where(earlier.montage_id == c.montage_id)
            .correlate(montages)
            .scalar_subquery()
        )
        query = (
            sa.select(c.montage_id, sa.func.coalesce(c.completed_at, c.updated_at), q.status)
            .select_from(montages.outerjoin(qc_status, q.id == last))
            .where(c.state == "completed", c.updated_at >= since)
        )
        with self.engine.connect() as conn:
            return [(r[0], aware(r[1]), r[2]) for r in conn.execute(query)]

    def montage(self, montage_id: str) -> MontageRow | None:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(*_montage_cols()).where(montages.c.montage_id == montage_id)).first()
        return _montage(r) if r else None

    def tiles(self, montage_id: str, *, after_seq: int = 0) -> list[TileRow]:
        """The montage's tiles (reference frames included) in arrival order."""
        q = (
            sa.select(tiles)
            .where(tiles.c.montage_id == montage_id, tiles.c.seq > after_seq)
            .order_by(tiles.c.seq)
        )
        with self.engine.connect() as conn:
            return [_tile(r) for r in conn.execute(q)]

    def named_tiles(self, montage_id: str) -> dict[str, tuple[int | None, int | None]] | None:
        """The tiles ``montage.complete`` names, tile id -> (row, column); None before it is journaled."""
        with self.engine.connect() as conn:
            r = conn.execute(
                sa.select(montages.c.complete_message).where(montages.c.montage_id == montage_id)
            ).first()
        if r is None or not r.complete_message:
            return None
        named: dict[str, tuple[int | None, int | None]] = {}  # (None, None): no raster position given
        for tile_id, t in (r.complete_message.get("tiles") or {}).items():
            column, row = (t.get("raster_position") or (None, None))[:2]  # TEM_comms: (x, y) indices
            named[tile_id] = (row, column)
        return named

    def high_water_mark(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(messages.c.seq), 0))).scalar_one())

    def messages(self, topic: str | None = None, montage_id: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(messages.c.topic, messages.c.payload).order_by(messages.c.seq)
        if topic:
            q = q.where(messages.c.topic == topic)
        if montage_id:
            q = q.where(messages.c.montage_id == montage_id)
        with self.engine.connect() as conn:
            return [{"topic": r.topic, **dict(r.payload)} for r in conn.execute(q)]

    # -- results --------------------------------------------------------------------------------------

    def save_tile_results(self, tile_id: str, **results: Any) -> None:
        """Per-tile results: ``status`` (processed | failed), ``results``, ``qc_passed``, ``qc_faults``, ``error``."""
        with self.engine.begin() as conn:
            _save_results(conn, tile_id, _now(), **results)

    def claim_judging(self, montage_id: str, owner: str, seconds: float) -> bool:
        """Take (or renew) the right to judge ``montage_id``'s tiles for ``seconds``: True when ``owner``
        holds it now, False while another holder's claim has not expired."""
        now = _now()
        until = datetime.fromtimestamp(now.timestamp() + seconds, UTC)
        with self.engine.begin() as conn:
            conn.execute(
                _insert_new(conn, judges, "montage_id"),
                [{"montage_id": montage_id, "owner": owner, "expires_at": until}],
            )
            taken = conn.execute(
                judges.update()
                .where(judges.c.montage_id == montage_id)
                .where(sa.or_(judges.c.owner == owner, judges.c.expires_at < now))
                .values(owner=owner, expires_at=until)
            )
            return taken.rowcount == 1

    def release_judging(self, montage_id: str, owner: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                judges.delete().where(judges.c.montage_id == montage_id).where(judges.c.owner == owner)
            )

    def judging(self, montage_id: str) -> tuple[str, datetime] | None:
        """(owner, expires_at) of the current claim on ``montage_id``, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(judges.c.owner, judges.c.expires_at).where(judges.c.montage_id == montage_id)
            ).first()
        return None if row is None else (row.owner, aware(row.expires_at))

    # -- retention ----------------------------------------------------------------------------------

    def retire(self, montage_ids: Sequence[str]) -> dict[str, int]:
        """Let go of archived montages' journal rows (their messages, tiles, QC statuses and claims; the heavy
        ``montage.complete`` copy): each montage's own row stays, marked :data:`RETIRED`. The journal's newest
        message always stays, so its high-water mark never goes back (SQLite would reuse the numbers). The
        number of rows let go, by table. Idempotent: a montage retired twice loses nothing more."""
        counts = {"messages": 0, "tiles": 0, "qc_status": 0, "montages": 0}
        for i in range(0, len(montage_ids), 200):
            ids = list(montage_ids[i : i + 200])
            with self.engine.begin() as conn:
                newest = sa.select(sa.func.max(messages.c.seq)).scalar_subquery()
                counts["messages"] += conn.execute(
                    messages.delete().where(messages.c.montage_id.in_(ids), messages.c.seq < newest)
                ).rowcount
                counts["tiles"] += conn.execute(tiles.delete().where(tiles.c.montage_id.in_(ids))).rowcount
                counts["qc_status"] += conn.execute(
                    qc_status.delete().where(qc_status.c.montage_id.in_(ids))
                ).rowcount
                conn.execute(judges.delete().where(judges.c.montage_id.in_(ids)))
                counts["montages"] += conn.execute(
                    montages.update()
                    .where(montages.c.montage_id.in_(ids), montages.c.state != RETIRED)
                    .values(state=RETIRED, complete_message=None, updated_at=_now())
                ).rowcount
        return counts

    def unretired(self) -> list[str]:
        """The montages whose rows the journal still holds (in flight, or archived within the retention window)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(montages.c.montage_id).where(montages.c.state != RETIRED))
            return [r.montage_id for r in rows]

    def forget_unattached(self, before: datetime) -> dict[str, int]:
        """Let go of the messages and QC statuses that name no montage (``qc.status`` of a scope, ``buffer.status``)
        older than ``before``; the newest message stays (see :meth:`retire`)."""
        with self.engine.begin() as conn:
            newest = sa.select(sa.func.max(messages.c.seq)).scalar_subquery()
            gone = conn.execute(
                messages.delete().where(
                    messages.c.montage_id.is_(None), messages.c.received_at < before, messages.c.seq < newest
                )
            ).rowcount
            statuses = conn.execute(
                qc_status.delete().where(qc_status.c.montage_id.is_(None), qc_status.c.at < before)
            ).rowcount
        return {"messages": gone, "qc_status": statuses}

    def record_qc_status(self, montage_id: str | None, status: str, reason: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                qc_status.insert().values(montage_id=montage_id, status=status, reason=reason, at=_now())
            )

    def qc_statuses(self, montage_id: str | None = None) -> list[tuple[str, str | None]]:
        q = sa.select(qc_status.c.status, qc_status.c.reason).order_by(qc_status.c.id)
        if montage_id:
            q = q.where(qc_status.c.montage_id == montage_id)
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(q)]


def _record(conn: Connection, topic: str, payload: dict[str, Any], now: datetime) -> bool:
    # One statement that skips a message already there: two writers (two montage runs, a listener and a
    # run) can record the same body at once, and a look-then-insert lets both through to a UNIQUE error.
    inserted = conn.execute(
        _insert_new(conn, messages, "message_key")
        .values(
            message_key=message_key(topic, payload),
            topic=topic,
            montage_id=payload.get("montage_id") or None,
            tile_id=payload.get("tile_id"),
            payload=json.loads(json.dumps(payload, default=str)),
            received_at=now,
        )
        .returning(messages.c.seq)
    ).first()
    if inserted is None:
        return False
    seq = inserted.seq
    apply = _APPLY.get(topic)
    if apply is not None:
        apply(conn, payload, seq, now)
    return True


def _save_results(
    conn: Connection,
    tile_id: str,
    now: datetime,
    *,
    status: str,
    results: dict[str, Any] | None = None,
    qc_passed: bool | None = None,
    qc_faults: list[dict[str, Any]] | None = None,
    error: str | None = None,
) -> None:
    conn.execute(
        tiles.update()
        .where(tiles.c.tile_id == tile_id)
        .values(
            status=status,
            results=results,
            qc_passed=qc_passed,
            qc_faults=qc_faults,
            error=error,
            processed_at=now,
        )
    )


# -- applying messages ----------------------------------------------------------------------------------


def _montage_cols():
    c = montages.c
    return (
        c.montage_id,
        c.seq,
        c.state,
        c.total_tiles,
        c.pixel_size_nm,
        c.updated_at,
        c.error_message,
        c.acquisition_id,
        c.completed_at,
        c.rotation_angle,
        c.complete_message.isnot(None).label("announced_complete"),
    )


def _montage(r) -> MontageRow:
    return MontageRow(
        r.montage_id,
        r.seq,
        r.state,
        r.total_tiles,
        r.pixel_size_nm,
        aware(r.updated_at),
        r.error_message,
        r.acquisition_id,
        aware(r.completed_at),
        r.rotation_angle,
        bool(r.announced_complete),
    )


def _tile(r) -> TileRow:
    return TileRow(
        tile_id=r.tile_id,
        montage_id=r.montage_id,
        seq=r.seq,
        raster_index=r.raster_index,
        row=r.row,
        column=r.column,
        overlap=r.overlap,
        stage_x_nm=r.stage_x_nm,
        stage_y_nm=r.stage_y_nm,
        path=r.path,
        brightfield=bool(r.brightfield),
        darkfield=bool(r.darkfield),
        acquired_at=aware(r.acquired_at),
        status=r.status,
        results=r.results,
        qc_passed=r.qc_passed,
        qc_faults=r.qc_faults,
        error=r.error,
        processed_at=aware(r.processed_at),
    )


def _ensure_montage(conn: Connection, montage_id: str, seq: int, now: datetime, **values) -> None:
    existing = conn.execute(sa.select(montages.c.state).where(montages.c.montage_id == montage_id)).first()
    if existing is None:
        conn.execute(
            montages.insert().values(
                montage_id=montage_id,
                seq=seq,
                state=values.pop("state", "in_progress"),
                started_at=now,
                updated_at=now,
                **values,
            )
        )
    else:
        if existing.state in FINISHED_STATES:
            values.pop("state", None)  # a late status message never reopens a finished montage
        conn.execute(
            montages.update().where(montages.c.montage_id == montage_id).values(updated_at=now, **values)
        )


def _apply_tile_raw(conn: Connection, p: dict, seq: int, now: datetime) -> None:
    montage_id = p.get("montage_id") or ""
    if not montage_id:
        return  # UI / calibration tile: not part of any montage
    _ensure_montage(conn, montage_id, seq, now, roi_id=p.get("roi_id"))
    stage = p.get("stage_position") or (None, None)
    conn.execute(
        tiles.insert().values(
            tile_id=p["tile_id"],
            montage_id=montage_id,
            seq=seq,
            raster_index=_named_raster_index(conn, montage_id, p["tile_id"]),  # a tile after montage.complete
            row=int(p["row"]),
            column=int(p["column"]),
            overlap=p.get("overlap"),
            stage_x_nm=stage[0],
            stage_y_nm=stage[1],
            path=p["path"],
            brightfield=bool(p.get("brightfield")),
            darkfield=bool(p.get("darkfield")),
            acquired_at=now,
            status="acquired",
        )
    )


def _apply_montage_status(conn: Connection, p: dict, seq: int, now: datetime) -> None:
    state = str(p["state"])
    values: dict[str, Any] = {"state": state}
    if p.get("total_tiles"):
        values["total_tiles"] = int(p["total_tiles"])
    if p.get("error_message"):
        values["error_message"] = p["error_message"]
    if state in FINISHED_STATES:
        values["completed_at"] = now
    _ensure_montage(conn, p["montage_id"], seq, now, **values)


def _apply_montage_complete(conn: Connection, p: dict, seq: int, now: datetime) -> None:
    _ensure_montage(
        conn,
        p["montage_id"],
        seq,
        now,
        state="completed",
        completed_at=now,
        acquisition_id=p.get("acquisition_id"),
        pixel_size_nm=p.get("pixel_size"),
        rotation_angle=p.get("rotation_angle"),
        complete_message=json.loads(json.dumps(p, default=str)),
    )
    for tile_id, t in (p.get("tiles") or {}).items():
        conn.execute(
            tiles.update().where(tiles.c.tile_id == tile_id).values(raster_index=t.get("raster_index"))
        )


def _named_raster_index(conn: Connection, montage_id: str, tile_id: str) -> int | None:
    r = conn.execute(
        sa.select(montages.c.complete_message).where(montages.c.montage_id == montage_id)
    ).first()
    named = ((r.complete_message or {}).get("tiles") or {}) if r is not None else {}
    return (named.get(tile_id) or {}).get("raster_index")


def _insert_new(conn: Connection, table: sa.Table, key: str):
    """INSERT that skips rows whose ``key`` is already there (SQLite and PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert(table).on_conflict_do_nothing(index_elements=[key])
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing(index_elements=[key])


_RESULTS_UPDATE = (
    tiles.update()
    .where(tiles.c.tile_id == sa.bindparam("_tile_id"))
    .values(
        status=sa.bindparam("_status"),
        results=sa.bindparam("_results"),
        qc_passed=sa.bindparam("_qc_passed"),
        qc_faults=sa.bindparam("_qc_faults"),
        error=sa.bindparam("_error"),
        processed_at=sa.bindparam("_processed_at"),
    )
)


_APPLY = {
    "tile.raw": _apply_tile_raw,
    "montage.status": _apply_montage_status,
    "montage.complete": _apply_montage_complete,
}
