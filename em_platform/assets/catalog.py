"""``catalog/metadata_catalog``: all records consolidated, exported, and checked."""

import dagster as dg

from em_platform.assets.presentation import check_result, check_sentence, materialize_result
from em_platform.assets.signals import gate_blocking_checks
from em_platform.catalog.records import utc_now
from em_platform.catalog.report import consolidate
from em_platform.resources import CatalogResource, StorageResource
from em_platform.sources.registry import SOURCES

VALID_CHECK = "all_records_valid"


@dg.asset(
    key=["catalog", "metadata_catalog"],
    group_name="catalog",
    # every asset that writes catalog records: the ingests, the montage upload, the simulated tilt series
    deps=[
        *(dg.AssetKey(["ingest", name]) for name in ("local", *SOURCES)),
        dg.AssetKey("montage_upload"),
        dg.AssetKey(["simulation", "tilt_series"]),
    ],
    kinds={"json", "sql"},
    description="Every dataset record consolidated: summary by source, validation rate, per-record errors; "
    "exported as `metadata_catalog_<ts>.json` and `validation_report_<ts>.json` in the data root.",
    check_specs=[
        dg.AssetCheckSpec(
            VALID_CHECK,
            asset=dg.AssetKey(["catalog", "metadata_catalog"]),
            blocking=True,
            description="Fails if any catalog record does not validate against the schema.",
        )
    ],
    automation_condition=dg.AutomationCondition.eager(),
)
@gate_blocking_checks
def metadata_catalog(catalog: CatalogResource, storage: StorageResource):
    now = utc_now()
    records = catalog.db().records()
    doc, report = consolidate(records, now)
    store = storage.store()
    stamp = now.strftime("%Y%m%d_%H%M%S")
    catalog_path = store.path("catalog", f"metadata_catalog_{stamp}.json")
    report_path = store.path("catalog", f"validation_report_{stamp}.json")
    store.write_json(catalog_path, doc)
    store.write_json(report_path, report)
    validation = report["summary"]
    yield materialize_result(
        metadata={
            "records": validation["total_records"],
            "validation_rate_percent": validation["validation_rate"],
            "status_counts": dg.MetadataValue.json(doc["summary"]["status_counts"]),
            "records_by_source": dg.MetadataValue.json(doc["summary"]["records_by_source"]),
            "catalog_file": dg.MetadataValue.path(store.to_url(catalog_path)),
            "validation_report": dg.MetadataValue.path(store.to_url(report_path)),
        }
    )
    invalid = [r for r in report["detailed_results"] if not r["valid"]]
    yield check_result(
        check_name=VALID_CHECK,
        passed=not invalid,
        severity=dg.AssetCheckSeverity.ERROR,
        description=check_sentence(
            f"{len(invalid)} of {validation['total_records']} catalog record(s) fail the metadata schema",
            "none",
            not invalid,
            "the records listed in `errors` name their source: re-ingest it (or fix the reader that wrote them)",
        ),
        metadata={
            "invalid_records": len(invalid),
            "errors": dg.MetadataValue.json(
                [
                    {"source": r["source"], "source_id": r["source_id"], "errors": r["errors"]}
                    for r in invalid[:50]
                ]
            ),
        },
    )
