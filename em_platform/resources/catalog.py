"""The catalog database as a resource (SQLite file by default, PostgreSQL by URL)."""

from __future__ import annotations

import dagster as dg
from pydantic import PrivateAttr

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.dead_letters import DeadLetters
from em_platform.tem.tile_records import TileRecords


class CatalogResource(dg.ConfigurableResource):
    """SQLAlchemy URL of the catalog; one engine per run, disposed at the end."""

    url: str
    _db: CatalogDB | None = PrivateAttr(default=None)
    _tiles: TileRecords | None = PrivateAttr(default=None)
    _letters: DeadLetters | None = PrivateAttr(default=None)

    def db(self) -> CatalogDB:
        if self._db is None:
            self._db = CatalogDB(self.url)
        return self._db

    def dead_letters(self) -> DeadLetters:
        """What the entry points refused (same database), for the sensors that report and add to them."""
        if self._letters is None:
            self._letters = DeadLetters(self.url)
        return self._letters

    def tile_records(self) -> TileRecords:
        """The TEM database's per-tile records (same database)."""
        if self._tiles is None:
            self._tiles = TileRecords(self.url)
        return self._tiles

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        for handle in (self._db, self._tiles, self._letters):
            if handle is not None:
                handle.dispose()
        self._db = self._tiles = self._letters = None
