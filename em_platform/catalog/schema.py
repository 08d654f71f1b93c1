"""Validation of dataset records against ``metadata.schema.json`` (JSON Schema 2020-12)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

SCHEMA_FILE = "metadata.schema.json"


@functools.cache
def load_schema() -> dict[str, Any]:
    return json.loads(resources.files("em_platform.catalog").joinpath(SCHEMA_FILE).read_text())


@functools.cache
def _validator() -> Draft202012Validator:
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _field(error: jsonschema.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    return path or "(record)"


def validation_errors(record: Any) -> list[str]:
    """Every way ``record`` breaks the schema, each as '<field path>: <what is wrong>'."""
    errors = sorted(
        _validator().iter_errors(record), key=lambda e: (list(map(str, e.absolute_path)), e.message)
    )
    out: list[str] = []
    for e in errors:
        # if/then failures repeat a nested error; report the nested ones, which name the field.
        leaves = [e] if not e.context else sorted(e.context, key=lambda c: list(map(str, c.absolute_path)))
        out.extend(f"{_field(x)}: {x.message}" for x in leaves)
    return out


class InvalidRecord(ValueError):
    """A record does not validate against the catalog schema."""

    def __init__(self, source_id: str, errors: list[str]):
        self.errors = errors
        super().__init__(f"catalog record for {source_id!r} is invalid: " + "; ".join(errors))


def validate_record(record: dict[str, Any]) -> None:
    """Raise InvalidRecord naming every bad field."""
    errors = validation_errors(record)
    if errors:
        raise InvalidRecord(str(record.get("source_id", "?")), errors)
