"""The record schema: its own examples validate, good records pass, each kind of bad one names its field."""

from __future__ import annotations

import copy

import pytest
from jsonschema import Draft202012Validator

from em_platform.catalog.schema import InvalidRecord, load_schema, validate_record, validation_errors


@pytest.fixture
def good() -> dict:
    return copy.deepcopy(load_schema()["examples"][0])


def test_schema_is_valid_2020_12():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_every_shipped_example_validates():
    examples = load_schema()["examples"]
    assert len(examples) >= 2
    for ex in examples:
        assert validation_errors(ex) == []


def test_schema_covers_every_macroscope_field():
    """Every field of macroscope's schema v2 (reference §5.1) has a place in ours."""
    s = load_schema()
    top = set(s["properties"])
    assert {
        "id",
        "source",
        "source_id",
        "status",
        "created_at",
        "updated_at",
        "progress",
        "error",
        "metadata",
        "files",
        "additional_metadata",
    } <= top
    defs = s["$defs"]
    assert {
        "description",
        "volume_shape",
        "voxel_size_nm",
        "data_type",
        "modality",
        "imaging_start_date",
    } <= set(defs["core"]["properties"])
    assert {
        "file_size_bytes",
        "sha256",
        "compression",
        "chunk_size",
        "dtype",
        "global_mean",
        "dimensions_nm",
    } <= set(defs["technical"]["properties"])
    assert {"download_url", "processing_pipeline", "internal_zarr_path", "uuid"} <= set(
        defs["provenance"]["properties"]
    )
    assert {"completeness_score", "validation_errors", "metrics"} <= set(defs["quality"]["properties"])
    assert {"volume", "raw", "metadata", "additional"} <= set(s["properties"]["files"]["properties"])


BAD = [
    ("missing id", lambda r: r.pop("id"), "(record): 'id' is a required property"),
    ("id not a uuid", lambda r: r.update(id="not-a-uuid"), "id:"),
    ("unknown source", lambda r: r.update(source="dropbox"), "source:"),
    ("unknown status", lambda r: r.update(status="done"), "status:"),
    ("bad timestamp", lambda r: r.update(created_at="yesterday"), "created_at:"),
    ("fake dtype", lambda r: r["metadata"]["core"].update(data_type="uint12"), "metadata.core.data_type:"),
    (
        "negative voxel",
        lambda r: r["metadata"]["core"]["voxel_size_nm"].update(x=-4.0),
        "metadata.core.voxel_size_nm.x:",
    ),
    ("complete without voxel size", lambda r: r["metadata"]["core"].pop("voxel_size_nm"), "voxel_size_nm"),
    (
        "non-hex sha256 (macroscope's example defect)",
        lambda r: r["files"]["source"][0].update(sha256="g" * 64),
        "files.source[0].sha256:",
    ),
    ("short sha256", lambda r: r["metadata"]["technical"].update(sha256="abc"), "metadata.technical.sha256:"),
    ("no source files", lambda r: r["files"].update(source=[]), "files.source:"),
    (
        "zero-size shape",
        lambda r: r["metadata"]["core"].update(volume_shape=[0, 10]),
        "metadata.core.volume_shape[0]:",
    ),
    (
        "empty description",
        lambda r: r["metadata"]["core"].update(description=""),
        "metadata.core.description:",
    ),
    ("typo'd top-level key", lambda r: r.update(stauts="complete"), "'stauts' was unexpected"),
    ("unknown unit", lambda r: r["metadata"]["core"]["units"].update(x="furlong"), "metadata.core.units.x:"),
    ("complete without lineage", lambda r: r.pop("lineage"), "'lineage' is a required property"),
    ("failed without error", lambda r: r.update(status="failed"), "'error' is a required property"),
    (
        "negative retry count",
        lambda r: r.update(error={"message": "x", "retry_count": -1}),
        "error.retry_count:",
    ),
    ("progress over 100", lambda r: r.update(progress={"percentage": 120}), "progress.percentage:"),
]


@pytest.mark.parametrize("what,mutate,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_record_rejected_naming_the_field(good, what, mutate, expected):
    assert validation_errors(good) == []
    mutate(good)
    errors = validation_errors(good)
    assert errors, f"{what} was accepted"
    assert any(expected in e for e in errors), errors
    with pytest.raises(InvalidRecord) as info:
        validate_record(good)
    assert expected.split(":")[0] in str(info.value)
