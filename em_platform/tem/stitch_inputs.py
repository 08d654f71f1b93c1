"""The acquisition journal's tile rows as stitching takes them (:class:`~em_platform.stitch.grid.GridTile`).

The journal keeps every frame the scope sent: brightfield and darkfield reference frames, and each take of
a re-taken grid position. A montage's tiles are the others, one per grid position: the last to arrive, as
live processing keeps a re-taken tile rather than the one it replaces. Their matches are what live
processing left in the row's ``results["matches"]``. Dagster-free.
"""

from __future__ import annotations

from collections.abc import Iterable

from em_platform.stitch.grid import GridTile
from em_platform.tem.journal import TileRow

__all__ = ["grid_tiles"]


def grid_tiles(rows: Iterable[TileRow]) -> list[GridTile]:
    """The montage's tiles among journal ``rows``, one per grid position, as stitching reads them."""
    latest = {(r.row, r.column): r for r in sorted(rows, key=lambda r: r.seq) if not r.is_reference}
    return [
        GridTile(
            tile_id=r.tile_id,
            row=r.row,
            column=r.column,
            overlap=r.overlap or 0,
            stage_x_nm=r.stage_x_nm,
            stage_y_nm=r.stage_y_nm,
            matches=dict((r.results or {}).get("matches") or {}),
        )
        for r in latest.values()
    ]
