"""Tile QC: faults per tile (TEM_comms ``qc.tile``) and the run-level verdict (``qc.status``).

Scopes follow TEM_comms ``DetectedFault``: *transient* (this tile only: re-image it), *persistent*
(poisons later tiles: the same fault keeps coming back), *critical* (damage or unrecoverable).
The run-level verdict: any critical fault → STOP_NOW at once; persistent faults, or more transient ones
than the legacy piTEAM "too many accumulated errors" limit → STOP_AT_END; otherwise GOOD.

Default thresholds, for 8-bit flatfield-corrected tiles:
* ``min_std = 5``: TileQC's ``min_mean_std_dev: 5`` — a tile whose raw pixel standard deviation is under 5
  counts has no section in it (beam blanked, hole, burned film);
* ``saturated_fraction = 0.01`` / ``critical_saturated_fraction = 0.5`` (raw pixels at the camera's full
  scale): a few per cent of clipped pixels
  is a bright feature or a hole; half the frame clipped means the beam is spread wrong and the camera
  is being over-exposed — stop now to protect the detector;
* ``max_focus = 0.8``: lower is better (``tile_processing.focus_score``, on the raw tile). Sharp simulated
  sections at 4 nm/px score 0.26-0.54 on their central 256² crop (content-dependent), 1 µm of defocus
  0.36-0.88 (median 0.52: at the edge of what the band can see), 2 µm and more 0.98-1.0
  (18 simulated tiles per defocus, seeds 0-2; 0.8 sits between sharp and 2 µm);
* ``min_match_quality = 0.3``: fewer than a third of the strip patches agreeing is not an overlap;
* ``persistent_run = 3``: the same fault on 3 tiles in a row is a drift, not an accident;
* ``critical_blank_run = 5``: 5 blank tiles in a row means the beam is gone;
* ``max_transient_faults = 3``: pytemca's default "too many accumulated errors".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Scope = Literal["transient", "persistent", "critical"]
RunStatus = Literal["GOOD", "STOP_AT_END", "STOP_NOW"]

BLANK = "blank"
SATURATED = "saturated"
OUT_OF_FOCUS = "out_of_focus"
NO_MATCH = "no_neighbour_match"
MISSING = "missing_tile"
UNREADABLE = "unreadable_tile"


@dataclass(frozen=True)
class QCConfig:
    min_std: float = 5.0
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
    tile_id: str
    row: int
    column: int
    faults: tuple[Fault, ...]

    @property
    def passed(self) -> bool:
        return not self.faults


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
    std = float(stats.get("raw_std", stats.get("std_float", stats.get("std"))))
    top = stats.get("saturated_fraction")
    if top is None and stats.get("histogram"):
        hist = stats["histogram"]
        top = float(hist[-1]) / (float(sum(hist)) or 1.0)
    saturated = top is not None and top >= config.saturated_fraction
    if saturated:
        scope = "critical" if top >= config.critical_saturated_fraction else "transient"
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
        self._update_status()
        return verdict

    def add_missing(self, tile_id: str, row: int, column: int) -> TileVerdict:
        return self.add(
            tile_id, row, column, [Fault(MISSING, "transient", 1.0, 1.0, {"row": row, "column": column})]
        )

    def _update_status(self) -> None:
        faults = [f for v in self.verdicts.values() for f in v.faults]
        critical = [f for f in faults if f.scope == "critical"]
        persistent = [f for f in faults if f.scope == "persistent"]
        transient = [f for f in faults if f.scope == "transient"]
        if critical:
            status, reason = "STOP_NOW", f"critical fault: {critical[0].fault_type}"
        elif persistent:
            status, reason = "STOP_AT_END", f"persistent fault: {persistent[0].fault_type}"
        elif len(transient) > self.config.max_transient_faults:
            status, reason = (
                "STOP_AT_END",
                f"{len(transient)} transient faults (limit {self.config.max_transient_faults})",
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
