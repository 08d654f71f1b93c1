"""Tile QC: faults per tile (TEM_comms ``qc.tile``) and the run-level verdict (``qc.status``).

Scopes follow TEM_comms ``DetectedFault``: *transient* (this tile only: re-image it), *persistent*
(poisons later tiles: the same fault keeps coming back), *critical* (damage or unrecoverable).
The run-level verdict: any critical fault → STOP_NOW at once; persistent faults, or more transient ones
than the legacy piTEAM "too many accumulated errors" limit → STOP_AT_END; otherwise GOOD.

Default thresholds, for 8-bit flatfield-corrected tiles:
* ``min_std = 5``: TileQC's ``min_mean_std_dev: 5`` — a tile whose raw pixel standard deviation is under 5
  counts is *blank*: the beam is blanked or nothing reaches the camera;
* ``min_specimen_contrast = 1.5``: a tile that is flat but for its shot noise (film or resin only, no
  section under the beam) has *no tissue* (``tile_processing.specimen_contrast``: 1.0 for noise alone,
  2.3 and more for simulated sections, even badly out of focus). It is its own fault, not out of focus:
  refocusing cannot help, the region of interest has left the section;
* ``saturated_fraction = 0.01`` / ``critical_saturated_fraction = 0.5`` (raw pixels at the camera's full
  scale): a few per cent of clipped pixels
  is a bright feature or a hole; half the frame clipped means the beam is spread wrong and the camera
  is being over-exposed — stop now to protect the detector;
* ``max_focus = 0.8``: lower is better (``tile_processing.focus_score``, on the raw tile). Sharp simulated
  sections at 4 nm/px score 0.26-0.54 on their central 256² crop (content-dependent), 1 µm of defocus
  0.36-0.88 (median 0.52: at the edge of what the band can see), 2 µm and more 0.98-1.0
  (18 simulated tiles per defocus, seeds 0-2; 0.8 sits between sharp and 2 µm);
* ``min_match_quality = 0.3``: fewer than a third of the strip patches agreeing is not an overlap;
* ``persistent_run = 3``: the same fault on 3 tiles in a row is a drift, not an accident (3 tiles without
  tissue in a row: the montage runs off the section);
* ``critical_blank_run = 5``: 5 blank tiles in a row means the beam is gone;
* ``max_transient_faults = 3``: pytemca's default "too many accumulated errors".

A tile that ``montage.complete`` names but whose ``tile.raw`` never reached the platform is *not received*:
persistent (the data path lost it; the montage cannot be stitched without it), so the scope hears
STOP_AT_END with the tiles named.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Scope = Literal["transient", "persistent", "critical"]
RunStatus = Literal["GOOD", "STOP_AT_END", "STOP_NOW"]

BLANK = "blank"
NO_TISSUE = "no_tissue"
SATURATED = "saturated"
OUT_OF_FOCUS = "out_of_focus"
NO_MATCH = "no_neighbour_match"
MISSING = "missing_tile"
NOT_RECEIVED = "tile_not_received"
UNREADABLE = "unreadable_tile"
SINGLE_TILE_FAULTS = (BLANK, NO_TISSUE, SATURATED, OUT_OF_FOCUS)  # what makes a tile not worth matching


@dataclass(frozen=True)
class QCConfig:
    min_std: float = 5.0
    min_specimen_contrast: float = 1.5
    saturated_fraction: float = 0.01
    critical_saturated_fraction: float = 0.5
    max_focus: float = 0.8
    min_match_quality: float = 0.3
    persistent_run: int = 3
    critical_blank_run: int = 5
    max_transient_faults: int = 3


@dataclass(frozen=True)
class Fault:
    fault_type: str
    scope: Scope
    severity: float
    confidence: float
    metrics: dict[str, Any] = field(default_factory=dict)

    def message(self) -> dict[str, Any]:
        """As a TEM_comms ``DetectedFault``."""
        return {
            "fault_type": self.fault_type,
            "severity": round(min(max(self.severity, 0.0), 1.0), 4),
            "confidence": round(min(max(self.confidence, 0.0), 1.0), 4),
            "scope": self.scope,
            "metrics": self.metrics,
        }


@dataclass(frozen=True)
class TileVerdict:
    """One tile's QC: where it is and the faults it shows (after escalation by runs); none means it passed."""

    tile_id: str
    row: int
    column: int
    faults: tuple[Fault, ...]

    @property
    def passed(self) -> bool:
        return not self.faults


def usable_for_matching(stats: Mapping[str, Any] | None, focus: float | None, config: QCConfig) -> bool:
    """Processed and free of single-tile faults (blank, no tissue, saturated, out of focus): worth
    matching. A faulty tile already has its verdict; matching it (or against it) would only blame its
    neighbours."""
    return stats is not None and not tile_faults(dict(stats), focus, [], config)


def tile_faults(
    stats: dict[str, Any] | None,
    focus: float | None,
    matches: Iterable[dict[str, Any] | None],
    config: QCConfig,
    *,
    error: str | None = None,
) -> list[Fault]:
    """The faults one tile shows on its own (scopes before escalation by runs)."""
    if error is not None:
        return [Fault(UNREADABLE, "transient", 1.0, 1.0, {"error": error[:300]})]
    assert stats is not None
    faults: list[Fault] = []
    std_value: Any = stats.get("raw_std", stats.get("std_float", stats.get("std")))  # the stats hold one
    std = float(std_value)
    top = stats.get("saturated_fraction")
    if top is None and stats.get("histogram"):
        hist = stats["histogram"]
        top = float(hist[-1]) / (float(sum(hist)) or 1.0)
    saturated = top is not None and top >= config.saturated_fraction
    if saturated:
        assert top is not None  # saturated
        scope: Scope = "critical" if top >= config.critical_saturated_fraction else "transient"
        faults.append(
            Fault(SATURATED, scope, top, 0.95 if scope == "critical" else 0.8, {"saturated_fraction": top})
        )
    blank = std < config.min_std and not saturated  # a burned-out frame is flat too, but not blank
    if blank:
        faults.append(
            Fault(
                BLANK, "transient", 1.0 - std / config.min_std, 0.9, {"std": std, "mean": stats.get("mean")}
            )
        )
    contrast = stats.get("specimen_contrast")
    no_tissue = not (blank or saturated) and contrast is not None and contrast < config.min_specimen_contrast
    if no_tissue:
        assert contrast is not None  # no_tissue
        faults.append(
            Fault(
                NO_TISSUE,
                "transient",
                min(1.0, 1.0 - (contrast - 1.0) / max(config.min_specimen_contrast - 1.0, 1e-9)),
                0.85,
                {"specimen_contrast": round(contrast, 3), "std": std},
            )
        )
    blank = blank or no_tissue  # nothing to focus on or to match against
    if focus is not None and not blank and not saturated and focus > config.max_focus:
        faults.append(
            Fault(
                OUT_OF_FOCUS,
                "transient",
                (focus - config.max_focus) / (1 - config.max_focus + 1e-9),
                0.8,
                {"focus": focus},
            )
        )
    if not (blank or saturated):
        for m in matches:
            if m is None:
                faults.append(Fault(NO_MATCH, "transient", 1.0, 0.7, {}))
            elif float(m.get("quality", 1.0)) < config.min_match_quality:
                faults.append(
                    Fault(
                        NO_MATCH,
                        "transient",
                        1.0 - float(m["quality"]),
                        0.7,
                        {"position": m.get("position"), "quality": m.get("quality")},
                    )
                )
    return faults


class MontageQC:
    """Running QC state of one montage: escalates repeated faults and decides the run-level status."""

    def __init__(self, config: QCConfig | None = None):
        self.config = config or QCConfig()
        self._runs: dict[str, int] = {}
        self.verdicts: dict[str, TileVerdict] = {}
        self.status: RunStatus = "GOOD"
        self.reason: str | None = None
        self._by_scope: dict[str, list[tuple[TileVerdict, Fault]]] = {
            "critical": [],
            "persistent": [],
            "transient": [],
        }

    def add(self, tile_id: str, row: int, column: int, faults: list[Fault]) -> TileVerdict:
        """Record a tile's faults (in acquisition order), escalating runs; returns its verdict."""
        types = {f.fault_type for f in faults}
        for t in list(self._runs):
            if t not in types:
                self._runs[t] = 0
        escalated = []
        for f in faults:
            run = self._runs.get(f.fault_type, 0) + 1
            self._runs[f.fault_type] = run
            scope = f.scope
            if f.fault_type == BLANK and run >= self.config.critical_blank_run:
                scope = "critical"
            elif scope == "transient" and run >= self.config.persistent_run:
                scope = "persistent"
            escalated.append(
                Fault(f.fault_type, scope, f.severity, f.confidence, {**f.metrics, "run_length": run})
            )
        verdict = TileVerdict(tile_id, row, column, tuple(escalated))
        self.verdicts[tile_id] = verdict
        self._update_status(verdict)
        return verdict

    def add_missing(self, tile_id: str, row: int, column: int) -> TileVerdict:
        return self.add(
            tile_id, row, column, [Fault(MISSING, "transient", 1.0, 1.0, {"row": row, "column": column})]
        )

    def add_not_received(
        self, tile_id: str, row: int | None, column: int | None, waited_s: float
    ) -> TileVerdict:
        """A tile ``montage.complete`` names whose ``tile.raw`` never came: the montage has a hole."""
        metrics = {"row": row, "column": column, "waited_s": round(waited_s, 1)}
        return self.add(
            tile_id,
            -1 if row is None else row,
            -1 if column is None else column,
            [Fault(NOT_RECEIVED, "persistent", 1.0, 1.0, metrics)],
        )

    def fail_checks(self, failed: list[str]) -> None:
        """Montage-level checks that failed at the end (``failed``: what each measured against its limit).

        The platform will not stitch or upload such a montage, so the scope must not hear GOOD: the status
        becomes STOP_AT_END (a STOP_NOW stays) and the reason names the checks, after any fault it had.
        """
        if not failed:
            return
        text = "montage checks failed: " + "; ".join(failed)
        if self.status == "GOOD":
            self.status = "STOP_AT_END"
        self.reason = f"{self.reason}; {text}" if self.reason else text

    def _update_status(self, verdict: TileVerdict) -> None:
        """Fold one verdict into the status (each verdict once: the status costs nothing per tile)."""
        for f in verdict.faults:
            self._by_scope[f.scope].append((verdict, f))
        critical, persistent, transient = (self._by_scope[s] for s in ("critical", "persistent", "transient"))
        status: RunStatus
        if critical:
            status, reason = "STOP_NOW", f"critical fault: {_where(critical)}"
        elif persistent:
            status, reason = "STOP_AT_END", f"persistent fault: {_where(persistent)}"
        elif len(transient) > self.config.max_transient_faults:
            status, reason = (
                "STOP_AT_END",
                f"{len(transient)} transient faults (limit {self.config.max_transient_faults}): "
                + _where(transient),
            )
        else:
            status, reason = "GOOD", None
        order = {"GOOD": 0, "STOP_AT_END": 1, "STOP_NOW": 2}
        if order[status] >= order[self.status]:  # a verdict never relaxes within a montage
            self.status, self.reason = status, reason

    def summary(self) -> dict[str, Any]:
        counts: dict[str, dict[str, int]] = {}
        for v in self.verdicts.values():
            for f in v.faults:
                counts.setdefault(f.fault_type, {}).setdefault(f.scope, 0)
                counts[f.fault_type][f.scope] += 1
        return {
            "tiles": len(self.verdicts),
            "passed": sum(v.passed for v in self.verdicts.values()),
            "faults": counts,
            "status": self.status,
            "reason": self.reason,
        }


def _where(faults: list[tuple[TileVerdict, Fault]]) -> str:
    """``saturated at r1 c2, r1 c3``: the fault types and the tiles that showed them (the first few)."""
    places: dict[str, list[str]] = {}
    for v, f in faults:
        places.setdefault(f.fault_type, []).append(f"r{v.row} c{v.column}")
    return "; ".join(
        f"{kind} at {', '.join(p[:5])}{f' and {len(p) - 5} more' if len(p) > 5 else ''}"
        for kind, p in places.items()
    )
