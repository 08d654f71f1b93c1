"""One montage's live processing: tiles are taken from the journal as they land, processed on Dask,
matched against their top and left neighbours, QC'd, and the verdicts sent back while the scope is
still imaging. The same code re-processes a finished montage (all its tiles are simply there at once).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from em_platform.tem.journal import MontageRow, TileRow
from em_platform.tem.qc import (
    BLANK,
    NO_MATCH,
    OUT_OF_FOCUS,
    SATURATED,
    MontageQC,
    QCConfig,
    TileVerdict,
    tile_faults,
)
from em_platform.tem.tile_tasks import (
    TileOutcome,
    build_flatfield,
    match_outcomes,
    process_tile_file,
    warm_up,
)

log = logging.getLogger(__name__)


class AcquisitionStalled(RuntimeError):
    """No tile arrived for longer than the stall timeout while the montage was still being acquired."""


@dataclass(frozen=True)
class MontageRunConfig:
    # How often the journal is asked for new tiles. A new tile waits half of it on average before its
    # task is submitted: 0.1 s keeps that a tenth of the 1 s latency budget for two indexed queries.
    poll_seconds: float = 0.1
    stall_timeout_seconds: float = 300.0
    write_tiffs: bool = False
    qc: QCConfig = field(default_factory=QCConfig)


@dataclass
class TileRecord:
    tile: TileRow
    outcome: TileOutcome | None = None
    future: Any = None  # the processing future, kept so match tasks take their inputs from the workers
    error: str | None = None
    matches: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    verdict: TileVerdict | None = None


@dataclass
class MontageRunResult:
    montage_id: str
    tiles: dict[str, TileRecord]
    missing: list[tuple[int, int]]
    flatfield: dict[str, Any]
    qc: MontageQC
    processed_url: str
    seconds: float

    def edges(self) -> list[dict[str, Any] | None]:
        """Every neighbour match attempted (None: no overlap found); edges skipped for a faulty neighbour excluded."""
        return [
            m
            for r in self.tiles.values()
            if r.outcome is not None
            for m in r.matches.values()
            if not (m and m.get("skipped"))
        ]

    def fault_fractions(self) -> dict[str, float]:
        """Montage-level QC figures: fraction of planned tiles with each fault, and of edges left unmatched."""
        faults = self.qc.summary()["faults"]
        n = max(len(self.tiles) + len(self.missing), 1)

        def frac(fault: str) -> float:
            return sum(faults.get(fault, {}).values()) / n

        return {
            OUT_OF_FOCUS: frac(OUT_OF_FOCUS),
            BLANK: frac(BLANK),
            SATURATED: frac(SATURATED),
            "critical_saturated": float(faults.get(SATURATED, {}).get("critical", 0)),
            "unmatched_edges": sum(faults.get(NO_MATCH, {}).values()) / max(len(self.edges()), 1),
        }

    @property
    def grid(self) -> tuple[int, int]:
        rows = max((r.tile.row for r in self.tiles.values()), default=-1) + 1
        cols = max((r.tile.column for r in self.tiles.values()), default=-1) + 1
        for r, c in self.missing:
            rows, cols = max(rows, r + 1), max(cols, c + 1)
        return rows, cols


class Source(Protocol):
    """What the runner needs from the acquisition hardware (the Dagster resource satisfies it)."""

    pixel_size_nm: float | None

    def montage(self, montage_id: str) -> MontageRow | None: ...
    def tiles(self, montage_id: str, after_seq: int = 0) -> list[TileRow]: ...
    def send(self, topic: str, payload: dict[str, Any], *, montage_id: str | None = None) -> None: ...
    def report_tile(
        self, tile_id: str, outgoing: list[tuple[str, dict[str, Any]]], **results: Any
    ) -> None: ...


def _metadata(t: TileRow) -> dict[str, Any]:
    """The TileMetadata fields every tile.* message carries."""
    meta = {
        "tile_id": t.tile_id,
        "montage_id": t.montage_id,
        "row": t.row,
        "column": t.column,
        "overlap": t.overlap or 0,
    }
    if t.stage_x_nm is not None and t.stage_y_nm is not None:
        meta["stage_position"] = [t.stage_x_nm, t.stage_y_nm]
    return meta


def run_montage(
    montage_id: str,
    source: Source,
    client,
    *,
    processed_url: str,
    storage_options: dict | None = None,
    tiff_dir: str | None = None,
    config: MontageRunConfig = MontageRunConfig(),
    logger: logging.Logger = log,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> MontageRunResult:
    """Process a montage's tiles as they land until the montage is finished and every tile is done."""
    import zarr

    start = clock()
    # The group the per-tile arrays (r<row>_c<column>) go into; its zarr.json is what makes it openable.
    zarr.open_group(
        processed_url, mode="w", storage_options=storage_options, attributes={"montage_id": montage_id}
    )
    qc = MontageQC(config.qc)
    records: dict[str, TileRecord] = {}
    by_pos: dict[tuple[int, int], TileRecord] = {}
    references: list[TileRow] = []
    flatfield_future = None
    flatfield_refs = 0  # how many references the flatfield being built uses
    flatfield_info: dict[str, Any] = {"kind": "none"}
    futures: dict[Any, str] = {}  # future -> tile_id (processing)
    match_futures: dict[Any, tuple[str, str]] = {}  # future -> (tile_id, position)
    last_seq = 0
    last_arrival = clock()
    sent_status = None

    def send_status() -> None:
        nonlocal sent_status
        if qc.status != sent_status:
            sent_status = qc.status
            source.send("qc.status", {"status": qc.status, "reason": qc.reason}, montage_id=montage_id)
            logger.info("qc.status %s%s", qc.status, f" ({qc.reason})" if qc.reason else "")

    def usable(rec: TileRecord) -> bool:
        """Processed and free of single-tile faults (blank, saturated, out of focus): worth matching.

        A faulty tile already has its verdict; matching it (or against it) would only blame its neighbours.
        """
        return rec.outcome is not None and not tile_faults(
            rec.outcome.stats, rec.outcome.focus, [], config.qc
        )

    def try_match(rec: TileRecord) -> None:
        """Submit matches against top/left neighbours whose processing is done and usable."""
        t = rec.tile
        for position, (dr, dc) in (("top", (-1, 0)), ("left", (0, -1))):
            if position in rec.matches or not usable(rec):
                continue
            nbr = by_pos.get((t.row + dr, t.column + dc))
            if nbr is None or (nbr.outcome is None and nbr.error is None):
                continue  # not acquired yet (or never: decided at the end)
            if not usable(nbr):
                rec.matches[position] = {"skipped": True}  # nothing to match against: not this tile's fault
                continue
            rec.matches[position] = {}  # in flight
            fut = submit(
                match_outcomes,
                rec.future,  # futures, not outcomes: the strips stay on the worker
                nbr.future,
                position,
                t.overlap or 0,
                t.row,
                t.column,
                _expected_offset(t, nbr.tile, position, nbr.outcome.shape, pixel_size()),
            )
            match_futures[fut] = (t.tile_id, position)

    def pixel_size() -> float | None:
        """The montage's own (from montage.complete, when re-processing), else the scope's calibration."""
        return (montage.pixel_size_nm if montage else None) or source.pixel_size_nm

    order: list[str] = []  # tile ids in acquisition order; verdicts are issued strictly in this order,
    next_verdict = 0  # so that "N faulty tiles in a row" means N consecutive tiles of the scope

    def issue_in_order(final: bool = False) -> None:
        nonlocal next_verdict
        while next_verdict < len(order):
            rec = records[order[next_verdict]]
            try_verdict(rec, final)
            if rec.verdict is None:
                return
            next_verdict += 1
            release(by_pos.get((rec.tile.row - 1, rec.tile.column)))

    def release(rec: TileRecord | None) -> None:
        """Drop a tile's overlap strips once the tile below it is judged: memory stays about one row of tiles."""
        if rec is not None and rec.future is not None:
            rec.future.release()
            rec.future = None
            rec.outcome = TileOutcome(
                rec.outcome.stats, rec.outcome.focus, rec.outcome.shape, {}, rec.outcome.tiff_path
            )

    def try_verdict(rec: TileRecord, final: bool = False) -> None:
        if rec.verdict is not None:
            return
        if rec.error is None and rec.outcome is None:
            return
        t = rec.tile
        if rec.error is None:
            needed = [
                p
                for p, (dr, dc) in (("top", (-1, 0)), ("left", (0, -1)))
                if (t.row + dr, t.column + dc) in by_pos
            ]
            in_flight = [p for p in needed if rec.matches.get(p) == {} or p not in rec.matches]
            if in_flight and not final:
                return
        matches = [m for m in rec.matches.values() if m is None or "dX" in m]  # None: no overlap found
        faults = tile_faults(
            rec.outcome.stats if rec.outcome else None,
            rec.outcome.focus if rec.outcome else None,
            matches,
            config.qc,
            error=rec.error,
        )
        rec.verdict = qc.add(t.tile_id, t.row, t.column, faults)
        meta = _metadata(t)
        outgoing: list[tuple[str, dict[str, Any]]] = []
        if rec.outcome is not None:
            s = rec.outcome.stats
            outgoing += [
                (
                    "tile.statistics.min_max_mean",
                    {**meta, "min": s["min"], "max": s["max"], "mean": s["mean"], "std": s["std"]},
                ),
                ("tile.statistics.histogram", {**meta, "hist": list(s["histogram"])}),
                ("tile.statistics.focus", {**meta, "focus": float(rec.outcome.focus)}),
            ]
            found = [m for m in matches if m is not None]
            if found:
                outgoing.append(("tile.matches", {**meta, "matches": [_match_message(m, t) for m in found]}))
            if rec.outcome.tiff_path:
                outgoing.append(("tile.processed", {**meta, "path": rec.outcome.tiff_path}))
        faults_msg = [f.message() for f in rec.verdict.faults]
        outgoing.append(("qc.tile", {**meta, "passed": rec.verdict.passed, "faults": faults_msg}))
        source.report_tile(
            t.tile_id,
            outgoing,
            status="failed" if rec.error else "processed",
            results=_results(rec),
            qc_passed=rec.verdict.passed,
            qc_faults=faults_msg,
            error=rec.error,
        )
        send_status()

    # Dask calls back (from its own thread) as each task finishes: the loop waits on this queue instead of
    # re-scanning every future, and looks at the journal only every poll_seconds.
    completed: queue.Queue = queue.Queue()

    def submit(fn, *args, **kwargs):
        fut = client.submit(fn, *args, pure=False, **kwargs)
        fut.add_done_callback(completed.put)
        return fut

    def tile_done(fut) -> list[TileRecord]:
        """Take a finished tile task; returns the records that may now be matchable."""
        rec = records[futures.pop(fut)]
        if fut.status == "error":
            exc = fut.exception()
            rec.error = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "tile %s (row %d, column %d) failed: %s",
                rec.tile.tile_id,
                rec.tile.row,
                rec.tile.column,
                rec.error,
            )
            fut.release()
        else:
            rec.outcome = fut.result()
            rec.future = fut  # released once the tile and its later neighbours are matched
        t = rec.tile
        below, right = by_pos.get((t.row + 1, t.column)), by_pos.get((t.row, t.column + 1))
        return [r for r in (rec, below, right) if r is not None]

    # imports and OpenCV/zarr set-up on the workers before the first tile is due; not waited for
    # (the futures are held until the end: a released future's task may be cancelled)
    threads = max(1, sum(client.nthreads().values()))
    warming = [client.submit(warm_up, pure=False, priority=1) for _ in range(threads)]
    montage: MontageRow | None = None
    next_poll = clock()
    while True:
        if clock() >= next_poll:
            montage = source.montage(montage_id)  # before the tiles: when it says finished, all tiles are in
            if montage is None:
                raise KeyError(f"montage {montage_id} is not in the acquisition journal")
            new_references = False
            for t in source.tiles(montage_id, after_seq=last_seq):
                last_seq = max(last_seq, t.seq)
                last_arrival = clock()
                if t.is_reference:
                    references.append(t)
                    new_references = True
                    continue
                if not order and (flatfield_future is None or flatfield_refs != len(references)):
                    flatfield_future, flatfield_info = _start_flatfield(client, references, logger)
                    flatfield_refs = len(references)
                rec = TileRecord(t)
                records[t.tile_id] = rec
                order.append(t.tile_id)
                by_pos[(t.row, t.column)] = rec
                fut = submit(
                    process_tile_file,
                    t.path,
                    flatfield_future,
                    overlap=t.overlap or 0,
                    out_url=processed_url,
                    storage_options=storage_options,
                    array_name=f"r{t.row:03d}_c{t.column:03d}",
                    tiff_path=f"{tiff_dir}/{t.tile_id}.processed.tiff"
                    if tiff_dir and config.write_tiffs
                    else None,
                    priority=-len(order),  # first come, first processed (Dask would otherwise pick any order)
                )
                futures[fut] = t.tile_id
            if new_references and not order and _both_references(references):
                # Built as soon as the references are in, not when the first tile needs it: the scope takes
                # them a few cycles before the first tile. A later reference (still before the first tile)
                # starts a new build; references after the first tile are not used (one flatfield per montage).
                flatfield_future, flatfield_info = _start_flatfield(client, references, logger)
                flatfield_refs = len(references)
            next_poll = clock() + config.poll_seconds
        busy = bool(futures or match_futures)
        if busy:
            done = []
            try:
                done.append(completed.get(timeout=max(0.0, next_poll - clock())))
                while True:
                    done.append(completed.get_nowait())
            except queue.Empty:
                pass
            touched: dict[str, TileRecord] = {}
            for fut in done:
                if fut in futures:
                    touched.update((r.tile.tile_id, r) for r in tile_done(fut))
                elif fut in match_futures:
                    tile_id, position = match_futures.pop(fut)
                    if fut.status == "error":  # counted as no overlap found, but a bug or bad input: say so
                        exc = fut.exception()
                        logger.warning(
                            "matching tile %s to its %s neighbour failed: %r", tile_id, position, exc
                        )
                    records[tile_id].matches[position] = None if fut.status == "error" else fut.result()
                    fut.release()
                    touched[tile_id] = records[tile_id]
            for rec in touched.values():
                if rec.verdict is None and (rec.outcome is not None or rec.error is not None):
                    try_match(rec)
            issue_in_order()
        elif montage.finished:
            if any(r.verdict is None for r in records.values()):
                for rec in sorted(records.values(), key=lambda r: r.tile.seq):
                    try_match(rec)
                if match_futures:
                    continue
                issue_in_order(final=True)
            break
        else:
            if clock() - last_arrival > config.stall_timeout_seconds:
                raise AcquisitionStalled(
                    f"montage {montage_id}: no tile for {config.stall_timeout_seconds:g} s while the scope reports it "
                    f"{montage.state!r} ({len(records)} tiles so far); check the microscope and the listener, "
                    "then re-run this partition to resume"
                )
            sleep(max(0.0, next_poll - clock()))

    del warming
    missing = _missing_positions(montage, by_pos)
    for r, c in missing:
        qc.add_missing(f"missing-r{r}-c{c}", r, c)
    if missing:
        send_status()
    logger.info("montage %s: %d tiles, %d missing, QC %s", montage_id, len(records), len(missing), qc.status)
    return MontageRunResult(montage_id, records, missing, flatfield_info, qc, processed_url, clock() - start)


def _both_references(references: list[TileRow]) -> bool:
    return any(r.brightfield for r in references) and any(r.darkfield for r in references)


def _start_flatfield(client, references: list[TileRow], logger) -> tuple[Any, dict[str, Any]]:
    bright = [r.path for r in references if r.brightfield]
    dark = [r.path for r in references if r.darkfield]
    if not bright or not dark:
        logger.warning(
            "no brightfield/darkfield reference frames before the first tile: tiles are not flatfield-corrected"
        )
        return client.scatter(None), {
            "kind": "none",
            "brightfield_frames": len(bright),
            "darkfield_frames": len(dark),
        }
    future = client.submit(build_flatfield, bright, dark, pure=False)
    return future, {
        "kind": "brightfield/darkfield",
        "brightfield_frames": len(bright),
        "darkfield_frames": len(dark),
        "brightfield": bright,
        "darkfield": dark,
    }


def _expected_offset(
    tile: TileRow,
    neighbour: TileRow,
    position: str,
    neighbour_shape: tuple[int, int],
    pixel_size_nm: float | None,
) -> tuple[float, float] | None:
    """Where the stage says the tile sits relative to its neighbour, as (dX, dY) px from nominal.

    Stage positions are field-of-view centres in nm; stage axes are taken as the image axes (x right,
    y down, as the simulator and an unrotated scope report them). None without positions or pixel size.
    """
    if not pixel_size_nm or None in (
        tile.stage_x_nm,
        tile.stage_y_nm,
        neighbour.stage_x_nm,
        neighbour.stage_y_nm,
    ):
        return None
    step = neighbour_shape[1 if position == "left" else 0] - (tile.overlap or 0)
    dx = (tile.stage_x_nm - neighbour.stage_x_nm) / pixel_size_nm
    dy = (tile.stage_y_nm - neighbour.stage_y_nm) / pixel_size_nm
    return (dx - step, dy) if position == "left" else (dx, dy - step)


def _missing_positions(
    montage: MontageRow, by_pos: dict[tuple[int, int], TileRecord]
) -> list[tuple[int, int]]:
    """Grid positions never acquired: from the planned tile count and the grid the tiles span."""
    if not by_pos:
        return []
    rows = max(r for r, _ in by_pos) + 1
    cols = max(c for _, c in by_pos) + 1
    total = montage.total_tiles or rows * cols
    if total > rows * cols and total % cols == 0:
        rows = total // cols
    return [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in by_pos][
        : max(total - len(by_pos), 0)
    ]


def _results(rec: TileRecord) -> dict[str, Any] | None:
    if rec.outcome is None:
        return None
    s = rec.outcome.stats
    return {
        "min": s["min"],
        "max": s["max"],
        "mean": s["mean"],
        "std": s["std"],
        "focus": float(rec.outcome.focus),
        "histogram": list(s["histogram"]),
        "matches": {p: m for p, m in rec.matches.items() if m and not m.get("skipped")},
    }


def _match_message(m: dict[str, Any], t: TileRow) -> dict[str, Any]:
    keys = (
        "row",
        "column",
        "dX",
        "dY",
        "dXsd",
        "dYsd",
        "distance",
        "rotation",
        "position",
        "pX",
        "pY",
        "qX",
        "qY",
    )
    dr, dc = {"top": (-1, 0), "left": (0, -1), "bottom": (1, 0), "right": (0, 1)}[m["position"]]
    out = {k: m[k] for k in keys if k in m}
    out.setdefault("row", t.row + dr)
    out.setdefault("column", t.column + dc)
    for k in ("pX", "pY", "qX", "qY"):
        out[k] = [float(v) for v in out.get(k, [])]
    return out
