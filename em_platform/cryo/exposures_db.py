"""A live session's exposures in the results database: one row per movie, from the moment its file is complete
to its figures and its verdict (``cryo_exposures``).

A row is claimed before it is processed (its owner and a lease), so a worker killed at any moment leaves a
claim that runs out and the exposure is processed again, never twice at once, and its results land on the
one row: nothing is lost or duplicated. An exposure whose processing died :data:`MAX_ATTEMPTS` times is
failed rather than retried forever (a movie that kills its worker). Columns are lower case with units as
suffixes, as the other results tables (``_a`` Å, ``_um`` µm)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa

from em_platform.cryo.curation import Thresholds, judge
from em_platform.cryo.results_db import metadata_obj
from em_platform.sql import aware, open_database

MAX_ATTEMPTS = 3
WAITING, PROCESSING, PROCESSED, FAILED = "waiting", "processing", "processed", "failed"

# what processing measures of one exposure, stored as they came (the curation reads only these)
FIGURES = (
    "total_motion_a",
    "early_motion_a",
    "late_motion_a",
    "defocus_u_a",
    "defocus_v_a",
    "defocus_angle_deg",
    "astigmatism_a",
    "ctf_fit_resolution_a",
    "ctf_figure_of_merit",
    "ice_ring_density",
)
FILES = ("micrograph", "thumbnail", "spectrum")  # relative to the session's output folder
ACQUISITION = ("movie_path", "pixel_a", "voltage_kv", "dose_per_frame_e_per_a2", "n_frames")

exposures = sa.Table(
    "cryo_exposures",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session", sa.String(512), nullable=False),
    sa.Column("movie", sa.String(1024), nullable=False),  # relative to the session's folder
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),  # the file complete
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("owner", sa.String(128)),
    sa.Column("lease_until", sa.DateTime(timezone=True)),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("processed_at", sa.DateTime(timezone=True)),
    sa.Column("error", sa.Text),
    sa.Column("movie_path", sa.Text),  # where it was read (beside its mdoc, or in a frames/ folder)
    sa.Column("pixel_a", sa.Float),
    sa.Column("voltage_kv", sa.Float),
    sa.Column("dose_per_frame_e_per_a2", sa.Float),
    sa.Column("n_frames", sa.Integer),
    *(sa.Column(name, sa.Float) for name in FIGURES),
    *(sa.Column(name, sa.Text) for name in FILES),
    sa.Column("accepted", sa.Boolean),
    sa.Column("rejected_by", sa.String(32)),
    sa.UniqueConstraint("session", "movie", name="uq_cryo_exposure"),
    sa.Index("ix_cryo_exposures_status_acquired", "status", "acquired_at"),
)

# when each session last changed (an exposure landed, processed, failed or judged again): what the session
# sensor reads, instead of the exposures of a year
live_sessions = sa.Table(
    "cryo_live_sessions",
    metadata_obj,
    sa.Column("session", sa.String(512), primary_key=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, index=True),
)


@dataclass(frozen=True)
class Claim:
    id: int
    session: str
    movie: str
    attempts: int


class ExposureStore:
    """The exposures table (SQLite or PostgreSQL)."""

    def __init__(self, url: str, *, create: bool = True):
        self.engine = open_database(url, metadata_obj, create=create)

    def dispose(self) -> None:
        self.engine.dispose()

    def known(self, session: str) -> set[str]:
        """The movies of ``session`` already recorded (whatever their state)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(exposures.c.movie).where(exposures.c.session == session))
            return {r.movie for r in rows}

    def add(self, session: str, movies: Iterable[tuple[str, datetime]]) -> int:
        """Record complete movies (relative path, when it was complete) as waiting; one already there is left
        as it is. Returns how many were new."""
        new = 0
        for movie, at in movies:
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        exposures.insert().values(
                            session=session, movie=movie, acquired_at=at, status=WAITING, attempts=0
                        )
                    )
                    _touch(conn, session)
                new += 1
            except sa.exc.IntegrityError:
                continue  # recorded by an earlier scan, or by another service at the same moment
        return new

    def claim(self, owner: str, lease: timedelta, now: datetime | None = None) -> Claim | None:
        """The oldest exposure waiting, or whose claim ran out (its worker died), now ``owner``'s."""
        now = now or datetime.now(UTC)
        e = exposures.c
        free = sa.or_(e.status == WAITING, sa.and_(e.status == PROCESSING, e.lease_until < now))
        for _ in range(5):  # another claimant took the one read: read again
            with self.engine.begin() as conn:
                row = conn.execute(
                    sa.select(e.id, e.session, e.movie, e.attempts)
                    .where(free)
                    .order_by(e.acquired_at, e.id)
                    .limit(1)
                ).first()
                if row is None:
                    return None
                if row.attempts >= MAX_ATTEMPTS:
                    conn.execute(
                        exposures.update()
                        .where(e.id == row.id, free)
                        .values(
                            status=FAILED,
                            owner=None,
                            lease_until=None,
                            error=f"its processing stopped {row.attempts} times without a result (the worker "
                            "died: out of memory?); process it again with `em-platform cryo-live --retry`",
                        )
                    )
                    continue
                taken = conn.execute(
                    exposures.update()
                    .where(e.id == row.id, free)
                    .values(
                        status=PROCESSING, owner=owner, lease_until=now + lease, attempts=row.attempts + 1
                    )
                ).rowcount
                if taken:
                    return Claim(row.id, row.session, row.movie, row.attempts + 1)
        return None

    def claim_movie(self, session: str, movie: str, owner: str, lease: timedelta) -> Claim | None:
        """``session``'s ``movie`` claimed by ``owner`` if it is free (to record a failure found before)."""
        e = exposures.c
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(e.id, e.attempts).where(e.session == session, e.movie == movie, e.status == WAITING)
            ).first()
            if row is None:
                return None
            taken = conn.execute(
                exposures.update()
                .where(e.id == row.id, e.status == WAITING)
                .values(status=PROCESSING, owner=owner, lease_until=now + lease, attempts=row.attempts + 1)
            ).rowcount
        return Claim(row.id, session, movie, row.attempts + 1) if taken else None

    def expire_claims(self, owners: Iterable[str]) -> int:
        """End the claims of ``owners`` (services known to be dead) now, so they are processed again at once
        rather than when their lease runs out; how many."""
        e = exposures.c
        owners = list(owners)
        if not owners:
            return 0
        with self.engine.begin() as conn:
            return conn.execute(
                exposures.update()
                .where(e.status == PROCESSING, e.owner.in_(owners))
                .values(lease_until=datetime.now(UTC) - timedelta(seconds=1))
            ).rowcount

    def claim_owners(self) -> set[str]:
        """Who holds a claim now."""
        e = exposures.c
        with self.engine.connect() as conn:
            return {
                r.owner for r in conn.execute(sa.select(e.owner).where(e.status == PROCESSING).distinct())
            }

    def renew(self, claim: Claim, owner: str, lease: timedelta) -> bool:
        """Extend ``owner``'s claim by ``lease`` from now; False when it is no longer its."""
        e = exposures.c
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    exposures.update()
                    .where(e.id == claim.id, e.owner == owner, e.status == PROCESSING)
                    .values(lease_until=datetime.now(UTC) + lease)
                ).rowcount
            )

    def save(
        self,
        claim: Claim,
        owner: str,
        values: Mapping[str, Any],
        thresholds: Thresholds,
        now: datetime | None = None,
    ) -> bool:
        """Store a processed exposure's figures, files and verdict, if ``owner`` still holds its claim."""
        figures = {k: values.get(k) for k in FIGURES}
        accepted, rule = judge(figures, thresholds)
        row = {k: values[k] for k in (*FILES, *ACQUISITION) if k in values}
        return self._finish(
            claim,
            owner,
            status=PROCESSED,
            processed_at=now or datetime.now(UTC),
            error=None,
            accepted=accepted,
            rejected_by=rule,
            **figures,
            **row,
        )

    def fail(self, claim: Claim, owner: str, error: str, now: datetime | None = None) -> bool:
        """The exposure cannot be processed (a corrupt movie): failed with the reason naming the file."""
        return self._finish(claim, owner, status=FAILED, processed_at=now or datetime.now(UTC), error=error)

    def _finish(self, claim: Claim, owner: str, **values) -> bool:
        e = exposures.c
        with self.engine.begin() as conn:
            done = conn.execute(
                exposures.update()
                .where(e.id == claim.id, e.owner == owner, e.status == PROCESSING)
                .values(owner=None, lease_until=None, **values)
            ).rowcount
            if done:
                _touch(conn, claim.session)
        return bool(done)

    def retry(self, session: str | None = None) -> int:
        """Failed exposures (of ``session``) waiting again, their attempts reset; how many."""
        e = exposures.c
        query = exposures.update().where(e.status == FAILED)
        if session is not None:
            query = query.where(e.session == session)
        with self.engine.begin() as conn:
            return conn.execute(query.values(status=WAITING, attempts=0, error=None)).rowcount

    def delete_session(self, session: str) -> int:
        """Forget ``session``'s exposures (its files are the caller's); how many rows went."""
        with self.engine.begin() as conn:
            conn.execute(live_sessions.delete().where(live_sessions.c.session == session))
            return conn.execute(exposures.delete().where(exposures.c.session == session)).rowcount

    def rejudge(self, session: str, thresholds: Thresholds) -> dict[str, int]:
        """Every processed exposure of ``session`` judged again from its stored figures (nothing recomputed);
        only the rows whose verdict changed are written. Returns the counts: accepted, rejected, changed."""
        e = exposures.c
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(e.id, e.accepted, e.rejected_by, *(e[k] for k in FIGURES)).where(
                    e.session == session, e.status == PROCESSED
                )
            ).all()
            changed, accepted = [], 0
            for r in rows:
                # a row's mapping is keyed by column name, as judge reads it
                verdict, rule = judge(cast("Mapping[str, Any]", r._mapping), thresholds)
                accepted += verdict
                if (verdict, rule) != (r.accepted, r.rejected_by):
                    changed.append({"row_id": r.id, "accepted": verdict, "rejected_by": rule})
            if changed:
                conn.execute(
                    exposures.update()
                    .where(e.id == sa.bindparam("row_id"))
                    .values(accepted=sa.bindparam("accepted"), rejected_by=sa.bindparam("rejected_by")),
                    changed,
                )
                _touch(conn, session)
        return {"accepted": accepted, "rejected": len(rows) - accepted, "changed": len(changed)}

    def row(self, row_id: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return _as_dict(conn.execute(sa.select(exposures).where(exposures.c.id == row_id)).one())

    def rows(self, session: str, status: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """``session``'s exposures in acquisition order, as mappings (timestamps UTC-aware)."""
        e = exposures.c
        query = sa.select(exposures).where(e.session == session).order_by(e.acquired_at, e.id)
        if status:
            query = query.where(e.status.in_(list(status)))
        with self.engine.connect() as conn:
            return [_as_dict(r) for r in conn.execute(query)]

    def oldest_waiting(self) -> datetime | None:
        """When the longest-waiting unprocessed exposure of any session was complete: the processing lag."""
        e = exposures.c
        with self.engine.connect() as conn:
            at = conn.execute(
                sa.select(sa.func.min(e.acquired_at)).where(e.status.in_([WAITING, PROCESSING]))
            ).scalar()
        return aware(at) if at is not None else None

    def sessions_updated_since(self, since: datetime) -> list[tuple[str, datetime]]:
        """(session, when it last changed) of the sessions changed after ``since``, oldest change first."""
        s = live_sessions.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(s.session, s.updated_at).where(s.updated_at > since).order_by(s.updated_at)
            )
            return [(r.session, aware(r.updated_at)) for r in rows]


def _touch(conn: sa.Connection, session: str) -> None:
    """Mark ``session`` changed now, in the caller's transaction."""
    now = datetime.now(UTC)
    s = live_sessions.c
    if not conn.execute(live_sessions.update().where(s.session == session).values(updated_at=now)).rowcount:
        try:
            with conn.begin_nested():
                conn.execute(live_sessions.insert().values(session=session, updated_at=now))
        except sa.exc.IntegrityError:  # inserted by another writer meanwhile
            conn.execute(live_sessions.update().where(s.session == session).values(updated_at=now))


def _as_dict(row: sa.Row) -> dict[str, Any]:
    out = dict(row._mapping)
    return out | {k: aware(out[k]) for k in ("acquired_at", "processed_at", "lease_until")}
