"""Live single-particle sessions (`em-platform cryo-live`): each exposure motion-corrected and CTF-fitted as
soon as its movie is complete, judged against the session's thresholds, its results in the results database
and the session's RELION STAR files.

A movie is complete when SerialEM's frame-set mdoc for it is there and the movie reads whole (its header's
size and frame count, the mdoc's NumSubFrames): a movie still being written, or truncated, waits; one that
has not changed for :attr:`LiveCryo.give_up_s` and still does not read whole is failed, naming the file.
A corrupt movie fails alone; the session goes on. The thresholds (``curation:`` in ``em_session.yaml``) are
read again whenever the file changes, and the whole session is re-judged from its stored figures. A tilt
series' tilts are corrected as they land too and kept for its run (:mod:`em_platform.cryo.live_tilts`),
after the exposures of single-particle sessions.

Exposures are claimed in the database (:mod:`em_platform.cryo.exposures_db`) with a lease this service
renews while it works, so one killed at any moment leaves a claim that runs out within the lease and is
processed again by whichever service runs next; files are replaced whole (:mod:`em_platform.cryo.exposure`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from em_platform.cryo import relion_star as star
from em_platform.cryo import session as sess
from em_platform.cryo.curation import Thresholds
from em_platform.cryo.exposure import ExposureSettings, process_exposure
from em_platform.cryo.exposures_db import PROCESSED, Claim, ExposureStore
from em_platform.cryo.frame_sets import FrameSetWatch, file_state_or_none
from em_platform.cryo.live_tilts import LiveTilts, series_gain, tilt_fingerprint
from em_platform.cryo.optics import Microscope
from em_platform.cryo.part_files import part_path, pid_alive, remove_left_behind
from em_platform.cryo.processing import correct_tilt_images
from em_platform.cryo.results_db import tilt_series
from em_platform.cryo.session_folders import SPA_SET
from em_platform.edge import Refused, check_relative_key, inside

log = logging.getLogger(__name__)

MDOC = ".mdoc"


@dataclass
class _Waiting:
    """A movie seen but not yet whole: since when its files have not changed, and why it does not read."""

    state: tuple
    since: float
    error: str


@dataclass
class _Session:
    key: str
    folder: Path
    root: Path
    tag: str
    known: set[str]
    thresholds: Thresholds
    settings_state: tuple | None = None
    stars_written: float = 0.0
    dirty: bool = False
    pending: set[Path] = field(default_factory=set)  # mdocs of movies not yet recorded


@dataclass
class _Series:
    """A tilt series being acquired: its tilts corrected (movie name -> fingerprint) and to correct."""

    ts: sess.TiltSeries
    state: tuple | None  # file_state_or_none of its mdoc
    done: dict[str, str]
    pending: set[int] = field(default_factory=set)
    waiting: dict[int, str] = field(default_factory=dict)  # not whole yet: why
    missing: bool = False  # a movie the mdoc names is not there yet: described again at every scan
    taken: bool = False  # its run has begun, or it has no movies


class LiveCryo:
    """The service: :meth:`scan` records complete movies, :meth:`process_next` processes one, :meth:`run`
    does both until stopped."""

    def __init__(
        self,
        roots: Mapping[str, Path],
        store: ExposureStore,
        out_root: Path,
        settings: ExposureSettings | None = None,
        *,
        give_up_s: float = 120.0,
        lease_s: float = 30.0,
        star_every_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        on_exposure: Callable[[str], None] = lambda state: None,
        dead_letter: Callable[[str, Path, Refused], None] = lambda session, path, refused: None,
    ):
        self.watches = [FrameSetWatch(Path(root), tag) for tag, root in roots.items()]
        self.store, self.out_root, self.settings = store, Path(out_root), settings or ExposureSettings()
        self.give_up_s, self.lease_s, self.star_every_s = give_up_s, lease_s, star_every_s
        self.clock, self.on_exposure, self.dead_letter = clock, on_exposure, dead_letter
        self.owner = f"cryo-live@{socket.gethostname()}:{os.getpid()}"
        self.sessions: dict[str, _Session] = {}
        self.waiting: dict[Path, _Waiting] = {}
        self.series: dict[Path, _Series] = {}  # tilt series mdoc -> its tilts
        self.tilts = LiveTilts(self.out_root)

    # -- finding exposures -----------------------------------------------------------------------

    def scan(self) -> int:
        """Record every movie now complete; returns how many. The watch hands over each movie's mdoc once;
        a movie not yet whole stays pending in its session and is looked at again by every scan."""
        for watch in self.watches:
            found = watch.scan()
            self._note_tilt_series(watch, found.others)
            for folder, mdocs in found.new.items():
                key = watch.session_key(folder)
                try:
                    check_relative_key(key, "session")
                except Refused as exc:
                    log.error("cryo-live: session folder %s refused: %s", folder, exc)
                    continue
                s = self.sessions.get(key)
                if s is None:
                    s = self.sessions[key] = _Session(
                        key, folder, watch.root, watch.tag, self.store.known(key), Thresholds()
                    )
                s.pending.update(m for m in mdocs if m.name[: -len(MDOC)] not in s.known)
        new = 0
        for s in self.sessions.values():
            self._read_thresholds(s)
            complete = []
            for mdoc in sorted(s.pending):
                movie = mdoc.name[: -len(MDOC)]
                at = self._complete(s, mdoc) if movie not in s.known else None
                if at is not None:
                    complete.append((movie, at))
                if at is not None or movie in s.known or not mdoc.exists():  # recorded, failed or removed
                    s.pending.discard(mdoc)
                    self.waiting.pop(mdoc, None)
            if complete:
                new += self.store.add(s.key, complete)
                s.known.update(m for m, _ in complete)
                for _ in complete:
                    self.on_exposure("landed")
        return new

    def _complete(self, s: _Session, mdoc: Path) -> datetime | None:
        """When the movie of ``mdoc`` was complete, or None while it is not (yet)."""
        now = self.clock()
        try:
            ts = sess.describe_movie_set(s.folder, [mdoc], s.root, s.tag)
            (tilt,) = ts.tilts
            if tilt.movie is None:
                raise sess.SessionError(f"movie {tilt.movie_name} of {mdoc} is not there yet")
            sess.load_movie(ts, tilt)  # its header, size and frame count: whole, or raises
        except Refused as exc:
            self.dead_letter(s.key, mdoc, exc)
            self._fail_now(s, mdoc, f"refused: {exc}")
            return None
        except (sess.SessionError, OSError, ValueError) as exc:
            self._wait(s, mdoc, str(exc), now)
            return None
        self.waiting.pop(mdoc, None)
        return datetime.fromtimestamp(max(_mtime(mdoc), _mtime(tilt.movie)), UTC)

    def _wait(self, s: _Session, mdoc: Path, error: str, now: float) -> None:
        movie = mdoc.name[: -len(MDOC)]
        state = (
            file_state_or_none(mdoc),
            *(file_state_or_none(d / movie) for d in (s.folder, s.folder / "frames", s.folder / "Frames")),
        )
        seen = self.waiting.get(mdoc)
        if seen is None or seen.state != state:
            self.waiting[mdoc] = _Waiting(state, now, error)
            return
        seen.error = error
        if now - seen.since >= self.give_up_s:
            self._fail_now(
                s,
                mdoc,
                f"{error} (unchanged for {self.give_up_s:.0f} s: truncated or corrupt; fix or replace "
                "the file, then `em-platform cryo-live --retry`)",
            )

    def _fail_now(self, s: _Session, mdoc: Path, error: str) -> None:
        movie = mdoc.name[: -len(MDOC)]
        at = datetime.fromtimestamp(self.clock(), UTC)
        if self.store.add(s.key, [(movie, at)]):
            claim = self.store.claim_movie(s.key, movie, self.owner, timedelta(seconds=self.lease_s))
            if claim is not None:
                self.store.fail(claim, self.owner, error)
                self.on_exposure("failed")
            log.error("cryo-live: %s: %s", s.key, error)
        s.known.add(movie)
        self.waiting.pop(mdoc, None)

    def _read_thresholds(self, s: _Session) -> None:
        """The session's thresholds, again when its settings file changed; a change re-judges the session."""
        state = tuple(
            file_state_or_none(f / sess.SESSION_SETTINGS) for f in (s.folder, _session_dir(s.root, s.folder))
        )
        if state == s.settings_state:
            return
        first = s.settings_state is None
        s.settings_state = state
        try:
            thresholds = session_thresholds(s.root, s.folder)
        except (sess.SessionError, Refused) as exc:
            log.error("cryo-live: %s: the thresholds keep their last values: %s", s.key, exc)
            return
        if thresholds == s.thresholds and not first:
            return
        s.thresholds = thresholds
        started = time.monotonic()
        counts = self.store.rejudge(s.key, thresholds)
        s.dirty = s.dirty or bool(counts["changed"])
        if counts["changed"] or not first:
            log.info(
                "cryo-live: %s re-judged in %.1f s: %d accepted, %d rejected (%d changed)",
                s.key, time.monotonic() - started,
                counts["accepted"], counts["rejected"], counts["changed"],
            )  # fmt: skip

    def _note_tilt_series(self, watch: FrameSetWatch, mdocs: list[Path]) -> None:
        """Each tilt series whose mdoc changed described again: its tilts with a movie, not corrected yet,
        become pending. A series its run has begun (the results database has it) is the run's."""
        for mdoc in mdocs:
            state = file_state_or_none(mdoc)
            series = self.series.get(mdoc)
            if series is not None and (series.taken or (series.state == state and not series.missing)):
                continue
            try:
                ts = sess.describe_tilt_series(mdoc, watch.root, watch.tag)
                check_relative_key(ts.key, "tilt series")
            except (sess.SessionError, Refused, OSError):
                continue  # half-written, or refused: the cryo sensor reports it
            done = series.done if series is not None else {}
            self.series[mdoc] = series = _Series(ts, state, done)
            if not ts.has_movies or self._taken(ts.key):  # nothing to correct, or the run's now
                series.taken = True
                continue
            series.missing = any(t.movie is None for t in ts.tilts)  # a movie the mdoc names, not saved yet
            series.pending = {
                i for i, t in enumerate(ts.tilts) if t.movie is not None and not self._kept(ts, i, done)
            }

    def _kept(self, ts: sess.TiltSeries, i: int, done: dict[str, str]) -> bool:
        """Tilt ``i`` was corrected from its movie as it is now (not written again since)."""
        try:
            now = tilt_fingerprint(ts, i, series_gain(ts, self.settings.motion), self.settings.motion)
        except (sess.SessionError, OSError):
            return False
        movie = ts.tilts[i].movie
        assert movie is not None  # only tilts with a movie are pending
        return done.get(movie.name) == now or self.tilts.holds(ts, i, now)  # kept before a restart

    def _taken(self, key: str) -> bool:
        with self.store.engine.connect() as conn:
            row = conn.execute(
                sa.select(tilt_series.c.partition_key).where(tilt_series.c.partition_key == key)
            )
            return row.first() is not None

    # -- processing ------------------------------------------------------------------------------

    def process_tilt(self) -> bool:
        """Correct one pending tilt of a tilt series still being acquired; False when none is ready (a
        movie not yet whole stays pending: looked at again after the next scan)."""
        for series in self.series.values():
            for i in sorted(series.pending):
                series.pending.discard(i)
                ts, tilt = series.ts, series.ts.tilts[i]
                assert tilt.movie is not None  # pending: tilts with a movie
                settings = self.settings.motion
                try:
                    sess.load_movie(ts, tilt)  # whole, or not yet
                    gain = series_gain(ts, settings)
                    fingerprint = tilt_fingerprint(ts, i, gain, settings)
                    if self._taken(ts.key):
                        series.taken = True
                        return True
                    figures, images = correct_tilt_images(ts, i, None, gain, settings)
                except (sess.SessionError, OSError, ValueError) as exc:
                    series.waiting[i] = str(exc)
                    continue
                if self._taken(ts.key):  # its run began meanwhile and corrects it itself
                    series.taken = True
                    return True
                self.tilts.put(ts, i, fingerprint, figures, images)
                series.done[tilt.movie.name] = fingerprint
                series.waiting.pop(i, None)
                log.info("cryo-live: %s tilt %+.1f° (%s) corrected as it landed", ts.key, tilt.angle_deg,
                         tilt.movie.name)  # fmt: skip
                return True
        for series in self.series.values():  # not whole yet: again after the next scan
            series.pending |= set(series.waiting)
            series.waiting.clear()
        return False

    def process_next(self) -> bool:
        """Process the longest-waiting exposure of any session; False when none waits."""
        claim = self.store.claim(self.owner, timedelta(seconds=self.lease_s))
        if claim is None:
            return False
        s = self.sessions.get(claim.session)
        with _Renewal(self.store, claim, self.owner, self.lease_s):
            try:
                if s is None:
                    raise sess.SessionError(f"session {claim.session} is not under any watched session root")
                ts, out = self._exposure(s, claim)
                values = process_exposure(ts, out, claim.movie, self.settings)
            except (sess.SessionError, Refused, OSError, ValueError) as exc:
                self.store.fail(claim, self.owner, str(exc))
                log.error("cryo-live: %s: %s", claim.session, exc)
                self.on_exposure("failed")
                return True
        if self.store.save(claim, self.owner, values, s.thresholds):
            s.dirty = True
            self.on_exposure("processed")
            log.info("cryo-live: %s", _line(self.store, claim))
        return True

    def _exposure(self, s: _Session, claim: Claim):
        mdoc = inside(s.folder, claim.movie + MDOC, field="movie")
        ts = sess.describe_movie_set(s.folder, [mdoc], s.root, s.tag)
        return ts, self.out_dir(s.key)

    def out_dir(self, key: str) -> Path:
        return inside(self.out_root, key, field="session")

    # -- the session's STAR files ----------------------------------------------------------------

    def write_stars(self, force: bool = False) -> None:
        now = self.clock()
        for s in self.sessions.values():
            if s.dirty and (force or now - s.stars_written >= self.star_every_s):
                write_session_stars(
                    self.out_dir(s.key), self.store.rows(s.key, [PROCESSED]), self.settings.scope
                )
                s.stars_written, s.dirty = now, False

    def expire_dead_claims(self) -> int:
        """Claims of this host's services whose process is gone (a kill -9, a crash): processed again now,
        not when their lease runs out. Another host's claims run out by their lease."""
        host = f"cryo-live@{socket.gethostname()}:"
        dead = [o for o in self.store.claim_owners() if o.startswith(host) and not pid_alive(o[len(host) :])]
        if dead:
            log.warning(
                "cryo-live: taking back the exposures of %s, which stopped without a result", ", ".join(dead)
            )
        return self.store.expire_claims(dead)

    def run(
        self, stop: threading.Event, ready: Callable[[], None] = lambda: None, poll_s: float = 1.0
    ) -> None:
        self.expire_dead_claims()
        if removed := remove_left_behind(self.out_root):
            log.warning("cryo-live: %d half-written file(s) of a stopped service removed", removed)
        ready()
        while not stop.is_set():
            self.scan()
            worked = False
            while not stop.is_set() and (self.process_next() or self.process_tilt()):
                worked = True
                self.scan()
                self.write_stars()
            self.write_stars(force=not worked)
            if not worked:
                stop.wait(poll_s)


def session_folder(roots: dict[str, Path], key: str) -> tuple[Path, Path]:
    """(the session's root, its movie set's folder) of a session key ``<tag>/<folder>/micrographs``."""
    tag, _, rest = key.partition("/")
    if tag not in roots or not rest.endswith(SPA_SET):
        raise sess.SessionError(f"session {key!r}: not <root tag>/<folder>/{SPA_SET} of a known root")
    rel = rest[: -len(SPA_SET)].rstrip("/") or "."
    inside(roots[tag], rel, field="session")  # refused unless it stays inside its root
    return roots[tag], roots[tag] / rel


def session_thresholds(root: Path, folder: Path) -> Thresholds:
    """The session's thresholds now (``curation:`` of its em_session.yaml; the defaults without one)."""
    settings, _ = sess.session_settings(folder, _session_dir(root, folder), root)
    return settings.get("curation", Thresholds())


def _session_dir(root: Path, folder: Path) -> Path:
    """The session folder a set's settings may also lie in, as describe_movie_set finds it."""
    rel = folder.relative_to(root)
    return root / rel.parts[0] if rel.parts else root


def write_session_stars(out: Path, rows: list[dict], scope: Microscope) -> None:
    """``corrected_micrographs.star`` and ``micrographs_ctf.star`` of every processed exposure and
    ``accepted/micrographs_ctf.star`` of the accepted ones, replaced whole (paths relative to ``out``)."""
    if not rows:
        return
    optics = star.optics_block(
        rows[0]["pixel_a"], Microscope(scope.voltage_kV, scope.cs_mm, scope.amplitude_contrast)
    )
    names = [
        {"rlnMicrographName": r["micrograph"], "rlnMicrographMovieName": r["movie"], "rlnOpticsGroup": 1}
        for r in rows
    ]
    motion = star.exposures_motion(names, rows)
    ctf = star.exposures_ctf(motion, rows)
    accepted = [c for c, r in zip(ctf, rows, strict=True) if r["accepted"]]
    (out / "accepted").mkdir(parents=True, exist_ok=True)
    for path, table in (
        (out / "corrected_micrographs.star", motion),
        (out / "micrographs_ctf.star", ctf),
        (out / "accepted" / "micrographs_ctf.star", accepted),
    ):
        part = part_path(path)
        if table:
            star.write_star(part, optics, table)
            os.replace(part, path)
        else:
            path.unlink(missing_ok=True)


class _Renewal:
    """Renews a claim's lease while its exposure is processed, so only a dead service's claim runs out."""

    def __init__(self, store: ExposureStore, claim: Claim, owner: str, lease_s: float):
        self.store, self.claim, self.owner, self.lease_s = store, claim, owner, lease_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._renew, name="cryo-live-lease", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    def _renew(self) -> None:
        while not self.done.wait(self.lease_s / 3):
            try:
                self.store.renew(self.claim, self.owner, timedelta(seconds=self.lease_s))
            except Exception as exc:  # noqa: BLE001 - the database away for a moment: the next renewal
                log.warning("cryo-live: could not renew the claim on %s: %s", self.claim.movie, exc)


def _line(store: ExposureStore, claim: Claim) -> str:
    """What an operator reads of one exposure: its figures, verdict and lag."""
    row = store.row(claim.id)
    verdict = "accepted" if row["accepted"] else f"rejected ({row['rejected_by']})"
    lag = (row["processed_at"] - row["acquired_at"]).total_seconds()
    return (
        f"{claim.session} {claim.movie}: motion {row['total_motion_a']:.1f} Å, defocus "
        f"{(row['defocus_u_a'] + row['defocus_v_a']) / 2e4:.2f} µm, CTF fit {row['ctf_fit_resolution_a']:.1f} Å: "
        f"{verdict}, {lag:.1f} s after its movie was complete"
    )


def _mtime(path: Path) -> float:
    return path.stat().st_mtime
