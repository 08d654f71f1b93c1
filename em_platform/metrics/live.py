"""What the live chain counts as it sends verdicts: each tile by scope and verdict, and its latency from
arriving in the journal to its verdict committed (the figure the live target is set on)."""

from __future__ import annotations

from collections.abc import Iterable

from em_platform.metrics.catalogue import LIVE_QC_LATENCY, TILES_JUDGED
from em_platform.metrics.scopes import scope_of


def count_verdicts(records: Iterable, shares: Iterable[str] | None) -> None:
    """``records``: the tiles (:class:`~em_platform.tem.montage_result.TileProgress`) whose verdicts were just
    committed; ``shares``: the scope shares their paths are named by."""
    for rec in records:
        verdict = "error" if rec.error else ("passed" if rec.verdict.passed else "failed")
        TILES_JUDGED.labels(scope_of(rec.tile.path, shares), verdict).inc()
        LIVE_QC_LATENCY.observe(rec.times["verdict"] - rec.times["landed"])
