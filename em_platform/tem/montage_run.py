"""One montage's live processing: tiles are taken from the journal as they land, processed and matched on
Dask, QC'd, and the verdicts sent back while the scope is still imaging. The same code re-processes a
finished montage (all its tiles are simply there at once).

:class:`MontageRun` is a loop over four named steps:

* :meth:`~MontageRun.poll` — the montage's state and its new tiles from the journal;
* :meth:`~MontageRun.process` — per new tile, three Dask tasks at once: process it, judge it (match
  the overlaps it closes with the neighbours already there) as soon as those are processed, and store
  the processed tile behind the verdict (the run ends when every tile is stored);
* :meth:`~MontageRun.collect` — judged tiles back from Dask, as they finish;
* :meth:`~MontageRun.issue_verdicts` — verdicts strictly in acquisition order (so "N faulty tiles in a
  row" means N consecutive tiles of the scope), the journal written once per batch.

When the scope reports the montage finished, the run waits (at most ``late_tile_seconds``) for every tile
``montage.complete`` names: a ``tile.raw`` can arrive after ``montage.complete`` when the two travel on
different connections. A named tile that never comes is a fault (``tile_not_received``) that stops the
scope at the end of the montage and fails the montage's ``tiles_received`` check.

The last ``qc.status`` is what the platform decided: the montage-level checks (focus, blank, saturated
tiles, overlap, tiles received; :mod:`em_platform.tem.qc_summary`) are computed from the run's result,
and one that fails, which keeps the montage from being stitched and uploaded, makes it STOP_AT_END with
the checks named. Stage positions become search centres through one :class:`StageCalibration`, fixed when
the run starts, so a verdict never depends on when ``montage.complete`` arrives.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from em_platform.cluster.stall import is_stalled
from em_platform.metrics.live import count_verdicts
from em_platform.stitch.grid import (
    NEIGHBOURS,
    Position,
    array_name,
    matched_against,
    neighbour_of,
    stage_to_image,
)
from em_platform.tem.journal import MontageRow, TileReport, TileRow
from em_platform.tem.montage_result import MontageRunResult, StageCalibration, TileProgress
from em_platform.tem.protocol import tile_messages, tile_metadata
from em_platform.tem.qc import Fault, MontageQC, QCConfig, tile_faults, usable_for_matching
from em_platform.tem.qc_summary import MontageLimits, MontageSummary
from em_platform.tem.tile_source import TileSource
from em_platform.tem.tile_tasks import (
    EdgeJob,
    Judgement,
    Stored,
    StoredTile,
    TileOutcome,
    build_flatfield,
    judge_tile,
    process_tile_file,
    store_processed_tile,
    stored_completely,
    warm_up,
)

log = logging.getLogger(__name__)

IN_FLIGHT: dict[str, Any] = {"in_flight": True}  # a match submitted and not yet back

# Dask runs the queued task of highest priority first (default 0: ingests, fusion, cryo). On a cluster the
# runs share (the deployment's), a live tile's tasks go ahead of every batch task that has not started yet;
# among live tiles, the earlier tile first (the offset leaves room for 500,000 tiles per montage).
LIVE_PRIORITY = 1_000_000
# Writing a processed tile waits for the live tiles queued (it is not on the verdict's path), never for batch.
STORE_PRIORITY = LIVE_PRIORITY // 2
# Processed tiles held in memory waiting to be written (25 MB each at 5000²): beyond this many, new tiles
# wait in the run's backlog, so re-processing a finished montage of thousands of tiles (all there at once)
# cannot outrun its writes. A live scope never gets near it: at 3 tiles/s a write keeps up.
MAX_UNSTORED_TILES = 24


class ProcessedTilesNotStored(RuntimeError):
    """Tiles were judged (their verdicts sent) but their processed pixels could not be written."""


class AcquisitionStalled(RuntimeError):
    """No tile arrived for longer than the stall timeout while the montage was still being acquired."""


@dataclass(frozen=True)
class MontageRunConfig:
    # How often the journal is asked for new tiles. A new tile waits half of it on average before its
    # tasks are submitted: 0.1 s keeps that a twentieth of the 1 s latency budget for two indexed queries.
    poll_seconds: float = 0.1
    stall_timeout_seconds: float = 300.0
    # After the scope finished: how long tiles montage.complete names may still arrive (0.15 s late is
    # typical when tile.raw and montage.complete travel on two connections).
    late_tile_seconds: float = 30.0
    # qc.status goes out when it changes, at the end of the montage, and this often in between (the Allen
    # QC service "regularly sends" it), so a scope that reconnects learns the current status.
    status_every_seconds: float = 10.0
    write_tiffs: bool = False
    # A tile whose verdict the journal already holds (a run killed or restarted mid-montage) keeps it: not
    # processed, matched or sent again. True re-judges every tile (e.g. after changing the QC limits).
    rejudge: bool = False
    qc: QCConfig = field(default_factory=QCConfig)
    # the montage-level checks (the acquisition asset's); one that fails makes the last qc.status STOP_AT_END
    limits: MontageLimits = field(default_factory=MontageLimits)


class MontageRun:
    """One montage's live processing (see the module docstring); :meth:`run` returns its result."""

    def __init__(
        self,
        montage_id: str,
        source: TileSource,
        client,
        *,
        processed_url: str,
        storage_options: dict | None = None,
        tiff_dir: str | None = None,
        announce_url: str | None = None,
        config: MontageRunConfig = MontageRunConfig(),
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.montage_id, self.source, self.client = montage_id, source, client
        self.processed_url, self.storage_options, self.tiff_dir = processed_url, storage_options, tiff_dir
        self.announce_url = announce_url or processed_url  # where tile.processed says a tile will be
        self.config, self.log, self.clock, self.sleep = config, logger, clock, sleep
        self.qc = MontageQC(config.qc)
        self.tiles: dict[str, TileProgress] = {}
        self.by_pos: dict[tuple[int, int], TileProgress] = {}
        self.order: list[str] = []  # tile ids in acquisition order
        self.next_verdict = 0
        self.references: list[TileRow] = []
        self.flatfield_future: Any = None
        self.flatfield_refs = 0  # how many references the flatfield being built uses
        self.flatfield_info: dict[str, Any] = {"kind": "none"}
        self.judges: dict[Any, tuple[str, list[tuple[str, str]]]] = {}  # judge future -> (tile, its edges)
        self.completed: queue.Queue = queue.Queue()  # judge futures, as Dask finishes them
        self.storing: dict[Any, str] = {}  # store future -> tile id, until taken
        self.backlog: deque[TileRow] = deque()  # tiles waiting for room among the unstored (in order)
        self.stored: queue.Queue = queue.Queue()  # store futures, as Dask finishes them
        self.store_errors: dict[str, str] = {}  # tile id -> why its processed tile was not written
        self.montage: MontageRow | None = None
        self.calibration: StageCalibration | None = None
        self.named: dict[str, tuple[int | None, int | None]] | None = None
        self.last_seq = 0
        self.last_arrival = clock()
        self.finished_at: float | None = None
        self.sent_status: tuple[str, str | None] | None = None
        self.next_status = clock()
        # CPU seconds per stage: a Counter of floats (typeshed's Counter counts ints: the adds below ignore it)
        self.cpu: Counter[str] = Counter()
        self.polling_since: float | None = None

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self) -> MontageRunResult:
        """Process the montage's tiles as they land until the montage is finished and every tile is judged."""
        import zarr

        start = self.clock()
        # the group the per-tile arrays (r<row>_c<column>) go into; its zarr.json makes it openable
        # mode "a": the tiles an earlier run of this montage stored stay (their verdicts are resumed)
        group = zarr.open_group(self.processed_url, mode="a", storage_options=self.storage_options)
        group.attrs["montage_id"] = self.montage_id
        # imports and OpenCV/zarr set-up on the workers before the first tile is due; held to the end
        # (a released future's task may be cancelled)
        threads = max(1, sum(self.client.nthreads().values()))
        warming = [
            self.client.submit(warm_up, pure=False, priority=LIVE_PRIORITY + 10) for _ in range(threads)
        ]
        try:
            self._loop()
            not_received = self._finish()
            self._wait_for_stores()
        finally:
            for rec in self.tiles.values():
                self._release(rec)
                rec.store = None  # a store not yet written is cancelled: a re-run writes it (see _resumed)
            del warming
        result = MontageRunResult(
            self.montage_id,
            self.tiles,
            self._missing_positions(not_received),
            not_received,
            self.flatfield_info,
            self.qc,
            self.processed_url,
            self.clock() - start,
            dict(self.cpu),
            self.polling_since,
            self.calibration,
        )
        self._decide(result)
        if self.store_errors:
            tiles = sorted(self.store_errors)
            raise ProcessedTilesNotStored(
                f"montage {self.montage_id}: {len(tiles)} processed tile(s) could not be written to "
                f"{self.processed_url} ({', '.join(tiles[:5])}: {self.store_errors[tiles[0]]}); their verdicts "
                "were sent. Fix the storage (space, permissions), then re-run the partition: the verdicts are "
                "kept and only the missing tiles are processed again"
            )
        return result

    def _loop(self) -> None:
        next_poll = self.clock()
        while True:
            if self.clock() >= next_poll:
                self._timed("run_loop.poll", self.poll)
                next_poll = self.clock() + self.config.poll_seconds
            if self.judges:
                self.collect(until=next_poll)
            self._timed("run_loop.verdicts", self.issue_verdicts)
            self._timed("run_loop.status", self.keep_status)
            self._take_stored()
            if self.judges:
                continue
            if self.backlog:  # nothing judging: only writes can make room for the next tiles
                self._take_stored(timeout=max(0.0, next_poll - self.clock()))
                continue
            assert self.montage is not None  # poll() read it, or raised
            if self.montage.finished:
                if not self._waiting_for_named_tiles():
                    return
            elif self.clock() - self.last_arrival > self.config.stall_timeout_seconds:
                raise AcquisitionStalled(
                    f"montage {self.montage_id}: no tile for {self.config.stall_timeout_seconds:g} s while the "
                    f"scope reports it {self.montage.state!r} ({len(self.tiles)} tiles so far); check the "
                    "microscope and the listener, then re-run this partition to resume"
                )
            self.sleep(max(0.0, next_poll - self.clock()))

    def _timed(self, stage: str, step: Callable[[], None]) -> None:
        started = time.thread_time()
        step()
        self.cpu[stage] += time.thread_time() - started  # type: ignore[assignment]

    # -- poll and process --------------------------------------------------------------------------------

    def poll(self) -> None:
        """The montage's state, then its new tiles (each handed to :meth:`process`)."""
        self.polling_since = self.polling_since or time.time()
        self.montage = self.source.montage(self.montage_id)
        if self.montage is None:
            raise KeyError(f"montage {self.montage_id} is not in the acquisition journal")
        if self.montage.retired:
            raise MontageRetired(self.montage_id)
        if self.calibration is None:
            self.calibration = self._calibrate(self.montage)
        if self.montage.finished and self.finished_at is None:
            self.finished_at = self.clock()
        for t in self.source.tiles(self.montage_id, after_seq=self.last_seq):
            self.last_seq = max(self.last_seq, t.seq)
            self.last_arrival = self.clock()
            self.process(t)

    def process(self, t: TileRow) -> None:
        """A new tile: a reference frame feeds the flatfield; a montage tile gets its two tasks."""
        if t.is_reference:
            self.references.append(t)
            if not self.order and _both_references(self.references):
                # Built as soon as the references are in, not when the first tile needs it: the scope takes
                # them a few cycles before the first tile. A later reference (still before the first tile)
                # starts a new build; references after the first tile are not used (one flatfield per montage).
                self._start_flatfield()
            return
        if not self.order and (self.flatfield_future is None or self.flatfield_refs != len(self.references)):
            self._start_flatfield()
        if t.tile_id in self.tiles:
            return  # the journal hands each tile over once; a re-sent tile.raw with a new id is a new tile
        if self.backlog or len(self.storing) >= MAX_UNSTORED_TILES:
            self.backlog.append(t)  # in acquisition order, behind the tiles already waiting
            return
        self._take_on(t)

    def _drain_backlog(self) -> None:
        while self.backlog and len(self.storing) < MAX_UNSTORED_TILES:
            self._take_on(self.backlog.popleft())

    def _take_on(self, t: TileRow) -> None:
        """The tile becomes the run's: resumed from the journal, or its three tasks submitted."""
        resumed = None if self.config.rejudge else self._resumed(t)
        rec = resumed or TileProgress(t, times={"landed": t.acquired_at.timestamp(), "seen": time.time()})
        self.tiles[t.tile_id] = rec
        self.order.append(t.tile_id)
        self.by_pos[(t.row, t.column)] = rec
        n = len(self.order)
        if resumed is not None:
            if rec.outcome is not None and not self._stored(t):
                self._submit_processing(rec, n)  # judged and sent, cut off before its pixels were written
            return
        self._submit_processing(rec, n)
        edges = self._edges_closed_by(rec)
        judge = self.client.submit(
            judge_tile,
            t.tile_id,
            rec.future,
            [(job, a, b) for job, a, b in edges],
            self.config.qc,
            pure=False,
            priority=LIVE_PRIORITY - 2 * n + 1,  # ... and judged before the next tile is processed
        )
        self.judges[judge] = (t.tile_id, [(job.tile_id, job.position) for job, _, _ in edges])
        judge.add_done_callback(self.completed.put)

    def _submit_processing(self, rec: TileProgress, n: int) -> None:
        """The tile's processing task and, behind it, the store of its processed pixels."""
        t = rec.tile
        rec.future = self.client.submit(
            process_tile_file,
            t.path,
            self.flatfield_future,
            overlap=t.overlap or 0,
            pure=False,
            priority=LIVE_PRIORITY - 2 * n,  # first come, first processed (else Dask picks any order) ...
        )
        rec.store = self.client.submit(
            store_processed_tile,
            rec.future,
            url=self._tile_url(t),
            storage_options=self.storage_options,
            tiff_path=self._tiff_path(t),
            pure=False,
            priority=STORE_PRIORITY - n,
        )
        self.storing[rec.store] = t.tile_id
        rec.store.add_done_callback(self.stored.put)

    def _resumed(self, t: TileRow) -> TileProgress | None:
        """The tile as an earlier run of this montage judged it, when the journal holds its verdict: so a run
        killed or restarted mid-montage judges and sends each tile once (a tile whose processed pixels were
        not written to the end is processed again, not judged again). Its faults rejoin the montage's QC in acquisition order (the journal commits
        verdicts in that order), so runs of faulty tiles count across the restart."""
        if t.qc_passed is None or self.order and not self.tiles[self.order[-1]].resumed:
            return None  # not judged, or after a tile this run judges anew: from here on, all anew
        results = t.results or {}
        rec = TileProgress(t, resumed=True)
        if t.error is not None:
            rec.error = t.error
        elif "stats" in results:
            focus = results["focus"]
            rec.outcome = TileOutcome(results["stats"], focus, tuple(results["shape"]))
            unmatched: dict[str, dict[str, Any] | None] = {p: None for p in results.get("unmatched", [])}
            rec.matches = unmatched | dict(results.get("matches", {}))
        else:
            return None  # judged by a version that did not keep what resuming needs
        faults = [Fault(**f) for f in t.qc_faults or []]
        rec.verdict = self.qc.add(t.tile_id, t.row, t.column, faults)
        return rec

    def _stored(self, t: TileRow) -> bool:
        return stored_completely(self._tile_url(t), self.storage_options)

    def _tile_url(self, t: TileRow) -> str:
        """Where the tile's processed pixels are stored (a zarr array in the montage's group)."""
        return f"{self.processed_url}/{array_name(t.row, t.column)}"

    def _edges_closed_by(self, rec: TileProgress) -> list[tuple[EdgeJob, Any, Any]]:
        """The overlaps the new tile closes: with its top and left neighbours, and as the top or left
        neighbour of tiles that arrived before it (another raster order, a late tile)."""
        t = rec.tile
        pairs: list[tuple[TileProgress | None, Position, TileProgress | None]]
        pairs = [(rec, p, self.by_pos.get(neighbour_of(t.row, t.column, p))) for p in NEIGHBOURS]
        pairs += [(self.by_pos.get(where), p, rec) for where, p in matched_against(t.row, t.column)]
        edges = []
        for tile, position, neighbour in pairs:
            if tile is None or neighbour is None or position in tile.matches:
                continue
            ends = self._end(tile), self._end(neighbour)
            if None in ends:
                tile.matches[position] = {"skipped": True}  # a faulty tile: nothing to match, no one's fault
                continue
            tile.matches[position] = IN_FLIGHT
            job = EdgeJob(
                tile.tile.tile_id,
                tile.tile.row,
                tile.tile.column,
                position,
                tile.tile.overlap or 0,
                self._stage_offset(tile.tile, neighbour.tile),
            )
            edges.append((job, *ends))
        return edges

    def _end(self, rec: TileProgress) -> Any:
        """A tile as one end of a match: its processing future, its store's once that is released, its
        stored pixels once both are, or None when it has nothing to match (failed, or a single-tile fault)."""
        if rec.judged and (rec.error is not None or not self._usable(rec)):
            return None
        if rec.future is not None:
            return rec.future
        if rec.store is not None:
            return rec.store
        url = self._tile_url(rec.tile)
        shape = rec.outcome.shape if rec.outcome is not None else None
        assert shape is not None  # judged usable: processed
        return StoredTile(url, self.storage_options, shape)

    def _usable(self, rec: TileProgress) -> bool:
        return rec.outcome is not None and usable_for_matching(
            rec.outcome.stats, rec.outcome.focus, self.config.qc
        )

    def _calibrate(self, m: MontageRow) -> StageCalibration:
        """The montage's own pixel size and rotation when it is already complete (a re-processing), else
        the scope's configured calibration, else none (searches around nominal only), for the whole run."""
        configured_rotation = self.source.rotation_rad or 0.0
        if m.announced_complete and m.pixel_size_nm:
            rotation = m.rotation_angle if m.rotation_angle is not None else configured_rotation
            return StageCalibration(m.pixel_size_nm, rotation, "montage.complete")
        if self.source.pixel_size_nm:
            return StageCalibration(self.source.pixel_size_nm, configured_rotation, "configured")
        self.log.warning(
            "montage %s: no pixel size known before montage.complete (set EM_SCOPE_PIXEL_SIZE_NM to the "
            "scope's calibration): live matching searches around the nominal grid only, ignoring the stage "
            "positions, so neighbours further off than a third of the overlap are judged unmatched",
            self.montage_id,
        )
        return StageCalibration(None, configured_rotation, "none")

    def _stage_offset(self, tile: TileRow, neighbour: TileRow) -> tuple[float, float] | None:
        """Where the stage puts the tile relative to the neighbour, image px (the run's
        :class:`StageCalibration`); None without positions or a pixel size."""
        assert self.calibration is not None  # poll() sets it before any tile is taken
        pixel_size, rotation = self.calibration.pixel_size_nm, self.calibration.rotation_rad
        tx, ty, nx, ny = tile.stage_x_nm, tile.stage_y_nm, neighbour.stage_x_nm, neighbour.stage_y_nm
        if not pixel_size or tx is None or ty is None or nx is None or ny is None:
            return None
        dx, dy = tx - nx, ty - ny
        return stage_to_image(dx, dy, pixel_size, rotation)

    def _tiff_path(self, t: TileRow) -> str | None:
        if self.tiff_dir and self.config.write_tiffs:
            return f"{self.tiff_dir}/{t.tile_id}.processed.tiff"
        return None

    def _start_flatfield(self) -> None:
        bright = [r.path for r in self.references if r.brightfield]
        dark = [r.path for r in self.references if r.darkfield]
        self.flatfield_refs = len(self.references)
        info = {"brightfield_frames": len(bright), "darkfield_frames": len(dark)}
        if not bright or not dark:
            self.log.warning(
                "no brightfield/darkfield reference frames before the first tile: tiles are not flatfield-corrected"
            )
            self.flatfield_future = self.client.scatter(None)
            self.flatfield_info = {"kind": "none", **info}
            return
        self.flatfield_future = self.client.submit(
            build_flatfield, bright, dark, pure=False, priority=LIVE_PRIORITY + 10
        )
        self.flatfield_info = {
            "kind": "brightfield/darkfield",
            **info,
            "brightfield": bright,
            "darkfield": dark,
        }

    # -- collect ----------------------------------------------------------------------------------------

    def collect(self, until: float) -> None:
        """Take the judged tiles Dask has finished (waiting for one until ``until`` at most)."""
        started = time.thread_time()
        try:
            done = [self.completed.get(timeout=max(0.0, until - self.clock()))]
        except queue.Empty:
            return
        finally:
            self.cpu["run_loop.collect"] += time.thread_time() - started  # type: ignore[assignment]
        started = time.thread_time()
        while True:
            try:
                done.append(self.completed.get_nowait())
            except queue.Empty:
                break
        for fut in done:
            self._take(fut)
        self.cpu["run_loop.collect"] += time.thread_time() - started  # type: ignore[assignment]

    def _take(self, fut) -> None:
        tile_id, edges = self.judges.pop(fut)
        if fut.status == "error":  # the task itself failed (a worker lost, a bug): say so, lose nothing else
            exc = fut.exception()
            _stop_if_stalled(exc)
            error = f"{type(exc).__name__}: {exc}"
            failed = TileOutcome(None, None, None, error=error)
            judgement = Judgement(tile_id, failed, [(t, p, {"error": error}) for t, p in edges], {})
        else:
            judgement = _result(fut)
        fut.release()
        rec = self.tiles[judgement.tile_id]
        o = judgement.outcome
        self.cpu.update(o.cpu)
        self.cpu.update(judgement.cpu)
        rec.times.update(o.times, **judgement.times, collected=time.time())
        if o.error is not None:
            rec.error = o.error
            self.log.warning(
                "tile %s (row %d, column %d) failed: %s",
                rec.tile.tile_id,
                rec.tile.row,
                rec.tile.column,
                o.error,
            )
            self._release(rec)
        else:
            rec.outcome = o
            if not self._usable(rec):
                self._release(rec)  # its strips will never be matched
        for tile_id, position, m in judgement.matches:
            if m is not None and "error" in m:  # counted as no overlap found, but a bug or bad input: say so
                self.log.warning(
                    "matching tile %s to its %s neighbour failed: %s", tile_id, position, m["error"]
                )
                m = None
            owner = self.tiles[tile_id]
            owner.matches[position] = m
            if owner.verdict is not None and m is not None and "dX" in m:
                self.source.late_matches(tile_id, {position: m})
        top = self.by_pos.get(neighbour_of(rec.tile.row, rec.tile.column, "top"))
        if top is not None and top is not rec:
            self._release(top)  # the tile below is matched: its strips are done with (memory: about a row)

    def _release(self, rec: TileProgress) -> None:
        if rec.future is not None:
            rec.future.release()
            rec.future = None

    # -- stores ------------------------------------------------------------------------------------------

    def _take_stored(self, block: bool = False, timeout: float = 0.0) -> None:
        """Take the stores Dask has finished (waiting up to ``timeout`` for one; with ``block``, for all):
        their cost, and any failure (reported when the run ends); then the backlog gets the room."""
        deadline = self.clock() + timeout
        while self.storing:
            try:
                wait = 1.0 if block else max(0.0, deadline - self.clock())
                fut = self.stored.get(timeout=wait) if wait > 0 else self.stored.get_nowait()
            except queue.Empty:
                if block:
                    continue
                break
            deadline = self.clock()  # one taken: the rest only if already there
            tile_id = self.storing.pop(fut, None)
            if tile_id is None:
                continue
            if fut.status == "lost":  # written, then its worker went away with the result: Dask runs it again
                self.storing[fut] = tile_id  # (the same bytes to the same place) and it comes back here
                fut.add_done_callback(self.stored.put)
                continue
            rec = self.tiles[tile_id]
            if fut.status == "error":
                exc = fut.exception()
                _stop_if_stalled(exc)
                self.store_errors[tile_id] = f"{type(exc).__name__}: {exc}"
                self.log.error("tile %s: its processed tile was not written: %s", tile_id, exc)
            elif fut.status == "finished":
                stored = _result(fut)
                if isinstance(stored, Stored):
                    self.cpu.update(stored.cpu)
                    rec.times.update(stored.times)
            else:  # cancelled: its worker went away; a re-run re-makes it
                self.store_errors[tile_id] = f"the store task was {fut.status}"
            if rec.store is fut:
                rec.store = None
            fut.release()
        self._drain_backlog()

    def _wait_for_stores(self) -> None:
        """Every processed tile written (or its failure known) before the montage's result is handed on."""
        self._take_stored(block=True)

    # -- verdicts ---------------------------------------------------------------------------------------

    def issue_verdicts(self) -> None:
        """Verdicts for the judged tiles, strictly in acquisition order; one journal commit for them all."""
        reports, judged = [], []
        while self.next_verdict < len(self.order):
            rec = self.tiles[self.order[self.next_verdict]]
            if not rec.judged or any(m is IN_FLIGHT for m in rec.matches.values()):
                break
            if not rec.resumed:  # a resumed tile's verdict went out from the run that judged it
                reports.append(self._verdict(rec))
                judged.append(rec)
            self.next_verdict += 1
        if reports:
            self.source.report(reports)
            committed = time.time()
            for rec in judged:
                rec.times["verdict"] = committed
            count_verdicts(judged, getattr(self.source, "tile_shares", None))

    def _verdict(self, rec: TileProgress) -> TileReport:
        t, o = rec.tile, rec.outcome
        matches = [m for m in rec.matches.values() if m is None or "dX" in m]  # None: no overlap found
        stats, focus = (o.stats, o.focus) if o is not None else (None, None)
        faults = tile_faults(stats, focus, matches, self.config.qc, error=rec.error)
        rec.verdict = self.qc.add(t.tile_id, t.row, t.column, faults)
        faults_msg = [f.message() for f in rec.verdict.faults]
        meta = tile_metadata(
            t.tile_id, t.montage_id, t.row, t.column, t.overlap, (t.stage_x_nm, t.stage_y_nm)
        )
        processed = (
            (self._tiff_path(t) or f"{self.announce_url}/{array_name(t.row, t.column)}") if o else None
        )
        return TileReport(
            t.tile_id,
            tile_messages(
                meta, stats, focus, [m for m in matches if m], processed, rec.verdict.passed, faults_msg
            ),
            status="failed" if rec.error else "processed",
            results=_results(rec),
            qc_passed=rec.verdict.passed,
            qc_faults=faults_msg,
            error=rec.error,
        )

    def keep_status(self, final: bool = False) -> None:
        """``qc.status`` when it changed, every ``status_every_seconds``, and at the end (``final``)."""
        current = (self.qc.status, self.qc.reason)
        changed = current != self.sent_status
        if changed or final or self.clock() >= self.next_status:
            self.source.send_status(self.montage_id, *current, changed=changed)
            if changed:
                self.log.info("qc.status %s%s", current[0], f" ({current[1]})" if current[1] else "")
            self.sent_status = current
            self.next_status = self.clock() + self.config.status_every_seconds

    # -- the end ----------------------------------------------------------------------------------------

    def _waiting_for_named_tiles(self) -> bool:
        """True while tiles montage.complete names (or montage.complete itself) may still arrive."""
        assert self.montage is not None and self.finished_at is not None  # called once it is finished
        if self.montage.state != "completed":
            return False  # cancelled or failed: nothing more is coming
        if self.named is None:
            self.named = self.source.named_tiles(self.montage_id)
        outstanding = self.named is None or any(tid not in self.tiles for tid in self.named)
        return outstanding and self.clock() - self.finished_at < self.config.late_tile_seconds

    def _finish(self) -> dict[str, tuple[int | None, int | None]]:
        waited = self.clock() - (self.finished_at or self.clock())
        not_received = {tid: rc for tid, rc in (self.named or {}).items() if tid not in self.tiles}
        for tid, (row, column) in sorted(not_received.items(), key=lambda kv: (kv[1][0] or 0, kv[1][1] or 0)):
            self.qc.add_not_received(tid, row, column, waited)
        if not_received:
            self.log.error(
                "montage %s: %d tile(s) montage.complete names never arrived within %g s: %s; re-run the "
                "partition once they are in the journal",
                self.montage_id,
                len(not_received),
                self.config.late_tile_seconds,
                ", ".join(sorted(not_received)[:5]),
            )
        for r, c in self._missing_positions(not_received):
            self.qc.add_missing(f"missing-r{r}-c{c}", r, c)
        return not_received

    def _decide(self, result: MontageRunResult) -> None:
        """The last ``qc.status``: the tile verdicts' status, made STOP_AT_END (naming them) when a
        montage-level check fails, since the platform will then neither stitch nor upload the montage."""
        checks = MontageSummary.of(result).checks(self.config.limits)
        self.qc.fail_checks([c.description for c in checks if not c.passed])
        self.keep_status(final=True)
        self.log.info(
            "montage %s: %d tiles, QC %s%s",
            self.montage_id,
            len(self.tiles),
            self.qc.status,
            f" ({self.qc.reason})" if self.qc.reason else "",
        )

    def _missing_positions(
        self, not_received: dict[str, tuple[int | None, int | None]]
    ) -> list[tuple[int, int]]:
        """Grid positions never acquired: from the planned tile count and the grid the tiles span."""
        taken = set(self.by_pos) | {
            (r, c) for r, c in not_received.values() if r is not None and c is not None
        }
        if not taken or self.montage is None:
            return []
        rows = max(r for r, _ in taken) + 1
        cols = max(c for _, c in taken) + 1
        total = self.montage.total_tiles or rows * cols
        if total > rows * cols and total % cols == 0:
            rows = total // cols
        return [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in taken][
            : max(total - len(taken), 0)
        ]


def run_montage(montage_id: str, source: TileSource, client, **options: Any) -> MontageRunResult:
    """Process a montage's tiles as they land until the montage is finished and every tile is judged
    (``options``: :class:`MontageRun`'s keywords)."""
    return MontageRun(montage_id, source, client, **options).run()


def _both_references(references: list[TileRow]) -> bool:
    return any(r.brightfield for r in references) and any(r.darkfield for r in references)


def _results(rec: TileProgress) -> dict[str, Any] | None:
    if rec.outcome is None:
        return None
    s, focus, shape = rec.outcome.stats, rec.outcome.focus, rec.outcome.shape
    assert s is not None and focus is not None and shape is not None  # a processed tile's outcome
    return {
        "min": s["min"],
        "max": s["max"],
        "mean": s["mean"],
        "std": s["std"],
        "focus": float(focus),
        "histogram": list(s["histogram"]),
        "matches": {p: m for p, m in rec.matches.items() if m and "dX" in m},
        # what a restarted run needs to take the verdict over without the pixels (see MontageRun._resumed)
        "stats": {k: (list(v) if k == "histogram" else v) for k, v in s.items()},
        "shape": list(shape),
        "unmatched": [p for p, m in rec.matches.items() if m is None],
    }


class MontageRetired(RuntimeError):
    """A run of a montage whose journal rows were let go after it was archived: nothing is judged or uploaded
    again (its record and tile records stay in the catalog)."""

    def __init__(self, montage_id: str):
        super().__init__(
            f"montage {montage_id} was archived and its journal rows let go after EM_RETAIN_JOURNAL_DAYS: it "
            "cannot be run again from the journal; its record and tile records are in the catalog (source "
            "'acquisition'), its raw tiles where the record names them"
        )


def _result(fut):
    """A finished task's result. Finished is not fetched: the worker holding it may be gone by then (a job
    cancelled), and Dask makes it again, which fails if no worker comes: then the run stops as for a stall."""
    try:
        return fut.result()
    except Exception as exc:
        _stop_if_stalled(exc)
        raise


def _stop_if_stalled(exc: BaseException | None) -> None:
    """No worker for the cluster's whole wait is no tile's fault: the run stops, judging nothing as failed,
    and a re-run resumes from the tiles already judged and stored."""
    if is_stalled(exc):
        raise RuntimeError(f"the compute cluster ran no worker for this montage's tasks: {exc}") from exc
