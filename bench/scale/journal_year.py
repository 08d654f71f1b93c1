"""The acquisition journal as a facility's year leaves it, for `bench_tiles_live --journal-url`: the live-QC
chain measured against a full database instead of a fresh file.

python -m bench.scale.journal_year [--montages 100000]   # prints the database URL; drop it with --drop

Fills make bench-scale's catalog database (em_scale_catalog) from a real template montage: every montage's
journal row and catalog record, the newest ``--journal-montages`` with their messages and tiles (what the
retention window keeps), a few tile records; Dagster's database is left empty.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from bench.scale.fill import CatalogFill, FillPlan
from bench.scale.stores import ScaleStores
from bench.scale.template import run_template


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--montages", type=int, default=100_000)
    ap.add_argument("--journal-montages", type=int, default=100)
    ap.add_argument("--drop", action="store_true", help="drop the harness's databases and stop")
    args = ap.parse_args(argv)
    stores = ScaleStores()
    if args.drop:
        stores.drop()
        return 0
    logging.disable(logging.INFO)
    stores.create()
    template = run_template(stores, Path(tempfile.mkdtemp(prefix="em-journal-year-")))
    plan = FillPlan(tile_rows=5_000, journal_montages=args.journal_montages)
    catalog = CatalogFill(stores.catalog_url, template, plan)
    try:
        for a in range(0, args.montages, 5_000):
            catalog.add(a, min(args.montages, a + 5_000))
    finally:
        catalog.dispose()
    print(stores.catalog_url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
