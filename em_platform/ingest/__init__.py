"""Ingest workflows: source files → OME-Zarr + catalog record (no Dagster)."""
