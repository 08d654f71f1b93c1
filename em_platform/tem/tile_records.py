"""The TEM database's tile records (TEMdb's ``Tile``) in the catalog database, written once a montage is uploaded.

One row per montage tile: where the stage was (nm), where the tile sits in the raster, its focus score and
pixel statistics, the URI of its image in storage and its matches against its neighbours (TEMdb's
``matcher`` list). The Allen system kept these in TEMdb (DynamoDB, later PostgreSQL) behind a REST API;
here they live in the same SQL database as the acquisition journal, so the QC queries TEMdb offers
(per-montage focus statistics, the tiles whose focus score is worse than a threshold) are plain SQL.

A montage's records are replaced as a whole, so running the upload again never duplicates a tile.
Focus scores follow TEM_comms: in [0, 1], lower is better.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from em_platform.sql import JSONType, aware, open_database
from em_platform.tem.journal import TileRow

metadata_obj = sa.MetaData()

tem_tiles = sa.Table(
    "tem_tiles",
    metadata_obj,
    sa.Column("tile_id", sa.String(64), primary_key=True),
    sa.Column("montage_id", sa.String(64), nullable=False, index=True),
    sa.Column("acquisition_id", sa.String(64), index=True),
    sa.Column("raster_index", sa.Integer),
    sa.Column("stage_x_nm", sa.Float),
    sa.Column("stage_y_nm", sa.Float),
    sa.Column("raster_row", sa.Integer, nullable=False),
    sa.Column("raster_col", sa.Integer, nullable=False),
    sa.Column("focus_score", sa.Float),
    sa.Column("min_value", sa.Float),
    sa.Column("max_value", sa.Float),
    sa.Column("mean_value", sa.Float),
    sa.Column("std_value", sa.Float),
    sa.Column("image_uri", sa.Text, nullable=False),
    sa.Column("matcher", JSONType, nullable=False),
    sa.Column("supertile_id", sa.String(64)),
    sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=False),
)

_MATCH_FIELDS = ("dX", "dY", "dXsd", "dYsd", "distance", "rotation", "position", "pX", "pY", "qX", "qY")


@dataclass(frozen=True)
class TileRecord:
    """An uploaded tile's row in ``tem_tiles`` (TEMdb's Tile): where it was imaged, its focus and statistics,
    its archived image and matches; ``stage_position`` {x, y} and ``raster_position`` {row, col} flattened."""

    tile_id: str
    montage_id: str
    raster_row: int
    raster_col: int
    image_uri: str
    raster_index: int | None = None
    stage_x_nm: float | None = None
    stage_y_nm: float | None = None
    focus_score: float | None = None
    min_value: float | None = None
    max_value: float | None = None
    mean_value: float | None = None
    std_value: float | None = None
    matcher: list[dict[str, Any]] = field(default_factory=list)
    acquisition_id: str | None = None
    supertile_id: str | None = None
    uploaded_at: datetime | None = None


@dataclass(frozen=True)
class FocusStats:
    """TEMdb's per-acquisition focus summary: over the tiles that have a score (stddev: sample, 0 for one)."""

    tile_count: int
    scored: int
    mean: float | None
    median: float | None
    stddev: float | None
    min: float | None
    max: float | None


def _temdb_match(m: Mapping[str, Any]) -> dict[str, Any]:
    """A journal match (TEM_comms ``Match`` fields + ``quality``) as TEMdb's ``Matcher``."""
    out: dict[str, Any] = {"row": int(m["row"]), "col": int(m["column"])}
    out.update({k: m[k] for k in _MATCH_FIELDS if k in m})
    out["match_quality"] = m.get("quality")
    return out


def tile_records_from_journal(
    tiles: Iterable[TileRow],
    image_uris: Mapping[str, str],
    *,
    acquisition_id: str | None = None,
) -> list[TileRecord]:
    """The records of a montage's tiles (reference frames left out) from the journal's rows and results.

    ``image_uris`` maps tile_id -> the URI of the tile's uploaded image; every montage tile needs one
    (a tile whose processing failed can point at its raw image). Raises ValueError naming those without.
    """
    montage_tiles = [t for t in tiles if not t.is_reference]
    without = [t.tile_id for t in montage_tiles if not image_uris.get(t.tile_id)]
    if without:
        raise ValueError(
            f"{len(without)} tile(s) have no image URI ({', '.join(without[:5])}"
            f"{', ...' if len(without) > 5 else ''}); upload their images first and pass every URI"
        )
    records = []
    for t in montage_tiles:
        r = t.results or {}
        matches = r.get("matches") or {}
        records.append(
            TileRecord(
                tile_id=t.tile_id,
                montage_id=t.montage_id,
                acquisition_id=acquisition_id,
                raster_index=t.raster_index,
                stage_x_nm=t.stage_x_nm,
                stage_y_nm=t.stage_y_nm,
                raster_row=t.row,
                raster_col=t.column,
                focus_score=r.get("focus"),
                min_value=r.get("min"),
                max_value=r.get("max"),
                mean_value=r.get("mean"),
                std_value=r.get("std"),
                image_uri=image_uris[t.tile_id],
                matcher=[_temdb_match(m) for m in matches.values() if m and "dX" in m],
            )
        )
    return records


def _record(row: Any) -> TileRecord:
    values = dict(row._mapping)
    values["uploaded_at"] = aware(values["uploaded_at"])
    values["matcher"] = list(values["matcher"] or [])
    return TileRecord(**values)


class TileRecords:
    """The ``tem_tiles`` table: a montage's tile records, replaced as a whole, and TEMdb's QC queries."""

    def __init__(self, url: str, *, create: bool = True):
        self.url = url
        self.engine = open_database(url, metadata_obj, create=create)

    def dispose(self) -> None:
        self.engine.dispose()

    def replace_montage(
        self, montage_id: str, records: Sequence[TileRecord], *, uploaded_at: datetime | None = None
    ) -> int:
        """Make ``records`` the montage's tile records (one transaction; a re-run replaces, never duplicates).

        Raises ValueError when a record belongs to another montage, or when a tile_id is already recorded
        under another montage (a tile is in one montage).
        """
        foreign = [r.tile_id for r in records if r.montage_id != montage_id]
        if foreign:
            raise ValueError(
                f"records of other montages given for montage {montage_id}: {', '.join(foreign[:5])}"
            )
        ids = [r.tile_id for r in records]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"tile_id(s) repeated in montage {montage_id}'s records: {', '.join(dup[:5])}")
        at = uploaded_at or datetime.now(UTC)
        rows = [
            {**{c.name: getattr(r, c.name) for c in tem_tiles.columns}, "uploaded_at": r.uploaded_at or at}
            for r in records
        ]
        c = tem_tiles.c
        with self.engine.begin() as conn:
            for start in range(0, len(ids), 500):  # bounded IN lists
                clash = conn.execute(
                    sa.select(c.tile_id, c.montage_id).where(
                        c.tile_id.in_(ids[start : start + 500]), c.montage_id != montage_id
                    )
                ).first()
                if clash:
                    raise ValueError(
                        f"tile {clash.tile_id} is already recorded under montage {clash.montage_id}, "
                        f"not {montage_id}; a tile belongs to one montage: check the tile ids"
                    )
            conn.execute(tem_tiles.delete().where(c.montage_id == montage_id))
            if rows:
                conn.execute(tem_tiles.insert(), rows)
        return len(rows)

    def forget_montages(self, montage_ids: Sequence[str]) -> int:
        """Delete the records of ``montage_ids`` (a retention policy's; their catalog records stay): batches of
        an indexed ``IN``, never a scan of the table. The number deleted; idempotent."""
        gone = 0
        for start in range(0, len(montage_ids), 500):
            ids = list(montage_ids[start : start + 500])
            with self.engine.begin() as conn:
                gone += conn.execute(tem_tiles.delete().where(tem_tiles.c.montage_id.in_(ids))).rowcount or 0
        return gone

    def montage_tiles(self, montage_id: str) -> list[TileRecord]:
        """The montage's records in raster order."""
        c = tem_tiles.c
        q = (
            sa.select(tem_tiles)
            .where(c.montage_id == montage_id)
            .order_by(c.raster_index, c.raster_row, c.raster_col, c.tile_id)
        )
        with self.engine.connect() as conn:
            return [_record(r) for r in conn.execute(q)]

    def _scope(self, q: sa.Select, montage_id: str | None, acquisition_id: str | None) -> sa.Select:
        if montage_id is None and acquisition_id is None:
            raise ValueError("give a montage_id or an acquisition_id")
        if montage_id is not None:
            q = q.where(tem_tiles.c.montage_id == montage_id)
        if acquisition_id is not None:
            q = q.where(tem_tiles.c.acquisition_id == acquisition_id)
        return q

    def bad_focus_tiles(
        self, threshold: float, *, montage_id: str | None = None, acquisition_id: str | None = None
    ) -> list[TileRecord]:
        """TEMdb's "bad focus tiles": focus score above ``threshold`` (lower is better), worst first."""
        c = tem_tiles.c
        q = self._scope(sa.select(tem_tiles).where(c.focus_score > threshold), montage_id, acquisition_id)
        with self.engine.connect() as conn:
            return [_record(r) for r in conn.execute(q.order_by(c.focus_score.desc(), c.tile_id))]

    def focus_stats(self, *, montage_id: str | None = None, acquisition_id: str | None = None) -> FocusStats:
        """Mean, median, standard deviation, min and max of the focus scores, as TEMdb's QC endpoint gives them."""
        q = self._scope(sa.select(tem_tiles.c.focus_score), montage_id, acquisition_id)
        with self.engine.connect() as conn:
            values = [r.focus_score for r in conn.execute(q)]
        scores = [v for v in values if v is not None]
        if not scores:
            return FocusStats(len(values), 0, None, None, None, None, None)
        return FocusStats(
            tile_count=len(values),
            scored=len(scores),
            mean=statistics.fmean(scores),
            median=statistics.median(scores),
            stddev=statistics.stdev(scores) if len(scores) > 1 else 0.0,
            min=min(scores),
            max=max(scores),
        )
