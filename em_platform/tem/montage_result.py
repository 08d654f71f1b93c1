"""What a montage's live run found: each tile's progress (its verdict, matches and step times), the stage
calibration it used, and the run's result, which :mod:`em_platform.tem.qc_summary` sums up for the checks.
Filled by :mod:`em_platform.tem.montage_run`; no Dagster here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from em_platform.tem.journal import TileRow
from em_platform.tem.qc import MontageQC, TileVerdict
from em_platform.tem.tile_tasks import TileOutcome

__all__ = ["LATENCY_STEPS", "MontageRunResult", "StageCalibration", "TileProgress"]

# Where a tile's latency (tile.raw journaled -> verdict journaled) goes: (stage, from, to) over the
# TileProgress's times. "landed": the journal received tile.raw; "seen": a poll handed it to the run; the
# process/judge times are the Dask tasks' own; "collected": the run took the judgement; "verdict": its
# qc.tile was committed (it waits for the verdicts of the tiles before it).
LATENCY_STEPS = (
    ("poll", "landed", "seen"),
    ("wait_for_thread", "seen", "process_start"),
    ("process", "process_start", "process_end"),
    ("wait_to_match", "process_end", "judge_start"),
    ("match", "judge_start", "judge_end"),
    ("collect", "judge_end", "collected"),
    ("verdict", "collected", "verdict"),
)


@dataclass(frozen=True)
class StageCalibration:
    """How the run turns stage positions (nm) into image offsets (px): fixed at the run's first look at the
    journal, so no verdict depends on when ``montage.complete`` (which carries the montage's own pixel size
    and rotation) lands among the tiles. A listener restarted mid-montage delivers the rest of the montage in
    one burst, ``montage.complete`` with it; while the run took the calibration from whichever message was
    there, the tiles judged after that burst were searched differently (with no pixel size configured: 65 %
    of a clean 5 x 5 montage's edges unmatched live, 32 % after a restart, 0 % on a re-run)."""

    pixel_size_nm: float | None
    rotation_rad: float
    source: str  # "montage.complete" (a finished montage re-processed), "configured", or "none"

    def to_dict(self) -> dict[str, Any]:
        return {"pixel_size_nm": self.pixel_size_nm, "rotation_rad": self.rotation_rad, "source": self.source}


@dataclass
class TileProgress:
    """One tile on its way through the run, on the run's side: the journal's row, the worker's outcome and
    matches as they come back, the Dask futures still held for it, its verdict and each step's time.

    The tile's chain of types: :class:`~em_platform.tem.journal.TileRow` (what the journal holds) →
    :class:`~em_platform.tem.tile_tasks.TileOutcome` (processed, on a worker) →
    :class:`~em_platform.tem.tile_tasks.Judgement` (outcome + measured matches, back from Dask) → this →
    :class:`~em_platform.tem.qc.TileVerdict` (its faults) → :class:`~em_platform.tem.journal.TileReport`
    (messages and results to commit) → after the upload,
    :class:`~em_platform.tem.tile_records.TileRecord` (TEMdb's tile row).
    """

    tile: TileRow
    outcome: TileOutcome | None = None  # statistics and focus (no pixels); None until judged, or failed
    error: str | None = None
    future: Any = None  # the processing future, held while later neighbours may need its strips
    store: Any = None  # the store future, held until the processed tile is written
    matches: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # None: no overlap found
    verdict: TileVerdict | None = None
    times: dict[str, float] = field(default_factory=dict)  # Unix seconds of each step: see LATENCY_STEPS
    resumed: bool = False  # its verdict came from the journal (an earlier run judged and sent it)

    @property
    def judged(self) -> bool:
        return self.outcome is not None or self.error is not None


@dataclass
class MontageRunResult:
    montage_id: str
    tiles: dict[str, TileProgress]
    missing: list[tuple[int, int]]  # never acquired (the planned grid has a hole)
    not_received: dict[str, tuple[int | None, int | None]]  # named by montage.complete, never journaled
    flatfield: dict[str, Any]
    qc: MontageQC
    processed_url: str
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per stage, summed over the tiles
    polling_since: float | None = None  # wall clock (Unix time) of the run's first look at the journal
    calibration: StageCalibration | None = None  # None: the run never saw its montage

    def latency_by_stage(self) -> dict[str, list[float]]:
        """Seconds per stage of :data:`LATENCY_STEPS` (and ``total``) for each judged tile, in acquisition order."""
        out: dict[str, list[float]] = {name: [] for name, _, _ in LATENCY_STEPS}
        out["total"] = []
        for rec in self.tiles.values():
            t = rec.times
            if "landed" not in t or "verdict" not in t:
                continue
            for name, start, end in LATENCY_STEPS:
                if start in t and end in t:
                    out[name].append(t[end] - t[start])
            out["total"].append(t["verdict"] - t["landed"])
        return out

    def edges(self) -> list[dict[str, Any] | None]:
        """Every neighbour match attempted (None: no overlap found); edges skipped for a faulty tile excluded."""
        return [
            m
            for r in self.tiles.values()
            if r.outcome is not None
            for m in r.matches.values()
            if not (m and m.get("skipped"))
        ]

    @property
    def grid(self) -> tuple[int, int]:
        places = [(r.tile.row, r.tile.column) for r in self.tiles.values()] + list(self.missing)
        places += [p for p in self.not_received.values() if None not in p]  # type: ignore[misc]
        return max((r for r, _ in places), default=-1) + 1, max((c for _, c in places), default=-1) + 1
