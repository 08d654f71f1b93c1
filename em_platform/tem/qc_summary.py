"""A processed montage's QC in numbers, and the montage-level checks that keep a bad montage from being
stitched and uploaded.

The fractions count planned tiles (acquired, missing and not received); the overlap check counts the
edges that were matched or failed to match (an edge skipped because a tile has its own fault is that
tile's fault, counted once). ``tiles_received`` fails when a tile ``montage.complete`` names never
reached the platform: the montage would be fused with a hole. Dagster-free: the acquisition asset turns
these into metadata and blocking asset checks.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from em_platform.tem.qc import BLANK, NO_MATCH, NO_TISSUE, OUT_OF_FOCUS, SATURATED

if TYPE_CHECKING:  # the run folds these checks into its last qc.status: it imports this module
    from em_platform.tem.montage_result import MontageRunResult

__all__ = ["CheckOutcome", "MontageLimits", "MontageSummary"]


@dataclass(frozen=True)
class MontageLimits:
    """Fraction of tiles (or edges) allowed to fail before the montage is rejected."""

    max_out_of_focus_fraction: float = 0.05
    max_unmatched_edge_fraction: float = 0.05
    max_blank_fraction: float = 0.05  # blank and no-tissue tiles together
    max_saturated_fraction: float = 0.05


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    metadata: dict[str, Any]
    description: str = ""  # what was measured against the limit, e.g. for the scope's qc.status reason


@dataclass(frozen=True)
class MontageSummary:
    tiles: int
    processed: int
    failures: dict[str, str]  # tile id -> why its processing failed
    missing: list[tuple[int, int]]
    not_received: dict[str, tuple[int | None, int | None]]
    grid: tuple[int, int]
    flatfield: dict[str, Any]
    seconds: float
    cpu: dict[str, float]  # CPU seconds per stage of the chain and the run loop (all tiles)
    # per stage of a tile's latency (MontageRunResult.latency_by_stage): p50, p95 and max over the tiles, ms
    latency_ms: dict[str, dict[str, float]]
    polling_since: float | None  # Unix time the run first looked at the journal
    calibration: dict[str, Any]  # the run's StageCalibration (pixel size, rotation, where from)
    qc: dict[str, Any]  # MontageQC.summary(): status, reason, passed, faults by type and scope
    focus_median: float | None
    mean_intensity: float | None
    edges: int
    matched: int
    median_distance_px: float | None
    fractions: dict[str, float]

    @classmethod
    def of(cls, result: MontageRunResult) -> MontageSummary:
        recs = list(result.tiles.values())
        # processed tiles: their outcomes have stats and a focus score (only a failed tile's lack them)
        ok = [r.outcome for r in recs if r.outcome is not None]
        qc = result.qc.summary()
        faults = qc["faults"]
        planned = max(len(recs) + len(result.missing) + len(result.not_received), 1)
        edges = result.edges()
        matched = [m for m in edges if m]

        def frac(*kinds: str) -> float:
            return sum(sum(faults.get(k, {}).values()) for k in kinds) / planned

        return cls(
            tiles=len(recs),
            processed=len(ok),
            failures={r.tile.tile_id: r.error for r in recs if r.error is not None},
            missing=list(result.missing),
            not_received=dict(result.not_received),
            grid=result.grid,
            flatfield=dict(result.flatfield),
            seconds=result.seconds,
            cpu=dict(result.cpu),
            latency_ms={
                stage: _spread(values) for stage, values in result.latency_by_stage().items() if values
            },
            polling_since=result.polling_since,
            calibration=result.calibration.to_dict() if result.calibration else {},
            qc=qc,
            focus_median=statistics.median(cast(float, o.focus) for o in ok) if ok else None,
            mean_intensity=statistics.fmean(cast("dict[str, Any]", o.stats)["mean"] for o in ok)
            if ok
            else None,
            edges=len(edges),
            matched=len(matched),
            median_distance_px=statistics.median(m["distance"] for m in matched) if matched else None,
            fractions={
                OUT_OF_FOCUS: frac(OUT_OF_FOCUS),
                BLANK: frac(BLANK, NO_TISSUE),
                SATURATED: frac(SATURATED),
                "critical_saturated": float(faults.get(SATURATED, {}).get("critical", 0)),
                "unmatched_edges": sum(faults.get(NO_MATCH, {}).values()) / max(len(edges), 1),
            },
        )

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds else 0.0

    def checks(self, limits: MontageLimits) -> list[CheckOutcome]:
        """The montage-level checks (each blocking downstream montage assets when it fails)."""
        f = self.fractions

        def fraction(
            name: str, what: str, value: float, limit: float, extra_fail: str | None = None
        ) -> CheckOutcome:
            text = f"{name}: {value:.1%} of {what} (limit {limit:.1%})" + (
                f"; {extra_fail}" if extra_fail else ""
            )
            return CheckOutcome(
                name,
                value <= limit and not extra_fail,
                {"fraction": round(value, 4), "limit": limit},
                text,
            )

        critical = int(f["critical_saturated"])
        unmatched = round(f["unmatched_edges"] * max(self.edges, 1))
        lost = sorted(self.not_received.items())
        return [
            fraction("focus", "tiles out of focus", f[OUT_OF_FOCUS], limits.max_out_of_focus_fraction),
            fraction("blank_tiles", "tiles blank or without tissue", f[BLANK], limits.max_blank_fraction),
            fraction(
                "saturated_tiles",
                "tiles saturated",
                f[SATURATED],
                limits.max_saturated_fraction,
                f"{critical} critically over-exposed" if critical else None,
            ),
            fraction(
                "overlap",
                f"edges unmatched ({unmatched} of {self.edges})",
                f["unmatched_edges"],
                limits.max_unmatched_edge_fraction,
            ),
            CheckOutcome(
                "tiles_received",
                not self.not_received,
                {
                    "not_received": [{"tile_id": tid, "row": rc[0], "column": rc[1]} for tid, rc in lost],
                    "named_by": "montage.complete",
                },
                f"tiles_received: {len(lost)} tile(s) montage.complete names never arrived"
                + (f" ({', '.join(f'r{r} c{c}' for _, (r, c) in lost[:5])})" if lost else ""),
            ),
        ]


def _spread(seconds: list[float]) -> dict[str, float]:
    """p50, p95 (linear interpolation between ranks) and max of durations, in ms."""
    ordered = sorted(seconds)

    def rank(q: float) -> float:
        i = q * (len(ordered) - 1)
        lo = int(i)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (i - lo)

    return {k: round(1000 * v, 1) for k, v in (("p50", rank(0.5)), ("p95", rank(0.95)), ("max", ordered[-1]))}
