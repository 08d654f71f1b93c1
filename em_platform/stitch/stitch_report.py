"""The machine-readable outcome of a stitch (``OUT.report.json``) and the blocking checks on it.

What a person (or a pipeline) needs to decide whether a montage can be used, named tile by tile:

* **tiles**: listed, skipped (missing or unreadable file, with the reason), blank (bare resin: flagged,
  not a failure), placed by the images, and *unplaced*: content tiles outside the montage's largest
  group after rejection, which only the stage put somewhere;
* **components**: the groups accepted matches tie together, after rejection; more than one group with
  content is a torn montage, whatever the residuals say;
* **edges**: pairs matched (fine search or coarse fallback), unmatched (with the reason), rejected (with
  the residual), and a per-edge residual map on the tile grid (``left``/``top`` edges of each cell);
* **residuals** per point pair as em_stitch reports them, and the stage's measured frame and error;
* **seams** measured on the fused pixels (:mod:`em_platform.stitch.seams`);
* **checks**: ``placed`` (no unplaced content tile), ``connected`` (one group with content), ``residual``
  (no edge whose consensus pairs — em_stitch's RANSAC inliers — the solve leaves torn apart), ``seams``
  (no seam beyond the limit); ``passed`` is all of them.

Dagster-free; ``em-platform stitch`` writes it and sets its exit status from ``checks``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from em_platform.stitch.seams import SEAM_LIMIT_PX, SeamMeasure

__all__ = ["REPORT_FORMAT", "edge_residual_map", "stitch_report"]

REPORT_FORMAT = "em_platform/stitch-report/1"


def _r(v: float | None, digits: int = 4) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), digits)


def edge_residual_map(
    cells: Mapping[Any, tuple[int, int]], residuals: Mapping[tuple[Any, Any], float]
) -> dict[str, list[list[float | None]]]:
    """Per-edge residuals on the tile grid: ``left[r][c]`` is the edge between cell (r, c) and (r, c − 1),
    ``top[r][c]`` between (r, c) and (r − 1, c); None where there is no accepted edge."""
    if not cells:
        return {"left": [], "top": []}
    rows = max(r for r, _ in cells.values()) + 1
    cols = max(c for _, c in cells.values()) + 1
    grid: dict[str, list[list[float | None]]] = {
        k: [[None] * cols for _ in range(rows)] for k in ("left", "top")
    }
    for (a, b), value in residuals.items():
        if a not in cells or b not in cells:
            continue
        (ra, ca), (rb, cb) = cells[a], cells[b]
        if (ra, ca) < (rb, cb):
            (ra, ca), (rb, cb) = (rb, cb), (ra, ca)
        kind = "left" if ra == rb and ca - cb == 1 else "top" if ca == cb and ra - rb == 1 else None
        if kind:
            grid[kind][ra][ca] = _r(value, 3)
    return grid


def stitch_report(
    *,
    cells: Mapping[Any, tuple[int, int]],
    skipped: Iterable[Any] = (),
    blank: Iterable[Any] = (),
    layout: Any,
    methods: Mapping[str, int] | None = None,
    unmatched: Iterable[tuple[Any, Any, str, str]] = (),
    seams: Iterable[SeamMeasure] | None = None,
    seam_limit_px: float = SEAM_LIMIT_PX,
    source: str = "images",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of one stitch. ``cells`` maps each stitched tile to its (row, column); ``layout`` is the
    solve's :class:`~em_platform.stitch.layout.TransformLayout`; ``unmatched`` are (tile, neighbour,
    position, reason)."""
    blank = set(blank)
    skipped = list(skipped)
    groups = [list(layout.transforms)] if not layout.disconnected else None
    main = [t for t in layout.transforms if t not in set(layout.disconnected)]
    groups = [main, *layout.components] if groups is None else groups
    content_groups = [g for g in groups if any(t not in blank for t in g)]
    unplaced = sorted(str(t) for t in layout.disconnected if t not in blank)
    seam_list = list(seams) if seams is not None else None
    measured = [s for s in seam_list or [] if s.offset_px is not None]
    bad_seams = [
        s
        for s in measured
        if s.measured_px > seam_limit_px and s.tile not in blank and s.neighbour not in blank
    ]
    torn = getattr(layout, "torn", {}) or {}
    checks = {
        "placed": not unplaced,
        "connected": len(content_groups) <= 1,
        "seams": not bad_seams,
        "residual": not torn,  # no edge whose consensus pairs the solve leaves torn apart
    }
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "source": source,
        "model": layout.model,
        **({"model_choice": layout.model_choice} if getattr(layout, "model_choice", None) else {}),
        "passed": all(checks.values()),
        "checks": checks,
        "tiles": {
            "listed": len(cells) + len(skipped),
            "stitched": len(cells),
            "placed_by_images": len(main) - sum(1 for t in main if t in blank),
            "blank": sorted(str(t) for t in blank),
            "unplaced": unplaced,
            "skipped": [
                {"tile": s.tile, "row": s.row, "column": s.column, "line": s.line, "reason": s.reason}
                for s in skipped
            ],
        },
        "components": [
            {
                "tiles": len(g),
                "content_tiles": sum(1 for t in g if t not in blank),
                "members": sorted(map(str, g)),
            }
            for g in groups[1:]
        ],
        "edges": {
            "accepted": len(layout.edge_residuals),
            "methods": dict(methods or {}),
            "unmatched": [
                {"tile": str(a), "neighbour": str(b), "position": pos, "reason": why}
                for a, b, pos, why in unmatched
            ],
            "rejected": [
                {"tile": str(a), "neighbour": str(b), "residual_px": _r(r, 3)}
                for (a, b), r in sorted(layout.rejected.items(), key=str)
            ],
            "lost_point_pairs": sum(layout.rejected_points.values()),
            "residual_map_px": edge_residual_map(cells, layout.edge_residuals),
        },
        "residuals": {k: _r(v) if isinstance(v, float) else v for k, v in layout.residual_stats.items()},
        # every pair its edge's consensus keeps (em_stitch's RANSAC inliers), kept by the solve or not
        "inlier_residuals": {
            k: _r(v) if isinstance(v, float) else v
            for k, v in (getattr(layout, "inlier_residual_stats", {}) or {}).items()
        },
        "torn_edges": [
            {"tile": str(a), "neighbour": str(b), "median_residual_px": _r(r, 3)}
            for (a, b), r in sorted(torn.items(), key=lambda kv: -kv[1])
        ],
        "stage": {k: _r(v, 6) if isinstance(v, float) else v for k, v in layout.stage.items()},
        "seams": None
        if seam_list is None
        else {
            "limit_px": seam_limit_px,
            "measured": len(measured),
            "not_measurable": len(seam_list) - len(measured),
            "max_px": _r(max((s.measured_px for s in measured), default=0.0), 3),
            "median_px": _r(
                sorted(s.measured_px for s in measured)[len(measured) // 2] if measured else 0.0, 3
            ),
            "beyond_limit": [
                {"tile": str(s.tile), "neighbour": str(s.neighbour), "offset_px": _r(s.measured_px, 3)}
                for s in sorted(bad_seams, key=lambda s: -s.measured_px)
            ],
        },
    }
    if extra:
        report.update(extra)
    return report
