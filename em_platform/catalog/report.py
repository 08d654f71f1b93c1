"""Consolidation of all records into the catalog export and the validation report (macroscope's consolidate step)."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

from em_platform.catalog.records import SCHEMA_VERSION, iso
from em_platform.catalog.schema import validation_errors


def consolidate(
    records: list[dict[str, Any]], generated_at: datetime
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (metadata_catalog, validation_report) documents for ``records``."""
    by_source: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"valid": 0, "invalid": 0, "error_details": []}
    )
    status_counts: Counter[str] = Counter()
    detailed = []
    valid_records = []
    for rec in records:
        source = str(rec.get("source", "unknown"))
        errors = validation_errors(rec)
        entry = {
            "id": rec.get("id"),
            "source": source,
            "source_id": rec.get("source_id"),
            "status": rec.get("status"),
            "valid": not errors,
            "errors": errors,
        }
        detailed.append(entry)
        status_counts[str(rec.get("status"))] += 1
        if errors:
            by_source[source]["invalid"] += 1
            by_source[source]["error_details"].append({"source_id": rec.get("source_id"), "errors": errors})
        else:
            by_source[source]["valid"] += 1
            valid_records.append(rec)
    total = len(records)
    n_valid = len(valid_records)
    validation = {
        "total_records": total,
        "valid_records": n_valid,
        "invalid_records": total - n_valid,
        "validation_rate": round(100.0 * n_valid / total, 2) if total else 100.0,
        "errors_by_source": dict(sorted(by_source.items())),
    }
    summary = {
        "total_records": total,
        "status_counts": dict(sorted(status_counts.items())),
        "records_by_source": {s: v["valid"] + v["invalid"] for s, v in sorted(by_source.items())},
        "complete_by_source": dict(
            sorted(Counter(r["source"] for r in valid_records if r.get("status") == "complete").items())
        ),
        "total_source_bytes": sum(
            int(r.get("metadata", {}).get("technical", {}).get("file_size_bytes", 0)) for r in valid_records
        ),
        "sources_found": sorted(by_source),
    }
    stamp = iso(generated_at)
    catalog = {
        "metadata": {
            "generated_at": stamp,
            "schema_version": SCHEMA_VERSION,
            "generator": "em_platform catalog/metadata_catalog",
        },
        "summary": summary,
        "validation": validation,
        "records": valid_records,
    }
    report = {"generated_at": stamp, "summary": validation, "detailed_results": detailed}
    return catalog, report
