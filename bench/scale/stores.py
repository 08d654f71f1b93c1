"""The stores of the real deployment for the scale harness: Dagster's instance and the catalog on PostgreSQL.

Two databases of their own on the machine's PostgreSQL (made afresh, dropped when asked), a ``DAGSTER_HOME``
whose ``dagster.yaml`` is the deployment's (``docker/dagster.yaml``: PostgreSQL storage, the queued run
coordinator, run monitoring, tick retention) with the storage pointed at them, and the sizes of what they hold.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
import yaml

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ScaleStores:
    host: str = os.environ.get("EM_TEST_PG_HOST", "127.0.0.1")
    port: int = int(os.environ.get("EM_TEST_PG_PORT", "5432"))
    user: str = os.environ.get("EM_TEST_PG_USER", "postgres")
    dagster_db: str = "em_scale_dagster"
    catalog_db: str = "em_scale_catalog"

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{db}"

    @property
    def catalog_url(self) -> str:
        return self.url(self.catalog_db)

    @property
    def dagster_url(self) -> str:
        return self.url(self.dagster_db)

    def _admin(self) -> sa.Engine:
        return sa.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")

    def create(self) -> None:
        """Both databases, empty (an earlier harness run's are dropped first)."""
        self.drop()
        engine = self._admin()
        with engine.connect() as conn:
            for db in (self.dagster_db, self.catalog_db):
                conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
                # a bulk load need not wait for each commit's WAL flush; what is read back is the same
                conn.execute(sa.text(f'ALTER DATABASE "{db}" SET synchronous_commit = off'))
        engine.dispose()

    def drop(self) -> None:
        engine = self._admin()
        with engine.connect() as conn:
            for db in (self.dagster_db, self.catalog_db):
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        engine.dispose()

    def dagster_home(self, folder: Path) -> Path:
        """A DAGSTER_HOME with the deployment's dagster.yaml, its storage on this harness's database."""
        config = yaml.safe_load((REPO / "docker" / "dagster.yaml").read_text())
        config["storage"] = {"postgres": {"postgres_url": self.dagster_url}}
        config.pop("run_launcher", None)  # runs are launched as processes here, not containers
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return folder

    def vacuum(self, keep: Sequence[str] = ("tem_tiles",)) -> float:
        """``VACUUM ANALYZE`` of both databases, as autovacuum does minutes after a mass deletion (the first
        retention after a year without one): until then every index scan still visits the deleted rows. The
        catalog's tables in ``keep`` (its 10⁷ tile records: the retention keeps them by default) are left
        as they are: a year's autovacuum would have visited them as they grew, not in one pass after the
        fill. Returns the seconds it took."""
        t = time.perf_counter()
        for db in (self.dagster_db, self.catalog_db):
            engine = sa.create_engine(self.url(db), isolation_level="AUTOCOMMIT")
            try:
                with engine.connect() as conn:
                    if db == self.dagster_db:
                        conn.execute(sa.text("VACUUM ANALYZE"))
                        continue
                    tables = conn.execute(sa.text("SELECT relname FROM pg_stat_user_tables")).scalars()
                    for table in sorted(set(tables) - set(keep)):
                        conn.execute(sa.text(f'VACUUM ANALYZE "{table}"'))
            finally:
                engine.dispose()
        return round(time.perf_counter() - t, 1)

    def table_bytes(self, db: str) -> dict[str, int]:
        """Each table's size on disk with its indexes and TOAST (pg_total_relation_size), after ANALYZE."""
        engine = sa.create_engine(self.url(db), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text("ANALYZE"))
            rows = conn.execute(
                sa.text(
                    "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.relkind = 'r' AND n.nspname = 'public'"
                )
            ).all()
        engine.dispose()
        return {name: int(size) for name, size in rows}

    def row_counts(self, db: str, tables: list[str]) -> dict[str, int]:
        engine = sa.create_engine(self.url(db))
        with engine.connect() as conn:
            counts = {
                t: int(conn.execute(sa.text(f'SELECT count(*) FROM "{t}"')).scalar_one()) for t in tables
            }
        engine.dispose()
        return counts
