"""The catalog database as a resource (SQLite file by default, PostgreSQL by URL)."""

from __future__ import annotations

import dagster as dg
from pydantic import PrivateAttr

from em_platform.catalog.db import CatalogDB


class CatalogResource(dg.ConfigurableResource):
    """SQLAlchemy URL of the catalog; one engine per run, disposed at the end."""

    url: str
    _db: CatalogDB | None = PrivateAttr(default=None)

    def db(self) -> CatalogDB:
        if self._db is None:
            self._db = CatalogDB(self.url)
        return self._db

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._db is not None:
            self._db.dispose()
            self._db = None
